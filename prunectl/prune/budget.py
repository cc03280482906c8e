"""What a prune recipe asks of a parent: a ratio measured on a stated basis (`prune.ratio_of`), or a pinned
shape (`prune.target`, the paper's search results of Table 1) that must agree with that ratio.

The paper's nominal ratios follow no single basis (Minitron-D 50% keeps 16 of 32 layers, 62.5% keeps 8;
Minitron-W 62.5% is of total parameters), so a recipe says which one it means and the report measures the
achieved ratio on the same one.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Literal

from pydantic import Field

from ..errors import PrunectlError
from ..model import Shape
from ..schema import Strict

Basis = Literal["total", "decoder", "layers"]

# What each basis counts, as the report and error messages name it.
MEASURES: dict[str, str] = {"total": "parameters", "decoder": "decoder Linear weights", "layers": "layers"}

# A pinned shape may miss the nominal ratio by this much on the recipe's basis (Table 1's shapes miss theirs by
# up to 3.4 points: Minitron-W 50% removes 46.6% of decoder Linear weights); more is a typo.
PIN_TOLERANCE = 0.05

AXES = ("layers", "hidden", "heads", "ffn")


def size(shape: Shape, basis: str) -> int:
    """`shape` counted on `basis`: all parameters, the decoder's Linear weights (what a sparse mask covers:
    no embeddings, norms or biases), or layers."""
    if basis == "layers":
        return shape.layers
    if basis == "decoder":
        return shape.layers * shape.linear_weights()
    return shape.parameters()


def goal(cfg, parent: Shape) -> tuple[Callable[[Shape], int], float]:
    """How a candidate is measured on the recipe's basis, and the size prune.ratio leaves of the parent."""
    measure = partial(size, basis=cfg.ratio_of)
    return measure, (1 - cfg.ratio) * measure(parent)


def removed(parent: Shape, pruned: Shape, basis: str) -> float:
    """The fraction of the parent's `basis` that pruning removed."""
    return 1 - size(pruned, basis) / size(parent, basis)


class ShapeTarget(Strict):
    """A pruned shape stated outright; an axis left out keeps the parent's."""

    layers: int | None = Field(None, ge=1)
    hidden: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1, description="query heads; a multiple of the parent's heads per KV group")
    ffn: int | None = Field(None, ge=1)

    def axes(self) -> list[str]:
        return [a for a in AXES if getattr(self, a) is not None]

    def text(self) -> str:
        return "{" + ", ".join(f"{a}: {getattr(self, a)}" for a in self.axes()) + "}"


def resolve(target: ShapeTarget, parent: Shape, key: str) -> Shape:
    """The shape `target` pins on `parent` (KV groups follow the query heads, so GQA stays valid)."""
    if target.heads is not None and target.heads % parent.group:
        raise PrunectlError(f"{key}: heads={target.heads} is not a multiple of the parent's {parent.group} query "
                            f"heads per KV group (GQA must stay valid)")
    heads = target.heads or parent.heads
    shape = parent.with_(layers=target.layers or parent.layers, hidden=target.hidden or parent.hidden,
                         heads=heads, kv_heads=heads // parent.group, ffn=target.ffn or parent.ffn)
    larger = [f"{a} {getattr(shape, a)} > {getattr(parent, a)}" for a in AXES if getattr(shape, a) > getattr(parent, a)]
    if larger:
        raise PrunectlError(f"{key}: {target.text()} is larger than the parent ({', '.join(larger)})")
    if shape == parent:
        raise PrunectlError(f"{key}: {target.text()} is the parent's shape; it removes nothing")
    return shape


def pinned(cfg, parent: Shape) -> Shape | None:
    """`prune.target` on this parent, checked against `prune.ratio` on `prune.ratio_of`; None when not pinned."""
    if cfg.target is None:
        return None
    shape = resolve(cfg.target, parent, "prune.target")
    achieved = removed(parent, shape, cfg.ratio_of)
    if abs(achieved - cfg.ratio) > PIN_TOLERANCE:
        raise PrunectlError(
            f"prune.target: {cfg.target.text()} removes {achieved:.1%} of the parent's {MEASURES[cfg.ratio_of]}, "
            f"but prune.ratio is {cfg.ratio:.1%} of {cfg.ratio_of} (a pin may miss it by "
            f"{PIN_TOLERANCE * 100:g} points at most); fix one, or set prune.ratio_of")
    return shape

"""The method table: every prune method prunectl knows, what it needs, and the function that applies it.

Adding a method is one entry here plus its algorithm module: a `feasible(cfg, shape)` that returns the shapes
the recipe may produce from this parent (its search's candidates, or the one pinned) or raises the error the job
would hit (checked before anything is submitted), and an `apply(ctx) -> Pruned`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import depth, sheared, sparse, width
from .context import Context, Pruned

if TYPE_CHECKING:
    from .surgery import Shape


@dataclass(frozen=True)
class Method:
    sparse: bool  # zeroes weights under a held mask instead of removing structure
    calibrated: bool  # reads calibration samples
    layerwise: bool  # walks one decoder layer at a time on the device: the parent stays on the host
    feasible: Callable[[Any, Shape], list[Shape]]
    apply: Callable[[Context], Pruned]
    # on every rank before apply: learn(run, cfg, optimizer, parent_dir, data_ref, calibration ids, micro batch)
    # (Sheared-LLaMA: mask learning, then the candidates scored over the ranks)
    learn: Callable[..., None] | None = None
    # the shape axes it shrinks: what prune.target may pin ("layers" alone: the methods ratio_of: layers fits)
    axes: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    "minitron-depth": Method(False, True, False, depth.feasible, depth.apply_minitron, axes=("layers",)),
    "shortgpt": Method(False, True, False, depth.feasible, depth.apply_shortgpt, axes=("layers",)),
    "minitron-width": Method(False, True, False, width.minitron_feasible, width.apply_minitron, axes=("hidden", "ffn")),
    "flap": Method(False, True, True, width.flap_feasible, width.apply_flap, axes=("heads", "ffn")),
    "sheared-llama": Method(False, True, False, sheared.feasible, sheared.apply, learn=sheared.learn,
                            axes=("layers", "hidden", "heads", "ffn")),
    "wanda": Method(True, True, True, sparse.feasible, sparse.apply_wanda),
    "sparsegpt": Method(True, True, True, sparse.feasible, sparse.apply_sparsegpt),
    "magnitude": Method(True, False, False, sparse.feasible, sparse.apply_magnitude),
}

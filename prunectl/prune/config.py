"""What a prune recipe says: the method (a key of the method table), its ratio and what the ratio is of, or
its N:M pattern, a pinned shape or the search sizes."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..schema import Strict
from .budget import Basis, ShapeTarget
from .methods import METHODS
from .sheared import ShearedConfig
from .sparse import SparseGPTConfig, parse_pattern
from .width import FlapConfig


class SearchConfig(Strict):
    """Architecture search for methods whose budget admits several shapes (Tables 5 and 6)."""

    candidates: int = Field(5, ge=1, description="at most this many shapes, spread over the feasible range")
    quantum: int = Field(8, ge=1, description="hidden and MLP sizes are multiples of this")


class PruneConfig(Strict):
    method: str = Field(description="one of the method table's keys: " + ", ".join(METHODS))
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of ratio_of removed; N:M implies it")
    ratio_of: Basis = Field("total", description="total parameters, decoder Linear weights (sparse methods: the "
                            "only basis, and their default) or layers (methods that remove whole layers only)")
    target: ShapeTarget | None = Field(None, description="pin the pruned shape (Table 1) instead of searching; "
                                       "it must land within 5 points of ratio on ratio_of")
    pattern: str = Field("unstructured", description="sparse methods: unstructured or N:M such as 2:4")
    search: SearchConfig = SearchConfig()
    sparsegpt: SparseGPTConfig = SparseGPTConfig()
    flap: FlapConfig = FlapConfig()
    sheared: ShearedConfig | None = Field(None, description="sheared-llama: mask-learning budget and targets")

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method; one of {', '.join(METHODS)}")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        parse_pattern(value)  # named by its own key: prune.pattern
        return value

    @model_validator(mode="before")
    @classmethod
    def _sparse_basis(cls, data: Any) -> Any:
        """A sparse method's ratio is of decoder Linear weights unless the recipe says otherwise (then refused)."""
        method = METHODS.get(data.get("method")) if isinstance(data, dict) else None
        if method is not None and method.sparse and data.get("ratio_of") is None:
            data = {**data, "ratio_of": "decoder"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _ratio_from_pattern(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("ratio") is None:
            try:
                nm = parse_pattern(str(data.get("pattern", "unstructured")))
            except ValueError:
                return data  # reported by the after-validator
            if nm:
                data = {**data, "ratio": 1 - nm[0] / nm[1]}
        return data

    @model_validator(mode="after")
    def _ratio_and_pattern(self) -> PruneConfig:
        nm = parse_pattern(self.pattern)
        if nm and not self.spec.sparse:
            sparse = [name for name, m in METHODS.items() if m.sparse]
            raise ValueError(f"pattern {self.pattern} applies to sparse methods ({', '.join(sparse)}), not {self.method}")
        if nm and self.ratio is not None and not math.isclose(self.ratio, 1 - nm[0] / nm[1]):
            raise ValueError(f"ratio {self.ratio} contradicts pattern {self.pattern}, which removes "
                             f"{1 - nm[0] / nm[1]:g}; drop ratio")
        if self.method == "sheared-llama" and self.sheared is None:
            raise ValueError("sheared-llama needs prune.sheared with at least train: {tokens: ...}")
        if self.ratio is None:
            raise ValueError("ratio is required (the fraction of parameters to remove, e.g. 0.5)")
        self._check_basis_and_target()
        return self

    def _check_basis_and_target(self) -> None:
        """ratio_of and target must fit what the method removes (the method table's axes)."""
        axes = self.spec.axes
        if self.spec.sparse and self.ratio_of != "decoder":
            raise ValueError(f"ratio_of {self.ratio_of} does not fit {self.method}: a sparse method zeroes decoder "
                             "Linear weights, so its ratio is of decoder; drop ratio_of")
        if self.ratio_of == "layers" and axes != ("layers",):
            depth = [name for name, m in METHODS.items() if m.axes == ("layers",)]
            raise ValueError(f"ratio_of layers fits methods that remove whole layers only ({', '.join(depth)}), "
                             f"not {self.method}; use total or decoder")
        if self.target is None:
            return
        if not axes:
            raise ValueError(f"target: {self.method} keeps the parent's shape; drop target")
        other = [a for a in self.target.axes() if a not in axes]
        if other or not self.target.axes():
            raise ValueError(f"target: {self.method} pins {', '.join(axes)}; "
                             + (f"it cannot change {', '.join(other)}" if other else "name at least one"))
        if self.sheared is not None and self.sheared.targets:
            raise ValueError("target pins one shape and sheared.targets lists candidates to search; keep one")

    @property
    def spec(self):
        """This method's entry in the method table."""
        return METHODS[self.method]

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

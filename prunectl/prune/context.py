"""What a prune method's apply() receives and returns (the method table's contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .meter import Meter
    from .surgery import Shape


@dataclass
class Context:
    """What a method's apply() gets: the parent (on the host for layer-wise methods), calibration ids, settings."""

    model: Any
    ids: torch.Tensor | None
    cfg: Any  # PruneConfig
    micro: int
    device: Any
    shape: Shape
    meter: Meter
    report: dict[str, Any]  # method-specific entries: candidates, removed layers, ...
    workdir: Path  # the run directory (Sheared-LLaMA's learned candidates live there)


@dataclass
class Pruned:
    model: Any
    masks: dict[str, Any] = field(default_factory=dict)  # sparse methods: parameter name -> keep-mask

"""What a prune method's apply() receives and returns (the method table's contract)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .calibration import Layerwise
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
    workdir: Path | None  # the run directory (Sheared-LLaMA's learned candidates and the calibration spill live there)
    calibration_memory_gb: float | None = None  # calibration.memory_gb: host memory for the layer-wise hidden states

    def layerwise(self) -> Layerwise:
        """The layer-wise pass over this context's calibration data, spilling past calibration.memory_gb."""
        from .activations import SPILL_DIR, budget_bytes
        from .calibration import Layerwise

        spill = None if self.workdir is None else Path(self.workdir) / SPILL_DIR
        return Layerwise(self.model, self.ids, self.micro, self.device, budget_bytes(self.calibration_memory_gb), spill)


@dataclass
class Pruned:
    model: Any
    masks: dict[str, Any] = field(default_factory=dict)  # sparse methods: parameter name -> keep-mask

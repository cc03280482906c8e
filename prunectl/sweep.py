"""Peak-LR sweeps: short prefix runs of one recipe, one per candidate LR; the lowest training loss wins.

`--sweep lr` submits the prefix runs as one job array under the name `<recipe>-lrsweep`. A later
plain submission of the recipe looks up, for every candidate, the newest complete prefix run whose
resolved recipe is exactly the expected one, and trains with the winner (stages/train.py, choose_lr). A prefix run follows the
full run's LR schedule and stops after `prefix_tokens`, so it sees the same warmup and peak.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .schema import Strict


class LRSweepConfig(Strict):
    lrs: list[float] = Field([1e-5, 3e-5, 1e-4, 3e-4, 1e-3], min_length=2, description="candidate peak LRs")
    prefix_tokens: int = Field(gt=0, description="tokens each prefix run trains on")
    parallelism: int | None = Field(None, ge=1, description="job-array throttle: prefix runs running at once")


class SweepChoice(BaseModel):
    """What a run that uses a sweep records in its manifest (`lr_sweep`)."""

    chosen_lr: float
    prefix_tokens: int
    runs: dict[str, str]  # lr (as written) -> prefix run name@vNNN
    final_train_loss: dict[str, float]


def sweep_name(name: str) -> str:
    return f"{name}-lrsweep"


def prefix_overrides(name: str, cfg: LRSweepConfig, lr: float) -> list[str]:
    return [f"name={sweep_name(name)}", f"optimizer.lr={lr!r}", f"train.prefix_tokens={cfg.prefix_tokens}", "sweep=null"]


def describe(choice: SweepChoice) -> list[dict[str, Any]]:
    return [{"lr": lr, "run": ref, "final_train_loss": choice.final_train_loss[lr],
             "chosen": float(lr) == choice.chosen_lr} for lr, ref in choice.runs.items()]

"""Peak-LR sweeps: short prefix runs of one recipe, one per candidate LR; the lowest training loss wins.

`--sweep lr` submits the prefix runs as one job array under the name `<recipe>-lrsweep`. A later
plain submission of the recipe looks up, for every candidate, the newest complete prefix run whose
resolved recipe is exactly the expected one, and trains with the winner. A prefix run follows the
full run's LR schedule and stops after `prefix_tokens`, so it sees the same warmup and peak.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

from .errors import PrunectlError
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


def choose(root, recipe_ref: str, overrides: list[str], recipe) -> SweepChoice:
    """The winning LR from complete prefix runs of exactly this recipe; an error naming what is missing."""
    from . import recipe as recipes
    from . import store

    runs, losses, missing = {}, {}, []
    existing = [r for r in store.versions(root, sweep_name(recipe.name)) if r.is_complete()]
    for lr in recipe.sweep.lrs:
        expected = recipes.dump(recipes.resolve(recipe_ref, [*overrides, *prefix_overrides(recipe.name, recipe.sweep, lr)]))
        match = [r for r in existing if (r.dir / "recipe.yaml").read_text() == expected]
        if not match:
            missing.append(f"{lr:g}")
            continue
        run = match[-1]
        loss = run.manifest().summary.get("final_train_loss")
        runs[f"{lr:g}"] = run.ref
        losses[f"{lr:g}"] = loss if loss is not None and math.isfinite(loss) else math.inf
    if missing:
        raise PrunectlError(
            f"sweep: {recipe.name} has no complete prefix run for lr {', '.join(missing)}; run "
            f"`prunectl {recipe.stage} {recipe_ref} --sweep lr` first (or set sweep=null to train with optimizer.lr)")
    best = min(losses, key=losses.get)
    if not math.isfinite(losses[best]):
        raise PrunectlError(f"sweep: every prefix run of {recipe.name} diverged; widen sweep.lrs toward smaller values")
    return SweepChoice(chosen_lr=float(best), prefix_tokens=recipe.sweep.prefix_tokens, runs=runs,
                       final_train_loss=losses)


def describe(choice: SweepChoice) -> list[dict[str, Any]]:
    return [{"lr": lr, "run": ref, "final_train_loss": choice.final_train_loss[lr],
             "chosen": float(lr) == choice.chosen_lr} for lr, ref in choice.runs.items()]

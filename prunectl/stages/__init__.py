"""The stage table: every command's recipe type, its check (before anything is written) and its run.

| stage    | recipe          | check                      | run (where)                               |
|----------|-----------------|----------------------------|-------------------------------------------|
| data     | DataRecipe      | data.check (inputs only)   | data.Phase: tokenizer, array, finalize    |
| pretrain | PretrainRecipe  | train.check_pretrain       | train.run (a job, every rank)             |
| retrain  | RetrainRecipe   | train.check_retrain        | train.run (a job, every rank)             |
| prune    | PruneRecipe     | prune.check                | prune.run (a job, every rank)             |
| eval     | EvalRecipe      | eval.check                 | eval.run (a job per evaluated run)        |
| compare  | CompareRecipe   | -                          | compare.run_here / compare.run_study (job)|
| study    | StudyRecipe     | (each node's stage's)      | study.py (submits the others)             |

Only the CLI and the study import this package's table; components never import stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import store
from ..recipe import (CompareRecipe, DataRecipe, EvalRecipe, PretrainRecipe, PruneRecipe, RetrainRecipe,
                      StudyRecipe, load_run_recipe)
from . import compare, data, prune, train
from . import eval as eval_


@dataclass(frozen=True)
class Stage:
    recipe: type
    check: Callable[..., Any] | None  # (runs root, recipe, resources) -> inputs as name@vNNN, or every problem
    run: Callable[..., Any] | None  # (run, recipe) on every rank of the run's job


STAGES: dict[str, Stage] = {
    "data": Stage(DataRecipe, None, None),
    "pretrain": Stage(PretrainRecipe, train.check_pretrain, train.run),
    "retrain": Stage(RetrainRecipe, train.check_retrain, train.run),
    "prune": Stage(PruneRecipe, prune.check, prune.run),
    "eval": Stage(EvalRecipe, eval_.check, eval_.run),
    "compare": Stage(CompareRecipe, None, None),
    "study": Stage(StudyRecipe, None, None),
}


@dataclass
class RunJob:
    """A job on one run directory: the run's stored, typed recipe handed to the stage's run entry."""

    run: Callable[..., Any]
    run_dir: str

    def __call__(self) -> Any:
        return self.run(store.Run.at(Path(self.run_dir)), load_run_recipe(Path(self.run_dir)))


def job(stage: str, run_dir: Path) -> RunJob:
    return RunJob(STAGES[stage].run, str(run_dir))


__all__ = ["STAGES", "Stage", "RunJob", "job", "compare", "data", "eval_", "prune", "train"]

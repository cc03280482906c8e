"""`prunectl data prepare`: corpora -> tokenizer -> token files and named disjoint ranges, in a data run.

Three phases, each a job of the launcher: the tokenizer, one array of `data.workers` tokenize tasks (each the
units u with u % workers == task that are not done yet, so a rerun redoes only unfinished units), and
finalize (data.json, then complete). The command only checks the inputs and submits (`submission.submit_data`).
"""

from __future__ import annotations

import contextlib
import errno
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import lifecycle, store
from ..errors import raise_stopped

if TYPE_CHECKING:
    from ..recipe import DataRecipe


def prepared(root: Path, recipe: DataRecipe) -> store.Run | None:
    """The newest complete data run of exactly this recipe."""
    from ..recipe import runs_of

    done = runs_of(root, recipe, complete=True)
    return done[-1] if done else None


def check(recipe: DataRecipe) -> None:
    """Every problem with the sources that the start of each file shows, an HF source or tokenizer that does not
    load; nothing is written."""
    from .. import data

    data.check_sources(recipe.data)
    data.units(recipe.data)  # opens each hf source: a missing dataset is refused here, not in a job
    if recipe.data.tokenizer.kind == "hf":
        data.build_tokenizer(recipe.data.tokenizer, iter(()))


@dataclass
class Phase:
    """One job (or array task) of a data run: "tokenizer", "tokenize" (task of tasks) or "finalize"."""

    run_dir: str
    phase: str
    task: int = 0
    tasks: int = 1

    def __call__(self) -> None:
        from ..recipe import load_run_recipe

        run = store.Run.at(Path(self.run_dir))
        config = load_run_recipe(run.dir).data
        signal.signal(signal.SIGTERM, raise_stopped)  # submitit ignores it; a phase stops (its units are atomic)
        try:
            self._phase(run, config)
        except OSError as err:
            if err.errno == errno.ENOSPC:  # running() noted it already; this says what to do
                with contextlib.suppress(OSError):
                    lifecycle.fail(run, f"no space left on device writing {err.filename or run.dir}; free space and "
                                        "run `prunectl data prepare` again (finished units are kept)")
            raise

    def _phase(self, run: store.Run, config) -> None:
        import os

        from .. import data

        if self.phase == "tokenize":
            # the job's CPUs are the tokenizer's threads (read when its thread pool starts, in this fresh process)
            os.environ.setdefault("RAYON_RS_NUM_CPUS", os.environ.get("PRUNECTL_THREADS", "1"))
            try:  # tasks run side by side: none holds the owner lock, but each failure fails the run
                data.tokenize_task(config, run.dir, self.task, self.tasks)
            except BaseException as err:
                with contextlib.suppress(OSError):
                    lifecycle.fail(run, err)
                raise
            return
        with lifecycle.running(run):
            if self.phase == "tokenizer":
                data.write_tokenizer(config, run.dir)
            else:
                meta = data.finalize(config, run.dir)
                lifecycle.complete(run, summary=meta.summary().model_dump())


def phases(run_dir: Path, workers: int) -> list[tuple[str, list[Phase]]]:
    """(name, callables) of each phase in order: one job, one array of `workers` tasks, one job."""
    d = str(run_dir)
    return [("tokenizer", [Phase(d, "tokenizer")]),
            ("tokenize", [Phase(d, "tokenize", w, workers) for w in range(workers)]),
            ("finalize", [Phase(d, "finalize")])]

"""`prunectl data prepare`: corpora -> tokenizer -> token shards and named disjoint ranges, in a data run.

It runs where it is called (the login node, or a study's caller). A user error leaves nothing behind; any
other failure leaves the run marked failed with its reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import lifecycle, store
from ..artifacts import DataMeta
from ..errors import PrunectlError, RunFailed

if TYPE_CHECKING:
    from ..recipe import DataRecipe


def prepared(root: Path, recipe: DataRecipe) -> store.Run | None:
    """The newest complete data run of exactly this recipe."""
    from ..recipe import runs_of

    done = runs_of(root, recipe, complete=True)
    return done[-1] if done else None


def check(recipe: DataRecipe) -> None:
    """Every problem with the sources that the start of each file shows; nothing is written."""
    from .. import data

    data.check_sources(recipe.data)


def run(root: Path, recipe: DataRecipe, progress=None) -> tuple[store.Run, DataMeta]:
    """Check and plan in memory, then write a new version. A user error leaves nothing; an OSError while
    writing (a full disk) leaves the run failed with one line and is raised as RunFailed."""
    from .. import data
    from ..recipe import write_run_recipe

    check(recipe)  # the cheap checks first: one line about a bad file before reading every source
    planned = data.plan(recipe.data)  # in memory: every other user error, still before anything is written
    created = [p for p in (root / recipe.name, root) if not p.exists()]
    try:
        run = store.allocate(root, recipe.name)
    except OSError as err:
        _remove_empty(created)
        raise PrunectlError(f"runs root {root}: cannot create a run directory there ({err.strerror or err}); "
                            "pass --runs-dir (or set PRUNECTL_RUNS) to a writable directory") from None
    try:
        write_run_recipe(run, recipe)
        run.write_manifest(store.Manifest(name=recipe.name, version=run.version, stage="data", executor="here"))
        with lifecycle.running(run):
            staging = run.dir / "staging"
            try:
                meta = data.prepare(recipe.data, staging, progress, planned)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # partial shards: useless, and a full disk needs the room
                raise
            for child in staging.iterdir():
                os.replace(child, run.dir / child.name)
            staging.rmdir()
            lifecycle.complete(run, summary=meta.summary().model_dump())
    except PrunectlError:
        shutil.rmtree(run.dir, ignore_errors=True)  # a user error leaves nothing behind
        _remove_empty(created)
        raise
    except OSError as err:
        reason = _os_reason(err, run)
        with contextlib.suppress(OSError, PrunectlError):  # running() noted it already; this says what to do
            lifecycle.fail(run, reason)
        raise RunFailed(run.ref, reason) from None
    return run, meta


def _remove_empty(created: list[Path]) -> None:
    """The folders allocate made for this run alone (innermost first), unless another run is in them now."""
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _os_reason(err: OSError, run: store.Run) -> str:
    if err.errno == errno.ENOSPC:
        return (f"no space left on device writing {err.filename or run.dir}; free space and run `prunectl data "
                "prepare` again")
    return lifecycle.one_line(err)

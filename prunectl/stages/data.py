"""`prunectl data prepare`: corpora -> tokenizer -> token shards and named disjoint ranges, in a data run.

It runs where it is called (the login node, or a study's caller). A user error leaves nothing behind; any
other failure leaves the run marked failed with its reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import lifecycle, store
from ..artifacts import DataMeta
from ..errors import PrunectlError

if TYPE_CHECKING:
    from ..recipe import DataRecipe


def prepared(root: Path, recipe: DataRecipe) -> store.Run | None:
    """The newest complete data run of exactly this recipe."""
    from ..recipe import runs_of

    done = runs_of(root, recipe, complete=True)
    return done[-1] if done else None


def run(root: Path, recipe: DataRecipe, progress=None) -> tuple[store.Run, DataMeta]:
    from .. import data
    from ..recipe import write_run_recipe

    run = store.allocate(root, recipe.name)
    try:
        write_run_recipe(run, recipe)
        run.write_manifest(store.Manifest(name=recipe.name, version=run.version, stage="data", executor="here"))
        with lifecycle.running(run):
            staging = run.dir / "staging"
            meta = data.prepare(recipe.data, staging, progress)
            for child in staging.iterdir():
                os.replace(child, run.dir / child.name)
            staging.rmdir()
            lifecycle.complete(run, summary=meta.summary().model_dump())
    except PrunectlError:
        shutil.rmtree(run.dir, ignore_errors=True)  # a user error leaves nothing behind
        raise
    return run, meta

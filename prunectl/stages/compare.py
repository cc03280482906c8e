"""`prunectl compare` and a study's last job: a compare run holding the paper's tables and figures.

The CLI's compare runs here (on the login node, it reads only manifests and results); a study's compare
runs as a job once the study's evals have ended, and compares every method whose runs completed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import compare as cmp
from .. import lifecycle, plots, store
from ..artifacts import CompareSummary, StudyGraph
from ..errors import PrunectlError
from ..evaluate.config import EvalConfig

if TYPE_CHECKING:
    from ..recipe import CompareRecipe, StudyRecipe


def complete_methods(root: Path, methods: list[dict[str, Any]], eval_cfg: EvalConfig) -> tuple[list[cmp.MethodRuns], list[str]]:
    """A study's methods whose runs all completed and were evaluated; the others, each with its first reason."""
    kept, left_out = [], []
    for m in methods:
        spec = cmp.MethodRuns.model_validate(m)
        problems: list[str] = []
        for ref in [*spec.retrain, *spec.scratch, *([spec.total] if spec.total else [])]:
            cmp.measure(root, ref, eval_cfg, problems)
        (left_out.append(f"{spec.label}: {problems[0]}") if problems else kept.append(spec))
    if not kept:
        raise PrunectlError("no method of the study has complete, evaluated runs: " + "; ".join(left_out))
    return kept, left_out


def of_study(root: Path, study: StudyRecipe, graph: StudyGraph) -> tuple[CompareRecipe, list[str]]:
    """The compare recipe of a study's submission: its complete methods; the left-out ones with a reason."""
    from ..recipe import CompareRecipe

    eval_cfg = EvalConfig.model_validate(graph.eval)
    methods, left_out = complete_methods(root, graph.methods, eval_cfg)
    recipe = CompareRecipe(name=f"{study.name}-compare", stage="compare", eval=eval_cfg,
                           compare=cmp.CompareConfig(perplexity=study.perplexity, methods=methods),
                           description=f"the comparison of study {study.name}")
    return recipe, left_out


def eval_config(recipe: CompareRecipe) -> EvalConfig:
    from ..recipe import resolve

    return recipe.eval if not isinstance(recipe.eval, str) else resolve(recipe.eval).eval


def publish(run: store.Run, recipe: CompareRecipe, c: cmp.Comparison, left_out: list[str]) -> list[Path]:
    """Tables and figures into staging, moved into the run, then the run marked complete."""
    from ..recipe import write_run_recipe

    write_run_recipe(run, recipe)
    staging = run.dir / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    written = cmp.write(c, staging) + plots.plot_all(c, staging)
    for path in written:
        os.replace(path, run.dir / path.name)
    staging.rmdir()
    summary = CompareSummary(methods=len(c.methods), finding_1=cmp.finding_1(c), eval_key=c.eval_key,
                             not_token_matched=c.problems, left_out=left_out)
    lifecycle.complete(run, summary=summary.model_dump())
    return [run.dir / p.name for p in written]


def run_here(root: Path, recipe: CompareRecipe, left_out: list[str], allow_mismatch: bool = False
             ) -> tuple[store.Run, cmp.Comparison, list[Path]]:
    """`prunectl compare`: build the comparison (refusing what is not token-matched), then publish a run."""
    eval_cfg = eval_config(recipe)
    c = cmp.build(root, recipe.compare, eval_cfg, allow_mismatch)
    run = store.allocate(root, recipe.name)
    run.write_manifest(store.Manifest(name=recipe.name, version=run.version, stage="compare", executor="here"))
    with lifecycle.running(run):
        resolved = recipe.model_copy(update={"eval": eval_cfg})
        written = publish(run, resolved, c, left_out)
    return run, c, written


def run_study(run_dir: Path, study_run_dir: Path) -> dict[str, Any]:
    """A study's last job: compare every method whose runs completed (the others are named in the summary)."""
    from ..recipe import load_run_recipe

    run = store.Run.at(run_dir)
    with lifecycle.running(run):
        study_run = store.Run.at(study_run_dir)
        recipe, left_out = of_study(run.root, load_run_recipe(study_run.dir), StudyGraph.read(study_run.dir))
        recipe = recipe.model_copy(update={"name": run.name, "description": f"the comparison of study {study_run.ref}"})
        c = cmp.build(run.root, recipe.compare, recipe.eval)
        publish(run, recipe, c, left_out)
        return {"finding_1": cmp.finding_1(c), "left_out": left_out}

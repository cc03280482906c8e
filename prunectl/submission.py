"""Submitting a stage's runs: resolve -> check inputs -> allocate (or resume) versions -> submit one job or one array.

The CLI's pretrain, retrain and prune commands are this flow with their stage's row of the stage table;
nothing here prints (the CLI renders what `plan` and `submit` return).
"""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import launch, lifecycle, store
from . import recipe as recipes
from .errors import PrunectlError
from .stages import STAGES, job, train
from .sweep import SweepChoice, prefix_overrides

EXECUTORS = ("slurm", "local", "debug")


def check_executor(executor: str, allowed: tuple[str, ...] = EXECUTORS) -> None:
    if executor not in allowed:
        raise PrunectlError(f"--executor: '{executor}' is not one of {', '.join(allowed)}")


def array_variants(base: list[str], array: str | None, example: str) -> list[list[str]]:
    """The overrides of each job: one per value of --array key=v1,v2,... (just `base` without it)."""
    if array is None:
        return [base]
    key, sep, values = array.partition("=")
    if not sep or not key or not values:
        raise PrunectlError(f"--array: '{array}' is not key=v1,v2,... e.g. --array {example}")
    return [[*base, f"{key}={v}"] for v in values.split(",")]


def resolve_as(stage: str, recipe_ref: str, overrides: list[str]) -> recipes.Recipe:
    """The recipe, refused in one line when it is not a recipe of `stage`."""
    r = recipes.resolve(recipe_ref, overrides)
    if r.stage != stage:
        raise PrunectlError(f"{recipe_ref}: is a {r.stage} recipe; `{stage}` takes a recipe with stage: {stage}")
    return r


@dataclass
class StagePlan:
    stage: str
    recipes: list[Any]  # one resolved recipe per job
    inputs: list[dict[str, str]]  # each job's checked inputs as name@vNNN
    res: launch.Resources
    array: bool
    choice: SweepChoice | None = None  # the sweep's winner a plain run trains with
    base: list[str] = field(default_factory=list)


def plan(stage: str, recipe_ref: str, overrides: list[str], profile: str | None, root: Path, array: str | None,
         sweep: str | None, dry_run: bool) -> StagePlan:
    """Everything checked, nothing written: the recipes each job runs, their inputs and resources."""
    if sweep is not None and sweep != "lr":
        raise PrunectlError(f"--sweep: '{sweep}' is not a sweep prunectl runs; the one it runs is --sweep lr")
    if sweep and array:
        raise PrunectlError("--sweep and --array each submit one job array; give one of them")
    base = list(overrides)
    variants = array_variants(base, array, "train.seed=0,1,2")
    r = resolve_as(stage, recipe_ref, base)
    choice, sweep_cfg = None, getattr(r, "sweep", None)
    if sweep:
        if sweep_cfg is None:
            raise PrunectlError(f"--sweep lr: {r.name} has no sweep section (sweep: {{lrs: [...], prefix_tokens: N}})")
        variants = [[*base, *prefix_overrides(r.name, sweep_cfg, lr)] for lr in sweep_cfg.lrs]
    elif sweep_cfg is not None and not dry_run:
        choice = train.choose_lr(root, recipe_ref, base, r)
        variants = [[*v, f"optimizer.lr={choice.chosen_lr!r}"] for v in variants]
    resolved = [recipes.resolve(recipe_ref, v) for v in variants]
    res = launch.resources(resolved[0].launch, profile)
    if sweep and sweep_cfg.parallelism:
        res = res.model_copy(update={"array_parallelism": sweep_cfg.parallelism})
    inputs = [STAGES[stage].check(root, each, res) for each in resolved]
    return StagePlan(stage, resolved, inputs, res, bool(array or sweep), choice, base)


def interrupted(root: Path, r) -> store.Run | None:
    """The newest version of `r.name`, if it holds this exact recipe and did not complete."""
    runs = store.versions(root, r.name)
    if not runs:
        return None
    manifest = runs[-1].manifest()
    if manifest is None or manifest.status == "complete" or not recipes.same_recipe(runs[-1], r):
        return None
    return runs[-1]


def resumable(root: Path, r, new: bool) -> store.Run | None:
    """The newest version of this exact recipe, if it was interrupted and no job owns it (call under `claim`)."""
    run = None if new else interrupted(root, r)
    if run is None:
        return None
    manifest = run.manifest()
    if lifecycle.owner_alive(run) or launch.job_alive(manifest):
        raise PrunectlError(f"{run.ref}: is owned by job {', '.join(manifest.job_ids[-1:]) or manifest.pid} "
                            f"({manifest.status}); wait for it, cancel it, or pass --new for a separate version")
    return run


def submit(p: StagePlan, root: Path, executor: str, new: bool, echo: Callable[[str], None]) -> list[tuple[store.Run, Any]]:
    """Allocate (or resume) a version per recipe, then submit them as one job or one array.

    Resuming is exclusive: the command holds the version's claim from the moment it finds it interrupted
    until its job id is recorded, so concurrent identical commands never submit two jobs into one directory."""
    with ExitStack() as claims:
        runs, fresh = [], []
        for each, ins in zip(p.recipes, p.inputs):
            run = None
            if not p.array and not new and (candidate := interrupted(root, each)) is not None:
                claims.enter_context(lifecycle.claim(candidate))
                run = resumable(root, each, new)  # again, under the claim
            if run is None:
                run = store.allocate(root, each.name)
                fresh.append(run)
                recipes.write_run_recipe(run, each)
                manifest = store.Manifest(name=each.name, version=run.version, stage=p.stage, inputs=ins, executor=executor)
                if p.choice is not None:
                    manifest = manifest.model_copy(update={"lr_sweep": p.choice.model_dump()})
                run.write_manifest(manifest)
            else:
                echo(f"resuming {run.ref}" + (" from its newest complete checkpoint" if p.stage != "prune" else ""))
                run.update(executor=executor, status="pending", finished=None)
            runs.append(run)
        dirs = [run.dir for run in runs]
        try:
            jobs = launch.submit(executor, p.res, p.recipes[0].name, [job(p.stage, d) for d in dirs],
                                 launch.array_folder(dirs), link_logs=dirs if len(dirs) > 1 else [])
        except Exception as err:  # sbatch refused (bad partition, account, ...): leave no pending run behind
            for run in runs:
                if run in fresh:
                    shutil.rmtree(run.dir, ignore_errors=True)
                else:
                    lifecycle.fail(run, "resubmission failed")
            raise PrunectlError(f"submission failed: {submit_error(err)}") from None
        for run, j in zip(runs, jobs):
            manifest = run.manifest()
            if str(j.job_id) not in manifest.job_ids:
                run.update(job_ids=[*manifest.job_ids, str(j.job_id)])
            echo(f"submitted {run.ref} as job {j.job_id} ({executor}); run directory {run.dir}")
    return list(zip(runs, jobs))


def settle(run: store.Run, job, hint: str = "") -> store.Manifest | None:
    """After the job ended: a run it left pending or running (killed, out of disk, crashed before its
    lifecycle started) is marked failed with the job's last words, so no run looks alive or complete."""
    manifest = run.manifest()
    if manifest is None or manifest.status in ("complete", "failed") or lifecycle.owner_alive(run):
        return manifest
    return lifecycle.fail(run, f"the job ended without finishing: {launch.last_words(job)}{hint}")


def submit_error(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def submit_data(root: Path, r, executor: str, profile: str | None, new: bool,
                echo: Callable[[str], None]) -> tuple[store.Run, list]:
    """A data run's three phases: the tokenizer job, one array of data.workers tokenize tasks, the finalize job.
    On Slurm they are chained (afterok) and this returns at once; local and debug run them here in order and stop
    at the first phase that fails. An interrupted version of the same recipe is resumed: its finished units stay."""
    from .stages import data as data_stage

    check_executor(executor)
    data_stage.check(r)  # the login node reads only the start of each input
    res = launch.resources(r.launch, profile)
    with ExitStack() as claims:
        run = None
        if not new and (candidate := interrupted(root, r)) is not None:
            claims.enter_context(lifecycle.claim(candidate))
            run = resumable(root, r, new)
        if run is None:
            run = _allocate(root, r.name)
            recipes.write_run_recipe(run, r)
            run.write_manifest(store.Manifest(name=r.name, version=run.version, stage="data", executor=executor))
        else:
            echo(f"resuming {run.ref}: its finished units are kept")
            run.update(executor=executor, status="pending", finished=None)
        jobs = data_jobs(run, r, executor, res, echo)
    return run, jobs


def data_jobs(run: store.Run, r, executor: str, res: launch.Resources, echo: Callable[[str], None]) -> list:
    """Submit a data run's phases; its last job is the finalize job, which later jobs can wait on.

    Local and debug: each phase runs to its end before the next; the first that fails settles the run. If this
    command is stopped (SIGTERM, Ctrl-C) its local jobs are stopped too and the run is marked failed."""
    jobs: list = []
    try:
        _data_phases(run, r, executor, res, echo, jobs)
    except Exception:
        raise
    except BaseException as err:
        launch.stop_local(jobs)
        for j in jobs:
            j.wait()
        lifecycle.fail(run, err)
        raise
    return jobs


def _data_phases(run: store.Run, r, executor: str, res: launch.Resources, echo: Callable[[str], None],
                 jobs: list) -> None:
    """Submit each phase (appended to `jobs`); local and debug: wait for it, and stop at the first that fails."""
    from .stages import data as data_stage

    dependency = None
    for name, calls in data_stage.phases(run.dir, r.data.workers):
        if executor != "slurm":  # this process drives the phases: while it lives, no other command resumes the run
            run.update(pid=os.getpid(), host=socket.gethostname())
        try:
            submitted = launch.submit(executor, res, f"{r.name}-{name}", calls, run.dir / "logs", dependency)
        except Exception as err:
            lifecycle.fail(run, "submission failed")
            raise PrunectlError(f"submission failed: {submit_error(err)}") from None
        jobs += submitted
        run.update(job_ids=[*run.manifest().job_ids, *(str(j.job_id) for j in submitted)])
        echo(f"{name}: job {', '.join(str(j.job_id) for j in submitted)} ({executor})")
        if executor == "slurm":
            dependency = "afterok:" + str(submitted[0].job_id).split("_")[0]  # an array's id: all its tasks
            continue
        failed = [j for j in submitted if _failed(j)]
        if failed:
            settle(run, failed[0], "; the same command resumes it, keeping the finished units")
            return


def _failed(job) -> bool:
    """A local or debug job that ended with an error (it is waited for)."""
    from submitit.core.utils import UncompletedJobError

    try:
        return isinstance(job.result(), launch.Raised)
    except UncompletedJobError:  # and FailedJobError: the job raised, or was killed
        return True


def _allocate(root: Path, name: str) -> store.Run:
    """A new version; a runs root that cannot hold one is one line, and leaves no folder made for it."""
    import contextlib

    created = [p for p in (root / name, root) if not p.exists()]
    try:
        return store.allocate(root, name)
    except OSError as err:
        for folder in created:  # innermost first, unless another run is in it now
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise PrunectlError(f"runs root {root}: cannot create a run directory there ({err.strerror or err}); "
                            "pass --runs-dir (or set PRUNECTL_RUNS) to a writable directory") from None

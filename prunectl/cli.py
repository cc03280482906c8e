"""The prunectl command line: each command parses, resolves, submits (or runs here) and renders.

| command              | what it does                                              | stage code                 |
|----------------------|-----------------------------------------------------------|----------------------------|
| recipes ls / show    | list shipped recipes, print one (resolved)                | recipe.py                  |
| data prepare         | tokenize corpora into shards and named ranges (here)      | stages/data.py             |
| pretrain / retrain   | train from scratch / retrain a pruned run (a job)         | stages/train.py            |
| prune                | prune a parent with one method (a job)                    | stages/prune.py            |
| eval                 | held-out loss, perplexity, zero-shot (one job per run)    | stages/eval.py             |
| compare              | the paper's tables and figures (here)                     | stages/compare.py          |
| study                | the whole experiment, chained by Slurm dependencies       | study.py                   |
| status               | versions and job states; a study's graph                  | store.py, study.py         |
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from . import launch, render, store, submission
from . import status as views
from . import recipe as recipes
from . import study as studies
from .artifacts import DataMeta
from .errors import PrunectlError, RunFailed, Stopped, raise_stopped
from .render import console, err_console
from .stages import compare as compare_stage
from .stages import data as data_stage
from .stages import eval as eval_stage
from .stages import train as train_stage

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipes_app = typer.Typer(help="List and inspect recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare token data: shards and named disjoint ranges.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(data_app, name="data")

RecipeArg = Annotated[str, typer.Argument(help="recipe file, or recipe name under recipes/")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides, e.g. train.tokens=2e6")]
RunsDir = Annotated[Optional[Path], typer.Option("--runs-dir", help="runs root (default: $PRUNECTL_RUNS or ./runs)")]
ExecutorOpt = Annotated[str, typer.Option("--executor", "-e", help="slurm | local | debug")]
Profile = Annotated[Optional[str], typer.Option(help="Slurm profile in slurm/profiles (default: the recipe's)")]
ArrayOpt = Annotated[Optional[str], typer.Option("--array", help="key=v1,v2,...: one run per value, one job array")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe and batch script; write nothing")]
Wait = Annotated[bool, typer.Option("--wait", help="follow a Slurm job until it ends (local and debug always do)")]
New = Annotated[bool, typer.Option("--new", help="always start a new version instead of resuming an interrupted one")]
Sweep = Annotated[Optional[str], typer.Option(
    "--sweep", help="lr: submit the recipe's LR-sweep prefix runs as one job array (a later plain run uses the winner)")]
Json = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    """Prune a large parent or train the small model from scratch: token-matched studies on Slurm."""
    os.environ["PRUNECTL_DEBUG"] = "1" if debug else os.environ.get("PRUNECTL_DEBUG", "")


# ---------------------------------------------------------------------------- recipes


@recipes_app.command("ls")
def recipes_ls(as_json: Json = False) -> None:
    """Every shipped recipe with its stage and description."""
    rows = []
    for path in recipes.list_recipe_files():
        try:
            r = recipes.resolve(str(path))
            rows.append({"name": r.name, "stage": r.stage, "file": str(path), "description": r.description})
        except PrunectlError as err:
            rows.append({"name": recipes.default_name(path), "stage": "invalid", "file": str(path),
                         "description": err.problems[0]})
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    render.recipes_table(rows)


@recipes_app.command("show")
def recipes_show(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resolved: Annotated[bool, typer.Option("--resolved", help="after extends, overrides and defaults")] = False,
) -> None:
    """Print a recipe file as written, or --resolved."""
    text = recipes.dump(recipes.resolve(recipe, overrides or [])) if resolved else recipes.read(recipes.find_recipe(recipe))
    console.print(text, end="", markup=False, highlight=False)


# ---------------------------------------------------------------------------- data


@data_app.command("prepare")
def data_prepare(
    recipe: RecipeArg,
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    force: Annotated[bool, typer.Option("--force", help="prepare a new version even if an identical one exists")] = False,
    executor: ExecutorOpt = "local",
    profile: Profile = None,
    wait: Wait = False,
    new: New = False,
) -> None:
    """Tokenize the recipe's corpora into token files with pretrain/retrain/validation ranges: a tokenizer job,
    an array of data.workers tokenize tasks, a finalize job (a rerun resumes an interrupted version)."""
    r = submission.resolve_as("data", recipe, overrides or [])
    root = store.runs_root(runs_dir)
    done = data_stage.prepared(root, r)
    if done and not force:
        console.print(f"{done.ref} already holds this exact recipe ({done.dir}); --force prepares it again")
        return
    run, jobs = submission.submit_data(root, r, executor, profile, new, render.line)
    if executor == "slurm" and not wait:
        return
    if executor == "slurm":
        render.follow(run, jobs[-1])
        submission.settle(run, jobs[-1])
    _reraise_debug(executor, jobs)
    if run.is_complete():
        render.data_prepared(run, DataMeta.read(run.dir))
    else:
        render.outcome(run)
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- pretrain, retrain, prune


@app.command()
def pretrain(recipe: RecipeArg, overrides: Overrides = None, executor: ExecutorOpt = "local", profile: Profile = None,
             runs_dir: RunsDir = None, array: ArrayOpt = None, dry_run: DryRun = False, wait: Wait = False,
             new: New = False, sweep: Sweep = None) -> None:
    """Train a Llama from scratch on the recipe's data ranges (or a prune run's architecture, `like:`) with DeepSpeed ZeRO."""
    _run_stage("pretrain", recipe, overrides, executor, profile, runs_dir, array, dry_run, wait, new, sweep)


@app.command()
def retrain(recipe: RecipeArg, overrides: Overrides = None, executor: ExecutorOpt = "local", profile: Profile = None,
            runs_dir: RunsDir = None, array: ArrayOpt = None, dry_run: DryRun = False, wait: Wait = False,
            new: New = False, sweep: Sweep = None) -> None:
    """Retrain a pruned run for a token budget: sparse masks held, optional distillation from its parent."""
    _run_stage("retrain", recipe, overrides, executor, profile, runs_dir, array, dry_run, wait, new, sweep)


@app.command()
def prune(recipe: RecipeArg, overrides: Overrides = None, executor: ExecutorOpt = "local", profile: Profile = None,
          runs_dir: RunsDir = None, array: ArrayOpt = None, dry_run: DryRun = False, wait: Wait = False,
          new: New = False) -> None:
    """Prune a parent (run or Hugging Face directory) with one of the study's methods; writes model, masks, report."""
    _run_stage("prune", recipe, overrides, executor, profile, runs_dir, array, dry_run, wait, new)


def _run_stage(stage: str, recipe: str, overrides, executor: str, profile, runs_dir, array, dry_run: bool, wait: bool,
               new: bool, sweep: str | None = None) -> None:
    """plan (resolve, check) -> dry run, or submit one job / one array -> follow."""
    submission.check_executor(executor)
    root = store.runs_root(runs_dir)
    plan = submission.plan(stage, recipe, overrides or [], profile, root, array, sweep, dry_run)
    memory = train_stage.memory_line(root, plan.recipes[0], plan.res) if stage in ("pretrain", "retrain") else None
    if dry_run:
        for each in plan.recipes:
            render.rule(f"resolved recipe {each.name}")
            render.plain(recipes.dump(each))
        if memory:
            render.line(memory)
        render.rule(f"batch script ({executor} executor{', one array' if plan.array else ''})")
        folder = root / plan.recipes[0].name / "vNNN" / "logs"
        if executor == "slurm":
            render.plain(launch.batch_script(folder, plan.res, plan.recipes[0].name))
        else:
            render.plain(f"{executor}: {plan.res.world} rank(s) on this machine, {plan.res.cpus_per_task} CPU thread(s) "
                         f"each; logs in {folder}")
        return
    if memory:  # the preflight's estimate (a job that would not fit its GPUs was refused by the check)
        render.line(memory)
    submitted = submission.submit(plan, root, executor, new, render.line)
    if plan.choice is not None:
        losses = ", ".join(f"{lr}: {loss:.4f}" for lr, loss in plan.choice.final_train_loss.items())
        render.line(f"peak LR {plan.choice.chosen_lr:g}, the lowest training loss of {plan.recipes[0].name}'s sweep ({losses})")
    if executor != "slurm" or wait:
        with _stops_forwarded(executor, [job for _, job in submitted]):
            failed = []
            for run, job in submitted:
                render.follow(run, job)
                submission.settle(run, job)
                if not render.outcome(run):
                    failed.append(run)
        _reraise_debug(executor, [job for _, job in submitted])
        if sweep and not failed:
            from .stages.train import choose_lr

            render.sweep(choose_lr(root, recipe, plan.base, recipes.resolve(recipe, plan.base)))
        if failed:
            raise typer.Exit(1)


@contextlib.contextmanager
def _stops_forwarded(executor: str, jobs: list):
    """While the CLI follows local jobs, SIGINT/SIGTERM/SIGUSR2 ask their ranks to stop cleanly (a training
    rank checkpoints and leaves resumably) instead of killing the CLI and orphaning them."""
    if executor != "local":
        yield
        return

    def forward(signum, frame) -> None:
        if launch.stop_local(jobs):
            render.warn(f"[yellow]{signal.Signals(signum).name}[/]: stopping the job's ranks (a training run saves "
                        "a checkpoint first); the same command resumes it")

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reraise_debug(executor: str, jobs: list) -> None:
    """--executor debug with --debug: the job's own exception and traceback, here (never pdb)."""
    if executor == "debug" and os.environ.get("PRUNECTL_DEBUG") == "1":
        for job in jobs:
            result = getattr(job._submission, "_result", None)
            if isinstance(result, launch.Raised):
                raise result.error


# ---------------------------------------------------------------------------- eval


@app.command("eval")
def eval_(recipe: RecipeArg, overrides: Overrides = None, executor: ExecutorOpt = "local", profile: Profile = None,
          runs_dir: RunsDir = None, array: ArrayOpt = None, dry_run: DryRun = False, wait: Wait = False,
          force: Annotated[bool, typer.Option("--force", help="recompute even if this exact eval is stored")] = False,
          prefetch: Annotated[bool, typer.Option("--prefetch", help="on a login node: fill the HF cache for this suite")] = False) -> None:
    """Held-out loss, perplexity and lm-eval zero-shot accuracy of a run's final model, stored with that version."""
    import functools

    from .artifacts import EvalResults
    from .evaluate.config import results_path

    submission.check_executor(executor)
    variants = submission.array_variants(list(overrides or []), array, "run=tiny-parent,tiny-wanda-50")
    resolved = [submission.resolve_as("eval", recipe, v) for v in variants]
    root = store.runs_root(runs_dir)
    if prefetch:
        for line in eval_stage.prefetch(resolved[0]):
            render.line(line)
        return
    # lm-eval's task index takes seconds to build: check each distinct task list once
    targets, checked = [], set()
    for each in resolved:
        suite = json.dumps(each.eval.zero_shot.model_dump(), sort_keys=True)
        targets.append((each, *eval_stage.check(root, each, tasks=suite not in checked, includes=not dry_run)))
        checked.add(suite)
    res = launch.resources(resolved[0].launch, profile)
    todo = []
    for each, run, _ in targets:
        path = results_path(run.dir, each.eval)
        if path.exists() and not force:
            render.line(f"{run.ref} already has this eval: {path} (--force recomputes)")
            continue
        todo.append((each, run, path))
    if dry_run:
        for each, run, path in todo:
            render.rule(f"eval {run.ref} -> {path}")
            render.plain(recipes.dump(each))
        if executor == "slurm":
            render.plain(launch.batch_script(root / "eval-logs", res, resolved[0].name))
        return
    if not todo:
        return
    folder = todo[0][1].dir / "eval" / "logs" if len(todo) == 1 else root / "_eval" / f"{resolved[0].name}-{int(time.time())}"
    calls = [functools.partial(eval_stage.run, each, run.dir, force) for each, run, _ in todo]
    try:
        jobs = launch.submit(executor, res, resolved[0].name, calls, folder)
    except Exception as err:
        raise PrunectlError(f"submission failed: {submission.submit_error(err)}") from None
    for (_, run, _), job in zip(todo, jobs):
        render.line(f"submitted eval of {run.ref} as job {job.job_id} ({executor}); logs in {folder}")
    if executor != "slurm" or wait:
        failed = False
        with _stops_forwarded(executor, jobs):
            for (each, run, path), job in zip(todo, jobs):
                while not render.job_over(job):
                    time.sleep(1)
                if path.exists():
                    render.eval_results(EvalResults.read(path), path)
                else:
                    failed = True
                    render.warn(f"error: eval of {run.ref} failed: {launch.last_words(job)}", markup=False)
        _reraise_debug(executor, jobs)
        if failed:
            raise typer.Exit(1)


# ---------------------------------------------------------------------------- compare and study


@app.command()
def compare(
    recipe: Annotated[str, typer.Argument(help="compare recipe, or a study recipe (compares its newest submission)")],
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="show runs that are not token-matched, flagged")] = False,
) -> None:
    """The paper's tables (terminal, Markdown, CSV, LaTeX, JSON) and figures (PNG) from P-R_N runs and their twins."""
    r = recipes.resolve(recipe, overrides or [])
    root = store.runs_root(runs_dir)
    if isinstance(r, recipes.StudyRecipe):
        found = studies.newest_graph(root, r.name)
        if found is None:
            raise PrunectlError(f"{recipe}: study {r.name} has not been submitted under {root}; run `prunectl study {recipe}`")
        r, left_out = compare_stage.of_study(root, r, found[1])
        for line in left_out:
            render.warn(f"[yellow]left out[/] {line}")
    elif isinstance(r, recipes.CompareRecipe):
        left_out = []
    else:
        raise PrunectlError(f"{recipe}: is a {r.stage} recipe; `compare` takes a compare or study recipe")
    run, c, written = compare_stage.run_here(root, r, left_out, allow_mismatch)
    render.comparison(c)
    console.print(f"[green]complete[/] {run.ref}: " + ", ".join(p.name for p in written) + f" in {run.dir}")


@app.command()
def study(recipe: RecipeArg, overrides: Overrides = None, executor: ExecutorOpt = "local", profile: Profile = None,
          runs_dir: RunsDir = None, dry_run: DryRun = False, wait: Wait = False,
          as_json: Annotated[bool, typer.Option("--json", help="with --dry-run: the plan as JSON")] = False) -> None:
    """Submit a whole study: parent, prune runs, retrains, scratch twins, evals and the compare, chained by dependencies."""
    submission.check_executor(executor, ("slurm", "local"))
    r = submission.resolve_as("study", recipe, overrides or [])
    study_file = recipes.find_recipe(recipe)
    root = store.runs_root(runs_dir)
    planned = studies.Planner(root, study_file, r, True, executor)
    planned.build()  # every recipe of the study resolved before anything is written
    budget_rows, problems = studies.budgets(root, planned)
    if problems:  # estimated from the data recipes while the data is not prepared; each job checks again at its start
        raise PrunectlError(studies.one_budget_line(problems))
    if problems := studies.memory_problems(root, planned, profile):  # what would not fit its GPUs, before any queue
        raise PrunectlError(*problems)
    if dry_run:
        groups = list(studies.dry_run_groups(root, r, planned, executor, profile))
        if as_json:
            print(json.dumps({"budgets": budget_rows, "nodes": [n.model_dump() for n in planned.nodes],
                              "arrays": [{"title": title, "nodes": [n.key for n in bucket], "batch_script": script}
                                         for title, bucket, script in groups]}, indent=1))
            return
        render.budgets(budget_rows)
        render.graph(views.graph_rows(root, planned.nodes, live=False))
        for title, bucket, script in groups:
            render.rule(title)
            for n in bucket:
                render.plain(f"  {n.ref}  {n.source} {' '.join(n.overrides)}")
            if script:
                render.plain(script)
        return
    studies.check_ready(root, planned, profile)
    planner = studies.Planner(root, study_file, r, False, executor)
    planner.build_or_clean()
    reused = [n for n in planner.nodes if n.state == "reused" and n.group != "eval"]
    results = [n for n in planner.nodes if n.state == "reused" and n.group == "eval"]
    if reused or results:
        render.line(f"reusing {len(reused)} complete run(s) of these exact recipes and {len(results)} stored eval "
                    "result(s): " + ", ".join(n.ref for n in reused))
    def follow(pairs) -> None:
        with _stops_forwarded(executor, [job for _, job in pairs]):
            render.follow_many(root, pairs, studies.node_state)

    study_run = studies.submit(planner, executor, profile, render.line, follow)
    render.line(f"study {study_run.ref}: graph in {study_run.dir / 'graph.json'}; `prunectl status {r.name}` follows it")
    if executor == "slurm" and wait:
        compare_node, last = planner.nodes[-1], ""
        while studies.node_state(root, compare_node)[0] in ("new", "pending", "running", "unknown"):
            now = views.state_counts(root, planner.nodes)
            if now != last:  # one line whenever a node changes state
                render.line(f"{time.strftime('%H:%M:%S')}  {now}")
                last = now
            time.sleep(5)
    if executor != "slurm" or wait:
        render.graph(views.graph_rows(root, planner.nodes, live=True))
        compare_run = store.Run.of(root, planner.nodes[-1].ref)
        if not compare_run.is_complete():
            render.warn(f"error: {compare_run.ref} (the study's compare) failed: {compare_run.manifest().note}", markup=False)
            raise typer.Exit(1)
        from . import compare as cmp

        stored = recipes.load_run_recipe(compare_run.dir)
        render.comparison(cmp.build(root, stored.compare, stored.eval))
        render.line(f"tables and figures in {compare_run.dir}")


# ---------------------------------------------------------------------------- status


@app.command()
def status(
    recipe: Annotated[Optional[str], typer.Argument(help="recipe name or file; default: every run")] = None,
    runs_dir: RunsDir = None,
    as_json: Json = False,
) -> None:
    """Versions with stage, status, job id and Slurm state, tokens, peak LR (and where it came from), creation time."""
    from .sweep import sweep_name

    root = store.runs_root(runs_dir)
    name = None
    if recipe is not None:
        name = recipes.resolve(recipe).name if recipe.endswith((".yaml", ".yml")) or "/" in recipe else recipe
        store.check_name(name, "status")
        found = studies.newest_graph(root, name)
        if found is not None:
            study_run, graph = found
            rows = views.graph_rows(root, graph.nodes, live=True)
            if as_json:
                print(json.dumps({"study": study_run.ref, "executor": graph.executor, "nodes": rows}, indent=1))
                return
            render.line(f"study {study_run.ref} ({graph.executor} executor, {graph.study_file})")
            render.graph(rows)
            render.line(views.state_counts(root, graph.nodes))
            if any(row["state"] == "unknown" for row in rows):
                render.warn(f"[yellow]unknown[/]: {launch.squeue_error()}")
            return
    names = store.run_names(root) if name is None else [name]
    if name is not None:
        if not store.versions(root, name):
            raise PrunectlError(f"{recipe}: no runs under {root}")
        if store.versions(root, sweep_name(name)):
            names.append(sweep_name(name))
    rows, unreachable = views.run_rows(root, names)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    render.runs_table(rows)
    if unreachable:
        render.warn(f"[yellow]job states of running Slurm jobs are unknown[/]: {unreachable}")


try:  # typer >= 0.2x raises its own copies of click's exceptions
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover
    _TyperClickException = click.ClickException
_USAGE_ERRORS = (click.ClickException, _TyperClickException)


def main() -> None:
    """Exit codes a Makefile can trust: 0 every run completed (or was submitted, for Slurm without --wait);
    1 a run or job failed, or the system did (disk full, ...); 2 a user error (nothing was written);
    130 interrupted before anything was submitted. Each failure is one `error:` line; --debug shows tracebacks."""
    # Clusters without accounting (like slurm/local-cluster.sh) make submitit warn on every sacct poll;
    # prunectl reads job state from squeue and the run's manifest instead. (submitit reads this at import.)
    os.environ.setdefault("SUBMITIT_LOG_LEVEL", "ERROR")
    debug = "--debug" in sys.argv[1:2] or os.environ.get("PRUNECTL_DEBUG") == "1"
    for sig in (signal.SIGTERM, signal.SIGUSR2):  # work done here (data prepare, compare) stops as a failure
        signal.signal(sig, raise_stopped)
    try:
        code = app(standalone_mode=False, prog_name="prunectl")
    except PrunectlError as err:
        if debug:
            raise
        for problem in err.problems:
            err_console.print(f"error: {problem}", markup=False, highlight=False)
        sys.exit(2)
    except RunFailed as err:
        if debug:
            raise
        err_console.print(f"error: {err}", markup=False, highlight=False)
        sys.exit(1)
    except _USAGE_ERRORS as err:
        where = getattr(getattr(err, "ctx", None), "command_path", None) or "prunectl"
        message = " ".join(err.format_message().split())
        err_console.print(f"error: {where}: {message} (see `{where} --help`)", markup=False, highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except Stopped as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        sys.exit(1)
    except Exception as err:  # the system's fault, not the user's: one line, exit 1
        if debug:
            raise
        text = f"{type(err).__name__}: {err}".splitlines()[0][:400]
        err_console.print(f"error: {text} (--debug shows the traceback)", markup=False, highlight=False)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

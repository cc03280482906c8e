"""The prunectl command line: parse -> resolve -> launch. Logic lives in the modules it calls."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
import yaml
from rich.console import Console
from rich.table import Table

from . import checks, store
from . import recipe as recipes
from .errors import PrunectlError
from .launch import job_alive

app = typer.Typer( no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipes_app = typer.Typer(help="List and inspect recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare token data: shards and named disjoint ranges.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(data_app, name="data")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

RecipeArg = Annotated[str, typer.Argument(help="recipe file, or recipe name under recipes/")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides, e.g. train.tokens=2e6")]
RunsDir = Annotated[Optional[Path], typer.Option("--runs-dir", help="runs root (default: $PRUNECTL_RUNS or ./runs)")]
ExecutorOpt = Annotated[str, typer.Option("--executor", "-e", help="slurm | local | debug")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    """Prune a large parent or train the small model from scratch: token-matched studies on Slurm."""
    os.environ["PRUNECTL_DEBUG"] = "1" if debug else os.environ.get("PRUNECTL_DEBUG", "")


# ---------------------------------------------------------------------------- recipes


@recipes_app.command("ls")
def recipes_ls() -> None:
    """Every shipped recipe with its stage and description."""
    table = Table("name", "stage", "file", "description", box=None)
    for path in recipes.list_recipe_files():
        try:
            r = recipes.resolve(str(path))
            table.add_row(r.name, r.stage, str(path), r.description)
        except PrunectlError as err:
            table.add_row(recipes.default_name(path), "[red]invalid", str(path), err.problems[0])
    console.print(table)


@recipes_app.command("show")
def recipes_show(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resolved: Annotated[bool, typer.Option("--resolved", help="after extends, overrides and defaults")] = False,
) -> None:
    """Print a recipe file as written, or --resolved."""
    if resolved:
        console.print(recipes.dump(recipes.resolve(recipe, overrides or [])), end="", markup=False, highlight=False)
    else:
        console.print(recipes.find_recipe(recipe).read_text(), end="", markup=False, highlight=False)


# ---------------------------------------------------------------------------- data


@data_app.command("prepare")
def data_prepare(
    recipe: RecipeArg,
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    force: Annotated[bool, typer.Option("--force", help="prepare a new version even if an identical one exists")] = False,
) -> None:
    """Tokenize the recipe's corpora into shards with pretrain/retrain/validation ranges (runs here)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import data

    r = recipes.resolve(recipe, overrides or [])
    if not isinstance(r, recipes.DataRecipe):
        raise PrunectlError(f"{recipe}: is a {r.stage} recipe; `data prepare` takes a recipe with stage: data")
    root = store.runs_root(runs_dir)
    done = _prepared(root, r)
    if done and not force:
        console.print(f"{done.ref} already holds this exact recipe ({done.dir}); --force prepares it again")
        return
    run = store.allocate(root, r.name)
    try:
        (run.dir / "recipe.yaml").write_text(recipes.dump(r))
        run.write_manifest(store.Manifest(name=r.name, version=run.version, stage="data", status="running",
                                          executor="here", started=store.now()))
        staging = run.dir / "staging"
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True) as progress:
            meta = data.prepare(r.data, staging, progress)
        for child in staging.iterdir():
            os.replace(child, run.dir / child.name)
        staging.rmdir()
        summary = {"tokens": meta["total_tokens"], "documents": meta["documents"],
                   "vocab_size": meta["tokenizer"]["vocab_size"],
                   "unigram_entropy_nats": round(meta["unigram_entropy_nats"], 4),
                   "ranges": {k: [v["start"], v["end"]] for k, v in meta["ranges"].items()}}
        store.mark_complete(run, summary=summary)
    except PrunectlError:
        shutil.rmtree(run.dir, ignore_errors=True)  # a user error leaves nothing behind
        raise
    except BaseException as err:
        run.update(status="failed", finished=store.now(), note=f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    table = Table("range", "tokens", "documents", "offsets", box=None, title=f"{run.ref}  ({run.dir})")
    for name, info in meta["ranges"].items():
        table.add_row(name, f"{info['end'] - info['start']:,}", str(info["docs"]), f"[{info['start']:,}, {info['end']:,})")
    console.print(table)
    console.print(f"vocabulary {meta['tokenizer']['vocab_size']:,}; unigram entropy of pretrain "
                  f"{meta['unigram_entropy_nats']:.3f} nats/token")


# ---------------------------------------------------------------------------- pretrain


Profile = Annotated[Optional[str], typer.Option(help="Slurm profile in slurm/profiles (default: the recipe's)")]
ArrayOpt = Annotated[Optional[str], typer.Option("--array", help="key=v1,v2,...: one run per value, one job array")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe and batch script; write nothing")]
Wait = Annotated[bool, typer.Option("--wait", help="follow a Slurm job until it ends (local and debug always do)")]
New = Annotated[bool, typer.Option("--new", help="always start a new version instead of resuming an interrupted one")]
Sweep = Annotated[Optional[str], typer.Option(
    "--sweep", help="lr: submit the recipe's LR-sweep prefix runs as one job array (a later plain run uses the winner)")]


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
    """resolve -> check inputs -> allocate versions -> submit (one job, or one array) -> follow."""
    from . import launch
    from . import sweep as sweeps

    if executor not in ("slurm", "local", "debug"):
        raise PrunectlError(f"--executor: '{executor}' is not one of slurm, local, debug")
    if sweep is not None and sweep != "lr":
        raise PrunectlError(f"--sweep: '{sweep}' is not a sweep prunectl runs; the one it runs is --sweep lr")
    if sweep and array:
        raise PrunectlError("--sweep and --array each submit one job array; give one of them")
    base = list(overrides or [])
    variants = _array_variants(base, array, "train.seed=0,1,2")
    r = recipes.resolve(recipe, base)
    if r.stage != stage:
        raise PrunectlError(f"{recipe}: is a {r.stage} recipe; `{stage}` takes a recipe with stage: {stage}")
    choice, sweep_cfg = None, getattr(r, "sweep", None)
    if sweep:
        if r.sweep is None:
            raise PrunectlError(f"--sweep lr: {r.name} has no sweep section (sweep: {{lrs: [...], prefix_tokens: N}})")
        variants = [[*base, *sweeps.prefix_overrides(r.name, r.sweep, lr)] for lr in r.sweep.lrs]
        array = "sweep"
    elif getattr(r, "sweep", None) is not None and not dry_run:
        choice = sweeps.choose(store.runs_root(runs_dir), recipe, base, r)
        variants = [[*v, f"optimizer.lr={choice.chosen_lr!r}"] for v in variants]
    resolved = [recipes.resolve(recipe, v) for v in variants]
    r = resolved[0]
    root = store.runs_root(runs_dir)
    res = launch.resources(r.launch, profile)
    if sweep and sweep_cfg.parallelism:
        res = res.model_copy(update={"array_parallelism": sweep_cfg.parallelism})
    inputs = [checks.check(stage, root, each, res) for each in resolved]

    if dry_run:
        for each in resolved:
            console.rule(f"resolved recipe {each.name}")
            console.print(recipes.dump(each), markup=False, highlight=False)
        console.rule(f"batch script ({executor} executor{', one array' if array else ''})")
        folder = root / r.name / "vNNN" / "logs"
        if executor == "slurm":
            console.print(launch.batch_script(folder, res, r.name), markup=False, highlight=False)
        else:
            console.print(f"{executor}: {res.world} rank(s) on this machine, {res.cpus_per_task} CPU thread(s) each; "
                          f"logs in {folder}", markup=False)
        return

    runs, fresh = [], []
    for each, ins in zip(resolved, inputs):
        run = None if array else _resumable(root, each, new)
        if run is None:
            run = store.allocate(root, each.name)
            fresh.append(run)
            (run.dir / "recipe.yaml").write_text(recipes.dump(each))
            manifest = store.Manifest(name=each.name, version=run.version, stage=stage, inputs=ins, executor=executor)
            if choice is not None:
                manifest = manifest.model_copy(update={"lr_sweep": choice.model_dump()})
            run.write_manifest(manifest)
        else:
            console.print(f"resuming {run.ref}" + (" from its newest complete checkpoint" if stage != "prune" else ""))
            run.update(executor=executor, status="pending", finished=None)
        runs.append(run)
    try:
        jobs = launch.submit(executor, res, r.name, stage, [run.dir for run in runs])
    except Exception as err:  # sbatch refused (bad partition, account, ...): leave no pending run behind
        for run in runs:
            if run in fresh:
                shutil.rmtree(run.dir, ignore_errors=True)
            else:
                run.update(status="failed", finished=store.now(), note="resubmission failed")
        raise PrunectlError(f"submission failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}") from None
    for run, job in zip(runs, jobs):
        manifest = run.manifest()
        if str(job.job_id) not in manifest.job_ids:
            run.update(job_ids=[*manifest.job_ids, str(job.job_id)])
        console.print(f"submitted {run.ref} as job {job.job_id} ({executor}); run directory {run.dir}")
    if choice is not None:
        console.print(f"peak LR {choice.chosen_lr:g}, the lowest training loss of {r.name}'s sweep "
                      f"({', '.join(f'{lr}: {loss:.4f}' for lr, loss in choice.final_train_loss.items())})")
    if executor != "slurm" or wait:
        failed = [run for run, job in zip(runs, jobs) if not _follow(run, job)]
        if sweep and not failed:
            chosen = sweeps.choose(root, recipe, base, recipes.resolve(recipe, base))
            _print_sweep(chosen)
        if failed:
            raise typer.Exit(1)


def _array_variants(base: list[str], array: str | None, example: str) -> list[list[str]]:
    """The overrides of each job: one per value of --array key=v1,v2,... (just `base` without it)."""
    if array is None:
        return [base]
    key, sep, values = array.partition("=")
    if not sep or not key or not values:
        raise PrunectlError(f"--array: '{array}' is not key=v1,v2,... e.g. --array {example}")
    return [[*base, f"{key}={v}"] for v in values.split(",")]


def _print_sweep(choice) -> None:
    from . import sweep as sweeps

    table = Table("peak lr", "prefix run", "train loss at prefix end", "", box=None,
                  title=f"LR sweep over {choice.prefix_tokens:,}-token prefixes")
    for row in sweeps.describe(choice):
        table.add_row(row["lr"], row["run"], f"{row['final_train_loss']:.4f}", "[green]chosen" if row["chosen"] else "")
    console.print(table)


def _resumable(root: Path, r, new: bool) -> store.Run | None:
    """The newest version of this exact recipe, if it was interrupted and nothing is running it."""
    runs = store.versions(root, r.name)
    if new or not runs:
        return None
    run = runs[-1]
    manifest = run.manifest()
    same = (run.dir / "recipe.yaml").exists() and (run.dir / "recipe.yaml").read_text() == recipes.dump(r)
    if manifest is None or manifest.status == "complete" or not same:
        return None
    if job_alive(manifest):
        raise PrunectlError(f"{run.ref}: is still {manifest.status} (job {', '.join(manifest.job_ids)}); "
                            "wait for it, cancel it, or pass --new for a separate version")
    return run


def _job_over(job) -> bool:
    """Local jobs: submitit knows. Slurm jobs: the result file, else squeue (submitit's done() polls sacct,
    which clusters without accounting answer with an error on stderr, and it waits forever for the result
    file of a cancelled job)."""
    if type(job).__name__ != "SlurmJob":
        return job.done()
    if job.paths.result_pickle.exists():
        return True
    from . import launch

    try:
        for _ in range(3):  # a requeued job is briefly absent between its two lives
            if launch.slurm_state(str(job.job_id)) is not None:
                return False
            time.sleep(2)
    except launch.SlurmUnreachable as e:  # unknown is not over: keep waiting, and say why once
        if str(e) not in _WARNED:
            _WARNED.add(str(e))
            err_console.print(f"[yellow]{e}; still waiting", highlight=False)
        return False
    return True


_WARNED: set[str] = set()


def _progress_of(run: store.Run) -> dict:
    """A progress bar's step, total and info line from the run's metrics.jsonl and manifest."""
    metrics = run.dir / "metrics.jsonl"
    if not metrics.exists():
        return {}
    last = {k: v for line in metrics.read_text().splitlines()[-3:] for k, v in json.loads(line).items()}
    info = "  ".join(f"{k} {last[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if last.get(k) is not None)
    if "phase" in last:
        info = f"{last['phase']} ({last['event']})"
    manifest = run.manifest()
    return {"total": manifest.summary.get("steps") if manifest else None, "completed": last.get("step", 0), "info": info}


def _follow(run: store.Run, job) -> bool:
    """A progress bar fed by the run's metrics.jsonl until the job ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err_console) as progress:
        task = progress.add_task(run.ref, total=None, info="starting")
        while not _job_over(job):
            progress.update(task, **_progress_of(run))
            time.sleep(0.5)
    manifest = run.manifest()
    if manifest and manifest.status == "complete" and manifest.stage == "prune":
        from .prune.stage import load_report, print_report

        print_report(load_report(run.dir), console)
        console.print(f"[green]complete[/] {run.ref}; model in {run.final}")
        return True
    if manifest and manifest.status == "complete":
        summary = manifest.summary
        where = f"model in {run.final}" if run.final.exists() else "prefix run: no model kept"
        sparse = f", masked weights all zero (sparsity {summary['mask_sparsity']:.1%})" if "mask_sparsity" in summary else ""
        console.print(f"[green]complete[/] {run.ref}: {summary.get('tokens', 0):,} tokens, train loss "
                      f"{summary.get('final_train_loss') or float('nan'):.4f}, held-out loss "
                      f"{summary.get('final_val_loss') or float('nan'):.4f} (unigram entropy "
                      f"{summary.get('unigram_entropy_nats', float('nan')):.4f}){sparse}; {where}")
        return True
    logs = sorted((run.dir / "logs").glob("*_0_log.err"))
    note = manifest.note if manifest else "no manifest"
    err_console.print(f"[red]{run.ref} did not complete[/]: {note}")
    if logs:
        err_console.print(f"log: {logs[-1]}")
    return False


# ---------------------------------------------------------------------------- eval


@app.command("eval")
def eval_(recipe: RecipeArg, overrides: Overrides = None, executor: ExecutorOpt = "local", profile: Profile = None,
          runs_dir: RunsDir = None, array: ArrayOpt = None, dry_run: DryRun = False, wait: Wait = False,
          force: Annotated[bool, typer.Option("--force", help="recompute even if this exact eval is stored")] = False,
          prefetch: Annotated[bool, typer.Option("--prefetch", help="on a login node: fill the HF cache for this suite")] = False) -> None:
    """Held-out loss, perplexity and lm-eval zero-shot accuracy of a run's final model, stored with that version."""
    from . import launch
    from .evaluate import harness
    from .evaluate.stage import check, results_path

    if executor not in ("slurm", "local", "debug"):
        raise PrunectlError(f"--executor: '{executor}' is not one of slurm, local, debug")
    variants = _array_variants(list(overrides or []), array, "run=tiny-parent,tiny-wanda-50")
    resolved = [recipes.resolve(recipe, v) for v in variants]
    if resolved[0].stage != "eval":
        raise PrunectlError(f"{recipe}: is a {resolved[0].stage} recipe; `eval` takes a recipe with stage: eval")
    root = store.runs_root(runs_dir)
    if prefetch:
        from datasets import load_dataset

        r = resolved[0]
        for corpus in r.eval.perplexity:
            if corpus.dataset:
                with harness.offline(False):
                    load_dataset(corpus.dataset, corpus.subset, split=corpus.split, data_files=corpus.files())
                console.print(f"cached {corpus.dataset} {corpus.subset or ''} {corpus.split}")
        hub = [t for t in r.eval.zero_shot.tasks if not t.endswith("-continuation")]
        if hub:
            harness.prefetch(hub, [Path(p) for p in r.eval.zero_shot.include])
            console.print(f"cached the data of {', '.join(hub)}")
        return
    # lm-eval's task index takes seconds to build: check each distinct task list once
    targets, checked = [], set()
    for each in resolved:
        suite = json.dumps(each.eval.zero_shot.model_dump(), sort_keys=True)
        targets.append((each, *check(root, each, tasks=suite not in checked)))
        checked.add(suite)
    res = launch.resources(resolved[0].launch, profile)
    todo = []
    for each, run, _ in targets:
        path = results_path(run.dir, each.eval)
        if path.exists() and not force:
            console.print(f"{run.ref} already has this eval: {path} (--force recomputes)")
            continue
        todo.append((each, run, path))
    if dry_run:
        for each, run, path in todo:
            console.rule(f"eval {run.ref} -> {path}")
            console.print(recipes.dump(each), markup=False, highlight=False)
        if executor == "slurm":
            console.print(launch.batch_script(root / "eval-logs", res, resolved[0].name), markup=False, highlight=False)
        return
    if not todo:
        return
    folder = todo[0][1].dir / "eval" / "logs" if len(todo) == 1 else root / "_eval" / f"{resolved[0].name}-{int(time.time())}"
    options = [{"cfg_json": each.eval.model_dump_json(), "force": force} for each, _, _ in todo]
    try:
        jobs = launch.submit(executor, res, resolved[0].name, "eval", [run.dir for _, run, _ in todo], options, folder)
    except Exception as err:
        raise PrunectlError(f"submission failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}") from None
    for (_, run, _), job in zip(todo, jobs):
        console.print(f"submitted eval of {run.ref} as job {job.job_id} ({executor}); logs in {folder}")
    if executor != "slurm" or wait:
        failed = False
        for (each, run, path), job in zip(todo, jobs):
            while not _job_over(job):
                time.sleep(1)
            if path.exists():
                _print_eval(json.loads(path.read_text()), path)
            else:
                failed = True
                logs = sorted(Path(folder).rglob("*_log.err"))
                err_console.print(f"[red]eval of {run.ref} did not complete[/]" + (f"; log: {logs[-1]}" if logs else ""))
        if failed:
            raise typer.Exit(1)


def _print_eval(results: dict, path: Path) -> None:
    table = Table("measure", "value", "± stderr", "N / tokens", "tokens/s", box=None, title=f"{results['run']}  ({path.name})")
    if "heldout" in results:
        h = results["heldout"]
        table.add_row(f"held-out loss ({h['range']})", f"{h['loss']:.4f}", "", f"{h['tokens']:,}", f"{h['tokens_per_s']:,.0f}")
    for name, p in results.get("perplexity", {}).items():
        table.add_row(f"perplexity {name}", f"{p['perplexity']:.3f}", "", f"{p['tokens']:,}", f"{p['tokens_per_s']:,.0f}")
    for task, t in results.get("zero_shot", {}).get("tasks", {}).items():
        table.add_row(f"{task} ({t['metric']})", f"{t['value']:.4f}", f"{t.get(t['metric'] + '_stderr', float('nan')):.4f}", str(t["n"]), "")
    avg = results.get("zero_shot", {}).get("average")
    if avg is not None:
        table.add_row("average accuracy", f"{avg:.4f}", "", "", "")
    console.print(table)


# ---------------------------------------------------------------------------- compare and study


@app.command()
def compare(
    recipe: Annotated[str, typer.Argument(help="compare recipe, or a study recipe (compares its newest submission)")],
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="show runs that are not token-matched, flagged")] = False,
) -> None:
    """The paper's tables (terminal, Markdown, CSV, LaTeX, JSON) and figures (PNG) from P-R_N runs and their twins."""
    from . import compare as cmp

    r = recipes.resolve(recipe, overrides or [])
    root = store.runs_root(runs_dir)
    if isinstance(r, recipes.StudyRecipe):
        from .evaluate.stage import EvalConfig
        from .study import load_graph

        submitted = [run for run in store.versions(root, r.name) if (run.dir / "graph.json").exists()]
        if not submitted:
            raise PrunectlError(f"{recipe}: study {r.name} has not been submitted under {root}; run `prunectl study {recipe}`")
        graph, _ = load_graph(submitted[-1])
        eval_cfg, name = EvalConfig.model_validate(graph["eval"]), f"{r.name}-compare"
        methods, left_out = cmp.complete_methods(root, graph["methods"], eval_cfg)
        for line in left_out:
            err_console.print(f"[yellow]left out[/] {line}", highlight=False)
        cfg = cmp.CompareConfig(perplexity=r.perplexity, methods=methods)
    elif isinstance(r, recipes.CompareRecipe):
        cfg, name, left_out = r.compare, r.name, []
        eval_cfg = r.eval if not isinstance(r.eval, str) else recipes.resolve(r.eval).eval
    else:
        raise PrunectlError(f"{recipe}: is a {r.stage} recipe; `compare` takes a compare or study recipe")
    c = cmp.build(root, cfg, eval_cfg, allow_mismatch)
    run = store.allocate(root, name)
    run.write_manifest(store.Manifest(name=name, version=run.version, stage="compare", status="running", executor="here",
                                      started=store.now()))
    try:
        text = recipes.dump(recipes.CompareRecipe(name=name, stage="compare", eval=eval_cfg, compare=cfg,
                                                  description=f"compare {recipe}"))
        written = cmp.publish(run, text, c, left_out)
    except BaseException as err:
        run.update(status="failed", finished=store.now(), note=f"{type(err).__name__}: {err}".splitlines()[0][:500])
        raise
    _print_comparison(c)
    console.print(f"[green]complete[/] {run.ref}: " + ", ".join(p.name for p in written) + f" in {run.dir}")


def _print_comparison(c) -> None:
    from . import compare as cmp

    for t in cmp.tables(c):
        table = Table(*t.columns, box=None, title=t.title, caption=t.note, caption_justify="left")
        for row in t.rows:
            table.add_row(*[f"[dim]{cell.text()}[/]" if cell.within_stderr else cell.text() for cell in row])
        console.print(table)
        console.print()
    for problem in c.problems:
        err_console.print(f"[yellow]not token-matched[/]: {problem}")
    wins = cmp.finding_1(c)
    if wins:
        verdict = "every method" if all(wins.values()) else f"{sum(wins.values())} of {len(wins)} methods"
        console.print(f"Finding 1: the pruned initialisation beats its scratch twin at equal training tokens for "
                      f"{verdict}" + ("" if all(wins.values()) else f" (not: {', '.join(k for k, v in wins.items() if not v)})"))


@app.command()
def study(recipe: RecipeArg, overrides: Overrides = None, executor: ExecutorOpt = "local", profile: Profile = None,
          runs_dir: RunsDir = None, dry_run: DryRun = False, wait: Wait = False) -> None:
    """Submit a whole study: parent, prune runs, retrains, scratch twins, evals and the compare, chained by dependencies."""
    from . import launch
    from . import study as studies

    if executor not in ("slurm", "local"):
        raise PrunectlError(f"--executor: a study runs on slurm or local, not '{executor}'")
    r = recipes.resolve(recipe, overrides or [])
    if not isinstance(r, recipes.StudyRecipe):
        raise PrunectlError(f"{recipe}: is a {r.stage} recipe; `study` takes a recipe with stage: study")
    study_file = recipes.find_recipe(recipe)
    root = store.runs_root(runs_dir)
    data_refs = []
    for entry in r.data:
        data_path = studies.recipe_path(study_file, entry)
        data_recipe = recipes.resolve(data_path)
        if data_recipe.stage != "data":
            raise PrunectlError(f"data: {entry} is a {data_recipe.stage} recipe; a study's data entries are data recipes")
        done = _prepared(root, data_recipe)
        if done is None and not dry_run:
            data_prepare(data_path, runs_dir=runs_dir)
            done = _prepared(root, data_recipe)
        data_refs.append(done.ref if done else f"{data_recipe.name}@vNNN")
    planned = studies.Planner(root, study_file, r, data_refs, True, executor)
    planned.build()
    if dry_run:
        _print_plan(root, r, study_file, data_refs, planned, executor, profile)
        return
    for n in planned.nodes:  # check now what can be checked; each job checks the rest when it starts
        if n.state == "planned" and n.group in ("parent", "prune", "retrain", "scratch") and \
                all(by.state == "reused" for by in planned.nodes if by.key in n.deps):
            each = recipes.resolve(n.source, n.overrides)
            checks.check(n.stage, root, each, launch.resources(each.launch, profile))
    planner = studies.Planner(root, study_file, r, data_refs, False, executor)
    try:
        planner.build()
    except BaseException:
        for run in planner.fresh:
            shutil.rmtree(run.dir, ignore_errors=True)
        raise
    reused = [n for n in planner.nodes if n.state == "reused" and n.group != "eval"]
    results = [n for n in planner.nodes if n.state == "reused" and n.group == "eval"]
    if reused or results:
        console.print(f"reusing {len(reused)} complete run(s) of these exact recipes and {len(results)} stored eval "
                      "result(s): " + ", ".join(n.ref for n in reused), highlight=False)
    study_run = studies.submit(planner, executor, profile, lambda line: console.print(line, highlight=False),
                               lambda pairs: _follow_nodes(root, pairs))
    console.print(f"study {study_run.ref}: graph in {study_run.dir / 'graph.json'}; `prunectl status {r.name}` follows it")
    if executor == "slurm" and wait:
        compare_node, last = planner.nodes[-1], ""
        while studies.node_state(root, compare_node)[0] in ("new", "pending", "running", "unknown"):
            states = [studies.node_state(root, n)[0].split()[0] for n in planner.nodes]
            line = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
            if line != last:  # one line whenever a node changes state
                console.print(f"{time.strftime('%H:%M:%S')}  {line}", highlight=False)
                last = line
            time.sleep(5)
    if executor != "slurm" or wait:
        _print_graph(root, planner.nodes, live=True)
        compare_run = store.Run.of(root, planner.nodes[-1].ref)
        if not compare_run.is_complete():
            err_console.print(f"[red]the study's compare did not complete[/]: {compare_run.manifest().note}")
            raise typer.Exit(1)
        from . import compare as cmp

        stored = recipes.load_run_recipe(compare_run.dir)
        _print_comparison(cmp.build(root, stored.compare, stored.eval))
        console.print(f"tables and figures in {compare_run.dir}")


def _print_plan(root: Path, r, study_file: Path, data_refs: list[str], planned, executor: str, profile) -> None:
    """--dry-run: the graph, then each group's jobs and the batch script that would submit them."""
    from . import launch
    from . import study as studies

    for entry, ref in zip(r.data, data_refs):
        console.print(f"data: `prunectl data prepare {studies.recipe_path(study_file, entry)}` here, first ({ref})",
                      highlight=False)
    _print_graph(root, planned.nodes, live=False)
    by_key = {n.key: n for n in planned.nodes}
    for group in studies.GROUPS:
        todo = [n for n in planned.nodes if n.group == group and n.state in ("planned", "resume")]
        for res, bucket in studies._buckets(todo, profile, planned):
            deps = sorted({by_key[d].key for n in bucket for d in n.deps if by_key[d].state != "reused"})
            console.rule(f"{group}: {len(bucket)} job(s){' as one array' if len(bucket) > 1 else ''}"
                         + (f", after {len(deps)} input job(s)" if deps else ""))
            for n in bucket:
                console.print(f"  {n.ref}  {n.source} {' '.join(n.overrides)}", markup=False, highlight=False)
            if executor == "slurm":
                folder = root / r.name / "vNNN" / "logs" / group
                script = launch.batch_script(folder, res, f"{r.name}-{group}",
                                             "afterany:<job ids of " + ", ".join(deps) + ">" if deps else None)
                console.print(script, markup=False, highlight=False)


def _follow_nodes(root: Path, pairs: list) -> None:
    """Local study: one progress bar per running node (steps from its metrics.jsonl) until every job ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import study as studies

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        tasks = [progress.add_task(f"{n.group} {n.ref}", total=None, info="starting") for n, _ in pairs]
        while not all(_job_over(job) for _, job in pairs):
            for (n, _), task in zip(pairs, tasks):
                if n.group not in ("eval", "compare"):
                    progress.update(task, **_progress_of(store.Run.of(root, n.ref)))
            time.sleep(0.5)
    for n, _ in pairs:
        state, note = studies.node_state(root, n)
        color = "green" if state in ("complete", "reused") else "red"
        console.print(f"[{color}]{state}[/] {n.group} {n.ref}" + (f": {note}" if note else ""), highlight=False)


def _prepared(root: Path, r) -> store.Run | None:
    """The newest complete data run of exactly this recipe."""
    done = [run for run in store.versions(root, r.name)
            if run.is_complete() and (run.dir / "recipe.yaml").read_text() == recipes.dump(r)]
    return done[-1] if done else None


def _print_graph(root: Path, nodes, live: bool) -> None:
    from . import study as studies

    table = Table("stage", "run", "state", "job", "after", "note", box=None)
    color = {"complete": "green", "reused": "green", "failed": "red", "skipped": "red"}
    for n in nodes:
        state, note = studies.node_state(root, n) if live else (n.state, "")
        after = ", ".join(d.split("/", 1)[1] for d in n.deps) if len(n.deps) <= 2 else f"{len(n.deps)} runs"
        label = {"eval": f"eval of {n.ref}", "sweep": f"{n.ref} {n.key.rsplit('/', 1)[-1]}"}.get(n.group, n.ref)
        table.add_row(n.group, label, f"[{color.get(state.split()[0], 'yellow')}]{state}", n.job or "", after, note or "")
    console.print(table)


# ---------------------------------------------------------------------------- status


@app.command()
def status(
    recipe: Annotated[Optional[str], typer.Argument(help="recipe name or file; default: every run")] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Versions with stage, status, job id and Slurm state, tokens, peak LR (and where it came from), creation time."""
    from . import launch
    from .sweep import sweep_name

    root = store.runs_root(runs_dir)
    if recipe is not None and _show_study(root, recipe):
        return
    if recipe is None:
        names = store.run_names(root)
    else:
        names = [recipes.resolve(recipe).name if recipe.endswith((".yaml", ".yml")) or "/" in recipe else recipe]
        if not store.versions(root, names[0]):
            raise PrunectlError(f"{recipe}: no runs under {root}")
        if store.versions(root, sweep_name(names[0])):
            names.append(sweep_name(names[0]))
    table = Table("run", "stage", "status", "job", "slurm", "tokens", "lr", "created", "note", box=None)
    unreachable = None
    for name in names:
        for run in store.versions(root, name):
            m = run.manifest()
            if m is None:
                table.add_row(run.ref, "?", "[yellow]allocating", "", "", "", "", "no manifest yet")
                continue
            job = m.job_ids[-1] if m.job_ids else ""
            state = m.status
            try:
                slurm = launch.slurm_state(job) if job and m.executor == "slurm" else None
                if state in ("running", "pending") and not job_alive(m):
                    state = f"{state} (lost)"
            except launch.SlurmUnreachable as e:
                slurm, unreachable = "unknown", str(e)
            color = {"complete": "green", "failed": "red"}.get(m.status, "yellow")
            tokens = m.data.tokens if m.data else m.summary.get("tokens")
            table.add_row(run.ref, m.stage, f"[{color}]{state}", job, slurm or "", f"{tokens:,}" if tokens else "",
                          _lr_cell(run, m), m.created.replace("T", " ")[:19], m.note or "")
    console.print(table)
    if unreachable:
        err_console.print(f"[yellow]job states of running Slurm jobs are unknown[/]: {unreachable}", highlight=False)


def _show_study(root: Path, recipe: str) -> bool:
    """`status STUDY`: the newest submission's graph with each node's state now."""
    from . import launch
    from . import study as studies

    name = recipes.resolve(recipe).name if recipe.endswith((".yaml", ".yml")) else recipe
    submitted = [run for run in store.versions(root, name) if (run.dir / "graph.json").exists()]
    if not submitted:
        return False
    graph, nodes = studies.load_graph(submitted[-1])
    console.print(f"study {submitted[-1].ref} ({graph['executor']} executor, {graph['study_file']})", highlight=False)
    _print_graph(root, nodes, live=True)
    states = [studies.node_state(root, n)[0].split()[0] for n in nodes]
    console.print(", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)))
    if "unknown" in states:
        err_console.print(f"[yellow]unknown[/]: {launch.squeue_error()}", highlight=False)
    return True


def _lr_cell(run: store.Run, m: store.Manifest) -> str:
    """A training run's peak LR: 'by sweep' when a sweep chose it, the prefix loss for a sweep's own runs."""
    if m.stage not in ("pretrain", "retrain"):
        return ""
    sweep = getattr(m, "lr_sweep", None)
    if sweep:
        return f"{sweep['chosen_lr']:g} (by sweep)"
    try:
        lr = yaml.safe_load((run.dir / "recipe.yaml").read_text())["optimizer"]["lr"]
    except (OSError, KeyError, TypeError):
        return ""
    loss = m.summary.get("final_train_loss")
    return f"{lr:g} (prefix loss {loss:.4f})" if m.summary.get("steps") and run.name.endswith("-lrsweep") and loss else f"{lr:g}"


def main() -> None:
    # Clusters without accounting (like slurm/local-cluster.sh) make submitit warn on every sacct poll;
    # prunectl reads job state from squeue and the run's manifest instead. (submitit reads this at import.)
    os.environ.setdefault("SUBMITIT_LOG_LEVEL", "ERROR")
    try:
        app(standalone_mode=False)
    except PrunectlError as err:
        if os.environ.get("PRUNECTL_DEBUG") == "1":
            raise
        for problem in err.problems:
            err_console.print(f"error: {problem}", markup=False)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)

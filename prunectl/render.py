"""Everything prunectl prints: rich tables of runs, reports, evals, comparisons and study graphs, and the
progress bars that follow jobs. Commands decide what to show; this module decides how it looks."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import launch, metrics, store
from .artifacts import summary_of

if TYPE_CHECKING:
    from .artifacts import DataMeta, EvalResults, PruneReport, StudyNode
    from .compare import Comparison
    from .sweep import SweepChoice

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def line(text: str) -> None:
    console.print(text, highlight=False)


def plain(text: str) -> None:
    """Text shown exactly as it is (recipes, batch scripts)."""
    console.print(text, markup=False, highlight=False)


def warn(text: str, markup: bool = True) -> None:
    err_console.print(text, highlight=False, markup=markup)


def rule(title: str) -> None:
    console.rule(title)


# ---------------------------------------------------------------------------- following jobs


def _unknown_once(why: str, _seen: set[str] = set()) -> None:
    if why not in _seen:
        _seen.add(why)
        warn(f"[yellow]{why}; still waiting")


def job_over(job) -> bool:
    return launch.job_over(job, _unknown_once)


def _progress_fields(run: store.Run) -> dict[str, Any]:
    """A progress bar's step, total and info line from the run's metrics.jsonl and manifest."""
    now = metrics.progress(run.dir / "metrics.jsonl")
    if now is None:
        return {}
    manifest = run.manifest()
    total = summary_of(manifest).model_dump().get("steps") if manifest else None
    return {"total": total, "completed": now["step"], "info": now["info"]}


def progress_bar() -> Progress:
    """A bar for work done here (data preparation): description, bar, count, time."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=not err_console.is_terminal)


def _bars() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err_console, transient=True,
                    disable=not err_console.is_terminal)  # a bar in a log file is noise (and a stray blank line)


def follow(run: store.Run, job) -> None:
    """A progress bar fed by the run's metrics.jsonl until the job ends (then `outcome` says how)."""
    with _bars() as progress:
        task = progress.add_task(run.ref, total=None, info="starting")
        while not job_over(job):
            progress.update(task, **_progress_fields(run))
            time.sleep(0.5)


def follow_many(root: Path, pairs: list[tuple[StudyNode, Any]], node_state) -> None:
    """A study's wave: one bar per running node until every job ends, then each node's state."""
    with _bars() as progress:
        tasks = [progress.add_task(f"{n.group} {n.ref}", total=None, info="starting") for n, _ in pairs]
        while not all(job_over(job) for _, job in pairs):
            for (n, _), task in zip(pairs, tasks):
                if n.group not in ("eval", "compare"):
                    progress.update(task, **_progress_fields(store.Run.of(root, n.ref)))
            time.sleep(0.5)
    for n, _ in pairs:
        state, note = node_state(root, n)
        color = "green" if state in ("complete", "reused") else "red"
        console.print(f"[{color}]{state}[/] {n.group} {n.ref}" + (f": {note}" if note else ""), highlight=False)


def outcome(run: store.Run) -> bool:
    """A finished run in one line (a prune run with its report); False when it did not complete."""
    from .artifacts import PruneReport

    manifest = run.manifest()
    if manifest and manifest.status == "complete" and manifest.stage == "prune":
        prune_report(PruneReport.read(run.dir))
        console.print(f"[green]complete[/] {run.ref}; model in {run.final}")
        return True
    if manifest and manifest.status == "complete":
        s = summary_of(manifest)
        where = f"model in {run.final}" if run.final.exists() else "prefix run: no model kept"
        sparse = f", masked weights all zero (sparsity {s.mask_sparsity:.1%})" if s.mask_sparsity is not None else ""
        nan = float("nan")
        console.print(f"[green]complete[/] {run.ref}: {s.tokens or 0:,} tokens, train loss "
                      f"{s.final_train_loss or nan:.4f}, held-out loss {s.final_val_loss or nan:.4f} (unigram entropy "
                      f"{s.unigram_entropy_nats if s.unigram_entropy_nats is not None else nan:.4f}){sparse}; {where}")
        return True
    logs = sorted((run.dir / "logs").glob("**/*_0_log.err"), key=lambda p: p.stat().st_mtime)
    note = (manifest.note if manifest else None) or "no reason recorded"
    log = f" (log: {logs[-1]})" if logs and "log: " not in note else ""
    err_console.print(f"error: {run.ref} failed: {note}{log}", markup=False, highlight=False)
    return False


# ---------------------------------------------------------------------------- stage outputs


def data_prepared(run: store.Run, meta: DataMeta) -> None:
    table = Table("range", "tokens", "documents", "offsets", box=None, title=f"{run.ref}  ({run.dir})")
    for name, info in meta.ranges.items():
        table.add_row(name, f"{info.tokens:,}", str(info.docs), f"[{info.start:,}, {info.end:,})")
    console.print(table)
    console.print(f"vocabulary {meta.tokenizer.vocab_size:,}; unigram entropy of pretrain "
                  f"{meta.unigram_entropy_nats:.3f} nats/token")


def prune_report(report: PruneReport) -> None:
    """The terminal view of report.json."""
    before, after = report.architecture["before"], report.architecture["after"]
    from .prune.budget import MEASURES
    from .prune.sparse import describe_pattern

    flap = f" ({report.flap['statistics']} statistics)" if report.flap else ""
    # older reports state their basis as a phrase
    basis = f"of {MEASURES[report.ratio_of]}" if report.ratio_of in MEASURES else f"({report.ratio_of})"
    t = Table(title=f"{report.method}{' ' + describe_pattern(report.pattern) if report.pattern else ''}{flap}: "
                    f"target {report.target_ratio:.1%}, achieved {report.achieved_ratio:.1%} {basis}")
    t.add_column("")
    t.add_column("parent", justify="right")
    t.add_column("pruned", justify="right")
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn"):
        t.add_row(key, str(before[key]), str(after[key]))
    p = report.parameters
    t.add_row("parameters", f"{p['before']['total']:,}", f"{p['after']['total']:,}")
    t.add_row("non-zero", f"{p['before']['nonzero']:,}", f"{p['after']['nonzero']:,}")
    cl = report.calibration_loss
    if cl["before"] is not None:
        t.add_row("calibration loss", f"{cl['before']:.4f}", f"{cl['after']:.4f}")
    if report.heldout:
        h = report.heldout
        t.add_row("held-out perplexity", f"{h['perplexity_before']:.2f}", f"{h['perplexity_after']:.2f}")
    console.print(t)
    if report.candidates:
        c = Table(title="candidates")
        keys = [k for k in report.candidates[0] if k != "selected"]
        for k in keys:
            c.add_column(k, justify="right")
        c.add_column("selected")
        for row in report.candidates:
            c.add_row(*[f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys],
                      "✓" if row["selected"] else "")
        console.print(c)
    ph = Table(title="phases")
    for col in ("phase", "seconds", "peak memory (MiB)"):
        ph.add_column(col, justify="right" if col != "phase" else "left")
    for row in report.phases:
        ph.add_row(row["phase"], f"{row['seconds']:.2f}", f"{row['peak_memory_mb']:.0f} {row['memory']}")
    console.print(ph)


def eval_results(results: EvalResults, path: Path) -> None:
    table = Table("measure", "value", "± stderr", "N / tokens", "tokens/s", box=None, title=f"{results.run}  ({path.name})")
    if results.heldout is not None:
        h = results.heldout
        table.add_row(f"held-out loss ({(h.model_extra or {}).get('range')})", f"{h.loss:.4f}", "", f"{h.tokens:,}",
                      f"{h.tokens_per_s:,.0f}")
    for name, p in results.perplexity.items():
        table.add_row(f"perplexity {name}", f"{p.perplexity:.3f}", "", f"{p.tokens:,}", f"{p.tokens_per_s:,.0f}")
    zero_shot = results.zero_shot
    if zero_shot is not None:
        for task, t in zero_shot.tasks.items():
            stderr = t.stderr if t.stderr is not None else float("nan")
            table.add_row(f"{task} ({t.metric})", f"{t.value:.4f}", f"{stderr:.4f}", str(t.n), "")
        if zero_shot.average is not None:
            table.add_row("average accuracy", f"{zero_shot.average:.4f}", "", "", "")
    console.print(table)


def sweep(choice: SweepChoice) -> None:
    from .sweep import describe

    table = Table("peak lr", "prefix run", "train loss at prefix end", "", box=None,
                  title=f"LR sweep over {choice.prefix_tokens:,}-token prefixes")
    for row in describe(choice):
        table.add_row(row["lr"], row["run"], f"{row['final_train_loss']:.4f}", "[green]chosen" if row["chosen"] else "")
    console.print(table)


def comparison(c: Comparison) -> None:
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


# ---------------------------------------------------------------------------- status and study graphs


def recipes_table(rows: list[dict[str, str]]) -> None:
    table = Table("name", "stage", "file", "description", box=None)
    for r in rows:
        stage = "[red]invalid" if r["stage"] == "invalid" else r["stage"]
        table.add_row(r["name"], stage, r["file"], r["description"])
    console.print(table)


def runs_table(rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    owned = any(r["owner"] for r in rows)  # the owner column only while some run is being written
    table = Table("run", "stage", "status", "job", "slurm", *(["owner"] if owned else []), "tokens", "lr", "created",
                  "note", box=None)
    color = {"complete": "green", "failed": "red", "damaged": "red"}
    for r in rows:
        tokens = f"{r['tokens']:,}" if r["tokens"] else ""
        if r["epochs"] and r["epochs"] > 1:  # allowed by train.allow_epochs: the data repeats
            tokens += f" ({r['epochs']:.3g} epochs)"
        table.add_row(r["run"], r["stage"], f"[{color.get(r['status'], 'yellow')}]{r['state']}", r["job"],
                      r["slurm"] or "", *([r["owner"]] if owned else []), tokens, r["lr"],
                      (r["created"] or "").replace("T", " ")[:19], r["note"] or "")
    console.print(table)


def budgets(rows: list[dict[str, Any]]) -> None:
    """Per data range: the tokens it holds against the most one run of the study reads from it."""
    if not rows:
        return
    table = Table("data", "range", "holds", "reads (most)", "by", box=None, title="token budgets")
    for r in rows:
        holds = f"{'~' if r['estimated'] else ''}{r['holds']:,}"
        table.add_row(r["data"], r["range"], holds, f"{r['reads']:,}", r["by"])
    console.print(table)


def graph(rows: list[dict[str, Any]]) -> None:
    table = Table("stage", "run", "state", "job", "after", "note", box=None)
    color = {"complete": "green", "reused": "green", "failed": "red", "skipped": "red"}
    for r in rows:
        table.add_row(r["group"], r["label"], f"[{color.get(r['state'].split()[0], 'yellow')}]{r['state']}", r["job"] or "",
                      r["after"], r["note"] or "")
    console.print(table)

"""Compare: the paper's tables and figures from a study's runs, with token matching checked from manifests.

Per method the inputs are its P-R_N runs (one per budget N), their S_N twins (same position) and
optionally its S_total twin. Every number comes from a run's manifest and its stored eval results
(`<run>/eval/<key>.json`, the key of one eval configuration), so a table names exactly what it shows.
Differences are signed so that positive means the pruned model is better; accuracy differences
within the evaluation standard error are marked as such.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from . import lineage, store
from .artifacts import EvalResults, PruneSummary, summary_of
from .errors import PrunectlError
from .evaluate.config import results_path
from .schema import Strict

FLOPS_SEQ_LEN = 2048  # Table 9: one forward pass at sequence length 2048


class MethodRuns(Strict):
    """One method's runs: P-R_N per budget, the S_N twin of each, and the S_total twin."""

    label: str = Field(description="row label, e.g. Minitron-D")
    retrain: list[str] = Field(min_length=1, description="P-R_N runs (name, name@latest or name@vNNN), one per budget N")
    scratch: list[str] = Field(default_factory=list, description="S_N twins, paired with retrain by position")
    total: str | None = Field(None, description="S_total twin: the parent's pretraining tokens plus one retrain's")


class CompareConfig(Strict):
    perplexity: str | None = Field(None, description="corpus of the summary's perplexity column; default: the eval's first")
    methods: list[MethodRuns] = Field(default_factory=list)


# ---------------------------------------------------------------------------- measurements


@dataclass
class Measured:
    """One run as the tables see it."""

    ref: str
    tokens: int
    data: str | None
    intervals: frozenset
    loss: float | None
    ppl: dict[str, float]
    acc: dict[str, tuple[float, float]]  # task -> (value, stderr)
    params: int
    nonzero: int
    run_dir: Path

    @property
    def avg(self) -> tuple[float, float] | None:
        """Average accuracy and its standard error (independent tasks)."""
        if not self.acc:
            return None
        k = len(self.acc)
        return (sum(v for v, _ in self.acc.values()) / k, math.sqrt(sum(se * se for _, se in self.acc.values())) / k)


@dataclass
class Pair:
    """P-R_N against a twin; `matched` is False only when shown under --allow-mismatch."""

    n: int
    retrain: Measured
    scratch: Measured | None = None
    matched: bool = True


@dataclass
class MethodResult:
    label: str
    family: str  # prune method, e.g. minitron-depth
    ratio: float | None
    prune_ref: str
    parent_ref: str | None
    pairs: list[Pair]
    total: Measured | None = None
    total_pair: Pair | None = None  # the P-R_N whose tokens plus the parent's are S_total's
    total_matched: bool = True

    @property
    def headline(self) -> Pair:
        return self.total_pair or self.pairs[0]


@dataclass
class Comparison:
    methods: list[MethodResult]
    metrics: list[str]  # ordered columns: loss, ppl:<corpus>..., acc:<task>..., avg
    perplexity: str | None
    eval_key: str
    problems: list[str] = field(default_factory=list)  # mismatches shown under --allow-mismatch
    parent: Measured | None = None


def _intervals(use) -> frozenset:
    return frozenset((i.range, i.start, i.end) for i in use.intervals) if use else frozenset()


def _describe_use(m: Measured) -> str:
    spans = ", ".join(f"{r} [{a:,}, {b:,})" for r, a, b in sorted(m.intervals))
    return f"{m.tokens:,} tokens ({spans or 'no recorded intervals'})"


def measure(root: Path, ref: str, eval_cfg, problems: list[str]) -> Measured | None:
    """A complete run's tokens and eval results; what is missing goes to `problems`."""
    try:
        run = store.resolve(root, ref)
    except PrunectlError as err:
        problems.append(err.problems[0])
        return None
    path = results_path(run.dir, eval_cfg)
    if not path.exists():
        problems.append(f"{run.ref}: no results of this eval configuration ({path.name}); "
                        f"run `prunectl eval <eval recipe> run={run.ref}`")
        return None
    results = EvalResults.read(path)
    manifest = run.manifest()
    tasks = results.zero_shot.tasks if results.zero_shot else {}
    return Measured(
        ref=run.ref,
        tokens=manifest.data.tokens if manifest.data else 0,
        data=manifest.data.data if manifest.data else None,
        intervals=_intervals(manifest.data),
        loss=results.heldout.loss if results.heldout else None,
        ppl={k: v.perplexity for k, v in results.perplexity.items()},
        acc={k: (t.value, t.stderr or 0.0) for k, t in tasks.items()},
        params=results.parameters["total"],
        nonzero=results.parameters["nonzero"],
        run_dir=run.dir,
    )


def _lineage(root: Path, retrain: Measured) -> tuple[str, str | None, str, float | None]:
    """(prune run, parent run, prune method, target ratio) behind a P-R_N run."""
    manifest = store.resolve(root, retrain.ref).manifest()
    if manifest.stage != "retrain" or "init" not in manifest.inputs:
        raise PrunectlError(f"{retrain.ref}: is a {manifest.stage} run; a method's retrain entries are P-R_N (retrain) runs")
    prune_run = store.resolve(root, manifest.inputs["init"])
    pm = prune_run.manifest()
    summary = summary_of(pm)
    if isinstance(summary, PruneSummary):
        return prune_run.ref, pm.inputs.get("parent"), summary.method, summary.target_ratio
    return prune_run.ref, pm.inputs.get("parent"), pm.stage, None


def build(root: Path, cfg: CompareConfig, eval_cfg, allow_mismatch: bool = False) -> Comparison:
    """Measure every run, pair them and check token matching; refuse (or flag) what does not match."""
    missing: list[str] = []
    mismatches: list[str] = []
    methods: list[MethodResult] = []
    parent = None
    for spec in cfg.methods:
        retrains = [measure(root, ref, eval_cfg, missing) for ref in spec.retrain]
        scratches = [measure(root, ref, eval_cfg, missing) for ref in spec.scratch]
        total = measure(root, spec.total, eval_cfg, missing) if spec.total else None
        if len(spec.scratch) not in (0, len(spec.retrain)):
            missing.append(f"{spec.label}: {len(spec.retrain)} retrain run(s) but {len(spec.scratch)} scratch twin(s); "
                           "list one S_N twin per P-R_N, in the same order")
            continue
        if any(m is None for m in retrains + scratches) or (spec.total and total is None):
            continue
        prune_ref, parent_ref, family, ratio = _lineage(root, retrains[0])
        result = MethodResult(spec.label, family, ratio, prune_ref, parent_ref, [])
        for i, r in enumerate(retrains):
            s = scratches[i] if scratches else None
            pair = Pair(r.tokens, r, s)
            if s is not None and (s.intervals != r.intervals or s.tokens != r.tokens or s.data != r.data):
                pair.matched = False
                mismatches.append(f"{spec.label}: {s.ref} (S_N) consumed {_describe_use(s)} but {r.ref} (P-R_N) "
                                  f"consumed {_describe_use(r)}; equal training budgets need the same range and count")
            result.pairs.append(pair)
        result.pairs.sort(key=lambda p: p.n)
        if total is not None:
            seen = lineage.pretraining(root, store.resolve(root, retrains[0].ref))
            pretrained = _intervals(seen[1]) if seen else frozenset()
            pretrained_tokens = seen[1].tokens if seen else 0
            fits = [p for p in result.pairs
                    if total.intervals == pretrained | p.retrain.intervals and total.tokens == pretrained_tokens + p.n]
            result.total = total
            result.total_pair = fits[0] if fits else max(result.pairs, key=lambda p: p.n)
            if not fits:
                result.total_matched = False
                mismatches.append(
                    f"{spec.label}: {total.ref} (S_total) consumed {_describe_use(total)} but the parent "
                    f"{seen[0] if seen else '(unknown)'} pretrained on {pretrained_tokens:,} tokens plus "
                    + " or ".join(f"{p.retrain.ref}'s {p.n:,}" for p in result.pairs)
                    + " (equal total budget needs exactly their union)")
        if parent is None and parent_ref:
            parent = measure(root, parent_ref, eval_cfg, [])
        methods.append(result)
    if missing:
        raise PrunectlError(*missing)
    if mismatches and not allow_mismatch:
        raise PrunectlError(*[f"not token-matched: {m}; rerun the twin, or pass --allow-mismatch to show it flagged"
                              for m in mismatches])
    every = [m for res in methods for p in res.pairs for m in (p.retrain, p.scratch) if m] + \
            [res.total for res in methods if res.total]
    corpora = list(dict.fromkeys(k for m in every for k in m.ppl))
    tasks = list(dict.fromkeys(k for m in every for k in m.acc))
    metrics = (["loss"] if any(m.loss is not None for m in every) else []) + [f"ppl:{c}" for c in corpora] + \
              [f"acc:{t}" for t in tasks] + (["avg"] if tasks else [])
    if cfg.perplexity and cfg.perplexity not in corpora:
        raise PrunectlError(f"compare.perplexity: '{cfg.perplexity}' is not a corpus of this eval "
                            f"(it has {', '.join(corpora) or 'none'})")
    return Comparison(methods, metrics, cfg.perplexity or (corpora[0] if corpora else None), eval_cfg.key(),
                      mismatches, parent)


# ---------------------------------------------------------------------------- cells and tables


def value(m: Measured | None, metric: str) -> tuple[float | None, float | None]:
    """(value, stderr) of one metric; accuracies in percent as the paper prints them."""
    if m is None:
        return None, None
    if metric == "loss":
        return m.loss, None
    if metric.startswith("ppl:"):
        return m.ppl.get(metric[4:]), None
    if metric == "avg":
        avg = m.avg
        return (100 * avg[0], 100 * avg[1]) if avg else (None, None)
    v = m.acc.get(metric[4:])
    return (100 * v[0], 100 * v[1]) if v else (None, None)


LOWER_IS_BETTER = ("loss", "ppl:")


@dataclass
class Cell:
    value: float | str | None
    digits: int = 2
    within_stderr: bool = False  # a difference smaller than the evaluation standard error
    delta: bool = False

    def text(self) -> str:
        if self.value is None:
            return "-"
        if isinstance(self.value, str):
            return self.value
        out = f"{self.value:+.{self.digits}f}" if self.delta else f"{self.value:,.{self.digits}f}"
        return out + ("~" if self.within_stderr else "")


@dataclass
class Table:
    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    note: str = ""

    def records(self) -> list[dict[str, Any]]:
        return [{c: (cell.value if not isinstance(cell.value, float) else round(cell.value, 6))
                 for c, cell in zip(self.columns, row)} | {"within_stderr": [c for c, cell in zip(self.columns, row)
                                                                            if cell.within_stderr]}
                for row in self.rows]


def delta(p: Measured, s: Measured, metric: str) -> Cell:
    """Positive when the pruned model is better; within the combined stderr is marked."""
    (pv, pse), (sv, sse) = value(p, metric), value(s, metric)
    if pv is None or sv is None:
        return Cell(None)
    d = sv - pv if metric.startswith(LOWER_IS_BETTER) else pv - sv
    within = pse is not None and sse is not None and abs(d) <= math.hypot(pse, sse)
    return Cell(d, 3 if metric == "loss" else 2, within, delta=True)


def _metric_name(metric: str) -> str:
    return {"loss": "held-out loss", "avg": "avg acc %"}.get(metric, metric.replace("ppl:", "ppl ").replace("acc:", ""))


def _cells(m: Measured | None, metrics: list[str]) -> list[Cell]:
    return [Cell(value(m, k)[0], 3 if k == "loss" else 2) for k in metrics]


def short_tokens(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return str(n)


def _pair_rows(label: str, pair: Pair, metrics: list[str]) -> list[list[Cell]]:
    """S_N, P-R_N and their delta (just P-R_N without a twin)."""
    rows = [[Cell(label), Cell("P-R_N"), Cell(short_tokens(pair.n))] + _cells(pair.retrain, metrics)]
    if pair.scratch:
        rows.insert(0, [Cell(label), Cell("S_N"), Cell(short_tokens(pair.scratch.tokens))] + _cells(pair.scratch, metrics))
        rows.append([Cell(label), Cell("delta S_N"), Cell("")] + [delta(pair.retrain, pair.scratch, k) for k in metrics])
    return rows


def summary_table(c: Comparison) -> Table:
    """Table 2: S_N, P-R_N and S_total side by side at the headline budget."""
    ppl = f"ppl:{c.perplexity}" if c.perplexity else None
    keys = [k for k in ("loss", ppl, "avg") if k and k in c.metrics]
    who = ["S_N", "P-R_N"] + (["S_total"] if any(res.total for res in c.methods) else [])
    columns = ["method", "N"] + [f"{_metric_name(k)} {w}" for k in keys for w in who]
    rows = []
    for res in c.methods:
        pair = res.headline
        row = [Cell(res.label + ("" if pair.matched and res.total_matched else " (NOT token-matched)")), Cell(short_tokens(pair.n))]
        for k in keys:
            row += [Cell(value(m, k)[0], 3 if k == "loss" else 2) for m in (pair.scratch, pair.retrain, res.total)][:len(who)]
        rows.append(row)
    title = "P-R_N against S_N (equal training tokens)" + (" and S_total (equal total tokens)" if len(who) > 2 else "")
    return Table("summary", title, columns, rows, "Table 2 of the paper" + (
        "; N is the retrain budget whose tokens plus the parent's equal S_total's." if len(who) > 2 else "."))


def per_benchmark_table(c: Comparison) -> Table:
    """Table 16: every measure, with delta rows (positive: P-R_N better)."""
    columns = ["method", "model", "tokens"] + [_metric_name(k) for k in c.metrics]
    rows = []
    for res in c.methods:
        pair = res.headline
        rows += _pair_rows(res.label, pair, c.metrics)
        if res.total:
            rows.append([Cell(res.label), Cell("S_total"), Cell(short_tokens(res.total.tokens))] + _cells(res.total, c.metrics))
            rows.append([Cell(res.label), Cell("delta S_total"), Cell("")] +
                        [delta(pair.retrain, res.total, k) for k in c.metrics])
    return Table("per_benchmark", "Per-benchmark results at the headline budget", columns, rows,
                 "Table 16 of the paper. Delta rows: positive = the pruned model is better; ~ = within the "
                 "evaluation standard error.")


def budget_table(c: Comparison) -> Table | None:
    """Tables 12-15: each method across retraining budgets."""
    columns = ["method", "model", "N"] + [_metric_name(k) for k in c.metrics]
    rows = []
    for res in c.methods:
        if len(res.pairs) < 2:
            continue
        for pair in res.pairs:
            rows += _pair_rows(res.label, pair, c.metrics)
    if not rows:
        return None
    return Table("token_budgets", "Across retraining token budgets", columns, rows, "Tables 12-15 of the paper.")


def ratio_table(c: Comparison) -> Table | None:
    """Table 11: one prune method at several ratios, P-R_N against S_N."""
    families: dict[str, list[MethodResult]] = {}
    for res in c.methods:
        families.setdefault(res.family, []).append(res)
    keys = [k for k in c.metrics if k in ("loss", f"ppl:{c.perplexity}", "avg")]
    columns = ["method", "ratio", "parameters"] + [f"{_metric_name(k)} {w}" for k in keys for w in ("S_N", "P-R_N", "delta")]
    rows = []
    for family, members in families.items():
        if len({m.ratio for m in members}) < 2:
            continue
        for res in sorted(members, key=lambda m: m.ratio or 0):
            pair = res.headline
            row = [Cell(family), Cell(f"{res.ratio:.1%}" if res.ratio is not None else "?"), Cell(f"{pair.retrain.params:,}")]
            for k in keys:
                row += [Cell(value(pair.scratch, k)[0], 3 if k == "loss" else 2),
                        Cell(value(pair.retrain, k)[0], 3 if k == "loss" else 2),
                        delta(pair.retrain, pair.scratch, k) if pair.scratch else Cell(None)]
            rows.append(row)
    if not rows:
        return None
    return Table("ratios", "Effect of the pruning ratio (equal training tokens)", columns, rows,
                 "Table 11 of the paper; delta positive = P-R_N better.")


def _train_tokens_per_s(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rates = [r["tokens_per_s"] for r in map(json.loads, path.read_text().splitlines()) if r.get("tokens_per_s")]
    return statistics.median(rates) if rates else None


def efficiency_table(c: Comparison) -> Table | None:
    """Table 9: size, theoretical FLOPs of one 2048-token forward pass, and measured training throughput."""
    from .model import forward_flops

    columns = ["method", "sparsity", "parameters", "non-zero", "GFLOPs/forward", "FLOPs speedup", "train tokens/s"]
    rows, base = [], None
    models = ([("base (parent)", c.parent)] if c.parent else []) + [(r.label, r.headline.retrain) for r in c.methods]
    for label, m in models:
        final = m.run_dir / "final"
        if not (final / "config.json").exists():
            continue
        sparse = (final / "masks.safetensors").exists()
        sparsity = (summary_of(store.Run.at(m.run_dir).manifest()).mask_sparsity or 0.0) if sparse else 0.0
        shown = sparsity if sparse else (1 - m.params / c.parent.params if c.parent else 0.0)
        flops = forward_flops(final, FLOPS_SEQ_LEN, 1.0 - sparsity)
        base = base or (flops if m is c.parent else None)
        rows.append([Cell(label), Cell(f"{shown:.1%}"), Cell(f"{m.params:,}"), Cell(f"{m.nonzero:,}"),
                     Cell(flops / 1e9, 1), Cell(f"{base / flops:.2f}x" if base else "-"),
                     Cell(_train_tokens_per_s(m.run_dir), 0)])
    if not rows:
        return None
    return Table("efficiency", f"Efficiency (forward FLOPs at sequence length {FLOPS_SEQ_LEN})", columns, rows,
                 "Table 9 of the paper. Sparsity: zeroed decoder weights for sparse models, removed parameters "
                 "otherwise. Sparse FLOPs assume the zeroed multiplications are skipped. Tokens/s: median "
                 "training throughput of the P-R_N run (the parent's own for base).")


def tables(c: Comparison) -> list[Table]:
    return [t for t in (summary_table(c), per_benchmark_table(c), budget_table(c), ratio_table(c), efficiency_table(c)) if t]


def finding_1(c: Comparison) -> dict[str, bool]:
    """Per method: does P-R_N beat S_N at equal training tokens (held-out loss, else the headline perplexity)?"""
    key = "loss" if "loss" in c.metrics else f"ppl:{c.perplexity}"
    out = {}
    for res in c.methods:
        pair = res.headline
        if pair.scratch is not None:
            d = delta(pair.retrain, pair.scratch, key).value
            out[res.label] = d is not None and d > 0
    return out


# ---------------------------------------------------------------------------- writers


def to_markdown(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(cell.text() for cell in row) + " |" for row in t.rows]
    return "\n".join(lines + (["", t.note] if t.note else []))


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("~", r"$\sim$")):
        text = text.replace(a, b)
    return text


def to_latex(t: Table) -> str:
    body = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + "l" * 2 + "r" * (len(t.columns) - 2) + "}",
            r"\toprule", " & ".join(_latex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    for row in t.rows:
        cells = [r"\textcolor{gray}{" + _latex_escape(cell.text()) + "}" if cell.within_stderr else _latex_escape(cell.text())
                 for cell in row]
        body.append(" & ".join(cells) + r" \\")
    body += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _latex_escape(f"{t.title}. {t.note}") + "}",
             rf"\label{{tab:{t.key}}}", r"\end{table}"]
    return "\n".join(body)


def write(c: Comparison, out: Path) -> list[Path]:
    """Markdown, CSV (one per table), LaTeX and JSON into `out` (the figures: plots.plot_all)."""
    out.mkdir(parents=True, exist_ok=True)
    ts = tables(c)
    written = []
    md = out / "tables.md"
    md.write_text("\n\n".join(to_markdown(t) for t in ts) + "\n")
    written.append(md)
    for t in ts:
        path = out / f"{t.key}.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(t.columns)
            # numbers at full precision for spreadsheets; compare.json marks the within-stderr cells
            w.writerows([[round(cell.value, 6) if isinstance(cell.value, float) else cell.text() for cell in row]
                         for row in t.rows])
        written.append(path)
    tex = out / "tables.tex"
    tex.write_text("% needs \\usepackage{booktabs,xcolor}\n" + "\n\n".join(to_latex(t) for t in ts) + "\n")
    written.append(tex)
    data = {"eval_key": c.eval_key, "perplexity": c.perplexity, "metrics": c.metrics,
            "finding_1": finding_1(c), "not_token_matched": c.problems,
            "methods": [_method_json(res, c.metrics) for res in c.methods],
            "tables": {t.key: {"title": t.title, "note": t.note, "rows": t.records()} for t in ts}}
    js = out / "compare.json"
    js.write_text(json.dumps(data, indent=1) + "\n")
    written.append(js)
    return written


def _method_json(res: MethodResult, metrics: list[str]) -> dict[str, Any]:
    def run(m: Measured | None):
        return None if m is None else {"run": m.ref, "tokens": m.tokens, "parameters": m.params, "nonzero": m.nonzero,
                                       **{k: value(m, k)[0] for k in metrics}}

    return {"label": res.label, "prune_method": res.family, "ratio": res.ratio, "prune_run": res.prune_ref,
            "parent": res.parent_ref, "total": run(res.total), "total_token_matched": res.total_matched,
            "headline_n": res.headline.n,
            "budgets": [{"n": p.n, "token_matched": p.matched, "P-R_N": run(p.retrain), "S_N": run(p.scratch)}
                        for p in res.pairs]}

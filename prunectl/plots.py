"""The paper's figures from a Comparison: token budgets (Figure 3), model sizes (Figure 4), total budget (Figure 5)."""

from __future__ import annotations

from pathlib import Path

from .compare import short_tokens, value

SCRATCH, PRUNED, TOTAL = "#1f3b73", "#7b4fa6", "#4a90d9"  # the paper's dark blue, purple and blue


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_metric(c) -> tuple[str, str]:
    """Average accuracy where zero-shot ran, else held-out loss (else the headline perplexity)."""
    if "avg" in c.metrics:
        return "avg", "average accuracy (%)"
    if "loss" in c.metrics:
        return "loss", "held-out loss"
    return f"ppl:{c.perplexity}", f"{c.perplexity} perplexity"


def plot_all(c, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = [model_sizes(c, out / "model_sizes.png", plt)]
    if any(len(res.pairs) > 1 for res in c.methods):  # a curve needs two budgets
        written.append(token_budgets(c, out / "token_budgets.png", plt))
    if any(res.total for res in c.methods):
        written.append(total_budget(c, out / "total_budget.png", plt))
    return written


def token_budgets(c, path: Path, plt) -> Path:
    """Figure 3: held-out loss and average accuracy against retraining tokens, S_N and P-R_N per method."""

    rows = [k for k in ("loss" if "loss" in c.metrics else f"ppl:{c.perplexity}", "avg") if k in c.metrics]
    labels = {"loss": "held-out loss (lower is better)", "avg": "average accuracy % (higher is better)"}
    n = len(c.methods)
    fig, axes = plt.subplots(len(rows), n, figsize=(3.2 * n, 2.8 * len(rows)), squeeze=False, constrained_layout=True)
    for j, res in enumerate(c.methods):
        xs = [p.n for p in res.pairs]
        for i, key in enumerate(rows):
            ax = axes[i][j]
            for who, color, get in (("S_N", SCRATCH, lambda p: p.scratch), ("P-R_N", PRUNED, lambda p: p.retrain)):
                pts = [(p.n, value(get(p), key)[0]) for p in res.pairs if get(p) is not None]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color, label=who)
            if len(xs) > 1:
                ax.set_xscale("log")
            ax.set_xticks(xs, [short_tokens(x) for x in xs])
            ax.set_xlabel("retraining tokens")
            if j == 0:
                ax.set_ylabel(labels.get(key, key.replace("ppl:", "perplexity ")))
            if i == 0:
                ax.set_title(res.label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Pruned initialisation (P-R_N) against scratch (S_N) at equal training tokens")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _bars_with_delta(plt, path: Path, title: str, names: list[str], left: list, right: list, left_label: str,
                     right_label: str, left_color: str, ylabel: str, lower_better: bool) -> Path:
    """Paired bars of (value, stderr) with stderr whiskers, and the gain below: a hatched, pale gain
    lies within the combined standard error (the tables' `~`)."""
    import math

    import numpy as np

    x = np.arange(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(5, 1.2 * len(names) + 2), 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]}, constrained_layout=True)
    for side, shift, color, label in ((left, -0.2, left_color, left_label), (right, 0.2, PRUNED, right_label)):
        errs = [se or 0 for _, se in side]
        top.bar(x + shift, [v if v is not None else 0 for v, _ in side], 0.4, color=color, label=label,
                yerr=errs if any(errs) else None, capsize=3, error_kw={"elinewidth": 0.8})
    top.set_ylabel(ylabel)
    values = [v + k * (se or 0) for v, se in left + right if v is not None for k in (-1, 1)]
    if values:
        lo, hi = min(values), max(values)
        top.set_ylim(max(0, lo - 0.15 * (hi - lo + 1e-9)), hi + 0.1 * (hi - lo + 1e-9))
    top.legend(fontsize=8)
    top.set_title(title)
    deltas, noise = [], []
    for (a, sa), (b, sb) in zip(left, right):
        deltas.append(((a - b) if lower_better else (b - a)) if a is not None and b is not None else 0)
        noise.append(math.hypot(sa or 0, sb or 0))
    within = [0 < n and abs(d) <= n for d, n in zip(deltas, noise)]  # losses carry no stderr
    bars = bottom.bar(x, deltas, 0.5, color=[PRUNED if d >= 0 else "#c0392b" for d in deltas],
                      yerr=noise if any(noise) else None, capsize=3, error_kw={"elinewidth": 0.8})
    for bar, inside in zip(bars, within):
        if inside:
            bar.set_alpha(0.35)
            bar.set_hatch("//")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel(f"{right_label} gain")
    if any(within):
        bottom.set_title("hatched: within the combined standard error", fontsize=8)
    bottom.set_xticks(x, names, fontsize=8)
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def model_sizes(c, path: Path, plt) -> Path:
    """Figure 4: P-R_N against S_N by pruned model size (grouped by prune method), with the gain below."""

    key, label = _bar_metric(c)
    members = sorted((r for r in c.methods if r.headline.scratch), key=lambda r: (r.family, -r.headline.retrain.nonzero))
    names = [f"{r.label}\n{r.headline.retrain.nonzero / 1e6:.2f}M" for r in members]
    return _bars_with_delta(plt, path, "P-R_N against S_N by model size (non-zero parameters)", names,
                            [value(r.headline.scratch, key) for r in members],
                            [value(r.headline.retrain, key) for r in members],
                            "S_N", "P-R_N", SCRATCH, label, key != "avg")


def total_budget(c, path: Path, plt) -> Path:
    """Figure 5: P-R_N against S_total per method (equal total tokens), with the gain below."""

    key, label = _bar_metric(c)
    members = [r for r in c.methods if r.total]
    return _bars_with_delta(plt, path, "P-R_N against S_total (equal total tokens)", [r.label for r in members],
                            [value(r.total, key) for r in members], [value(r.headline.retrain, key) for r in members],
                            "S_total", "P-R_N", TOTAL, label, key != "avg")


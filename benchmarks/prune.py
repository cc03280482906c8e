"""Pruning: time, peak memory and held-out perplexity per method, and the shared-statistics and vectorised
N:M paths against a straightforward per-Linear implementation.

Two models, one after the other:

  tiny  the tiny parent (--parent, default tiny-parent@latest: a trained 12-layer Llama of 2.6 M
        parameters) and the data run it was trained on (its manifest's inputs.data; --data overrides);
  50M   a random-init LlamaForCausalLM built in this process (prunectl.model.build, --seed). By default it
        has hidden 768, 8 layers, 12 heads, 4 KV heads, MLP 2048 and a tied 2048 vocabulary, which is
        51,917,568 parameters. The script prints the count and refuses to run the section below
        --min-params (50 M). It reads the same token stream as the tiny model.

Part 1, methods. A fresh copy of the parent (copy.deepcopy) is pruned by each method: magnitude, wanda
and sparsegpt at 50% unstructured and at 2:4, and minitron-depth, minitron-width, flap and shortgpt at
50% of parameters. The script calls what the `prune` stage calls: each method's apply() from the method
table (prunectl.prune.methods) with the stage's Meter. The calibration batch comes from calibration.sample: the
"calibration" range, seed 0, --*-samples sequences of --seq-len tokens. Held-out perplexity is
exp(calibration.lm_loss) over the first --*-heldout tokens of the "validation" range, in --seq-len
chunks (data.validation_starts + data.batch, as the stage's HeldOutConfig does). The columns are:

  prune s        the sum of the Meter's pruning phases (scoring and search included, evaluation not);
  peak RSS MiB   the Meter's sampled peak resident memory of this whole process during those phases
                 (the parent, its copy and the calibration activations included; on CPU the stage has
                 nothing finer);
  +RSS MiB       that peak minus the RSS just before the method started: the method's own footprint.
                 glibc keeps freed memory, so this can read low after an earlier method grew the heap;
  achieved       the fraction of decoder Linear weights zeroed (sparse methods) or of all parameters
                 removed (structured methods), computed as the stage computes it;
  eval s         the time of the held-out evaluation of the pruned model;
  other cores    the CPU that other processes used meanwhile (more than ~0.1 spoils a 2-core timing).

The 50M model is untrained, so its perplexities only show that each pruned model still runs. Its
timings are the point.

Part 2, shared statistics and vectorised N:M against a straightforward implementation. The script times
the sequential layer-by-layer pass that sparse.apply_wanda / apply_sparsegpt run (calibration.Layerwise; per layer, one forward
collects statistics, the masks are chosen, and one forward feeds the pruned layer's outputs onward) in
two ways, on two fresh copies of the same parent with the same calibration batch:

  product   collect(shared=True): one hook and one accumulation per input group (q/k/v share one,
            gate/up share one), and sparse.wanda_mask with its vectorised keep_n_of_m;
  baseline  per_linear_stats: each Linear hooked alone with its own calibration pass through the layer
            and its own accumulation (seven passes per layer instead of one; q, k and v each sum their
            own norms and X^T X), and a Wanda N:M mask chosen by a Python loop over the cols/M groups,
            one top-k per group (loop_n_of_m below).

SparseGPT chooses its N:M mask inside sparsegpt_, one group of M columns at a time, because its OBS
update needs that order. Both sides call it unchanged, so for SparseGPT only the statistics differ.

The two sides run in lockstep in one process. For each layer, one side does its whole step (move the
layer in, collect, select, forward onward, move it out) and then the other side does. The side that goes
first alternates from layer to layer, and successive passes (--repeats) also start with alternate sides.
Short-lived load from other processes therefore falls on both sides alike, which matters on a shared
2-core machine where one busy core can slow torch's two threads several times over. The masks and pruned
weights of the two sides must be identical (torch.equal). The product side's masks must also equal
the method table's masks from part 1, which shows that the timed loop is the stage's loop.

    speedup = baseline seconds / product seconds

is computed over the whole pass, and the printed value is the median over the passes. Each side's time
is split into three parts:

  statistics  time spent inside InputStats.add, the hook body. On both sides it is measured by wrapping
              that method with a timer, which costs about a microsecond per call;
  selection   choosing masks and applying them, including SparseGPT's reconstruction;
  forward     everything else: embedding the batch, the two forwards per layer and the layer moves. This
              work is the same on both sides.

The table also compares the parts that the product changes. For Wanda these are statistics +
selection. For SparseGPT they are the statistics alone, because its selection is the same reconstruction
on both sides. The table gives the speedup of those parts alone, and a "bound": the whole-pass speedup the
product would reach if those parts cost it nothing, baseline total / (product total - product changed
parts).

All timing uses time.perf_counter and --threads torch threads, 1 by default. The default is 1 because
the benchmark was written for a 2-core VM shared with other jobs. There, with another process busy, 2
threads slowed sparsegpt_'s column loop (thousands of small ops, each ending in an OpenMP barrier)
about 50-fold: 0.14 s became 7-9 s for one 768 x 768 Linear. With 1 thread it stayed at 0.12-0.14 s,
and large matmuls ran at about the same speed with either setting. On a machine nobody else uses, pass
--threads 2. Other processes' CPU use is printed for every measurement.

    .venv/bin/python benchmarks/prune.py [--models tiny,50m] [--repeats 2] [--methods wanda-2:4,flap-50]
                                         [--compare wanda-2:4,sparsegpt-2:4,wanda-50] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prunectl import store  # noqa: E402
from train_throughput import cpu_marks  # noqa: E402  (the other benchmark beside this file)

# (label, method, ratio, pattern)
METHODS = [
    ("magnitude-50", "magnitude", 0.5, "unstructured"),
    ("magnitude-2:4", "magnitude", None, "2:4"),
    ("wanda-50", "wanda", 0.5, "unstructured"),
    ("wanda-2:4", "wanda", None, "2:4"),
    ("sparsegpt-50", "sparsegpt", 0.5, "unstructured"),
    ("sparsegpt-2:4", "sparsegpt", None, "2:4"),
    ("minitron-depth-50", "minitron-depth", 0.5, "unstructured"),
    ("minitron-width-50", "minitron-width", 0.5, "unstructured"),
    ("flap-50", "flap", 0.5, "unstructured"),
    ("shortgpt-50", "shortgpt", 0.5, "unstructured"),
]
COMPARE = ["wanda-2:4", "sparsegpt-2:4"]
TARGET = 1.5


# ------------------------------------------------------------------------------------------ measuring


def other_cores(before: tuple[float, float, float]) -> float:
    """Cores that other processes kept busy since `before`."""
    busy, own, wall = (b - a for a, b in zip(before, cpu_marks()))
    return max(0.0, (busy - own) / wall) if wall > 0 else 0.0


@contextmanager
def timed_stats(clock: dict[str, float]):
    """Adds the time spent inside InputStats.add (the body of every statistics hook) to clock['stats']."""
    from prunectl.prune import calibration as calib

    original = calib.InputStats.add

    def add(self, x):
        t = time.perf_counter()
        original(self, x)
        clock["stats"] += time.perf_counter() - t

    calib.InputStats.add = add
    try:
        yield
    finally:
        calib.InputStats.add = original


# ------------------------------------------------------------------------------------------ models and data


def load_inputs(args):
    """The tiny parent, its token stream, and the data run's ref."""
    import torch
    from transformers import AutoModelForCausalLM

    from prunectl.data import TokenStream

    root = store.runs_root(args.runs_dir)
    run = store.resolve(root, args.parent)
    data_ref = args.data or (run.manifest().inputs.get("data") or "tiny-data@latest")
    data_run = store.resolve(root, data_ref)
    parent = AutoModelForCausalLM.from_pretrained(run.final, dtype=torch.float32, attn_implementation="sdpa").eval()
    return run, parent, data_run, TokenStream(data_run.dir)


def build_50m(args, like, vocab: int):
    from prunectl import model as models

    cfg = models.ModelConfig(layers=args.big_layers, hidden=args.big_hidden, heads=args.big_heads,
                             kv_heads=args.big_kv_heads, ffn=args.big_ffn, vocab=vocab, tie_embeddings=True)
    c = like.config
    return models.build(models.llama_config(cfg, vocab, c.bos_token_id, c.eos_token_id, c.pad_token_id), args.seed).eval()


def token_batches(stream, data_ref: str, samples: int, seq_len: int, heldout_tokens: int, micro: int):
    import torch

    from prunectl.data import batch, validation_starts
    from prunectl.prune import calibration as calib

    cfg = calib.CalibrationConfig(range="calibration", samples=samples, seq_len=seq_len, micro_batch=micro, seed=0)
    ids = calib.sample(stream, cfg, data_ref)
    starts = validation_starts(stream, "validation", seq_len, heldout_tokens)
    heldout = torch.from_numpy(batch(stream, starts, seq_len).astype("int64"))
    return ids, heldout


# ------------------------------------------------------------------------------------------ part 1


def run_method(parent, spec, ids, heldout, micro: int, candidates: int) -> dict:
    """Prune a copy of `parent` the way the prune stage does; time, memory, perplexity."""
    import torch

    from prunectl import model as models
    from prunectl.prune import calibration as calib
    from prunectl.prune.config import PruneConfig, SearchConfig
    from prunectl.prune.context import Context
    from prunectl.prune.meter import Meter
    from prunectl.prune.surgery import Shape

    label, method, ratio, pattern = spec
    device = torch.device("cpu")
    cfg = PruneConfig(method=method, ratio=ratio, pattern=pattern, search=SearchConfig(candidates=candidates))
    model = copy.deepcopy(parent)
    shape, before = Shape.of(model), models.parameter_counts(model)
    meter = Meter(device)
    report: dict = {"candidates": []}
    marks, rss0 = cpu_marks(), Meter._rss()
    result = cfg.spec.apply(Context(model, ids if cfg.spec.calibrated else None, cfg, micro, device, shape, meter,
                                    report, Path(".")))
    pruned, masks = result.model, result.masks
    prune_phases = list(meter.phases)
    with meter.phase("held-out"):
        pruned.to(device)
        loss = calib.lm_loss(pruned, heldout, micro)
    after = models.parameter_counts(pruned)
    if masks:
        achieved = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    else:
        achieved = 1 - after["total"] / before["total"]
    peak = max(p["peak_memory_mb"] for p in prune_phases)
    row = {
        "label": label, "prune_s": sum(p["seconds"] for p in prune_phases), "peak_mb": peak,
        "rise_mb": peak - rss0 / 2**20, "achieved": achieved, "params": after["total"], "nonzero": after["nonzero"],
        "ppl": math.exp(loss), "eval_s": meter.phases[-1]["seconds"], "other": other_cores(marks),
        "shape": Shape.of(pruned).describe(), "masks": masks,
    }
    del model, pruned
    gc.collect()
    return row


def parent_row(parent, heldout, micro: int) -> dict:
    import torch

    from prunectl import model as models
    from prunectl.prune import calibration as calib
    from prunectl.prune.meter import Meter

    meter, marks = Meter(torch.device("cpu")), cpu_marks()
    with meter.phase("held-out"):
        loss = calib.lm_loss(parent, heldout, micro)
    counts = models.parameter_counts(parent)
    return {"label": "parent (unpruned)", "prune_s": None, "peak_mb": None, "rise_mb": None, "achieved": 0.0,
            "params": counts["total"], "nonzero": counts["nonzero"], "ppl": math.exp(loss),
            "eval_s": meter.phases[-1]["seconds"], "other": other_cores(marks)}


def print_methods(rows: list[dict]) -> None:
    print("\n| method | prune s | peak RSS MiB | +RSS MiB | parameters | non-zero | achieved | held-out ppl | eval s | other cores |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['label']} | {num(r['prune_s'], '.2f')} | {num(r['peak_mb'], '.0f')} | "
              f"{'-' if r['rise_mb'] is None else round(r['rise_mb'])} "
              f"| {r['params']:,} | {r['nonzero']:,} | {r['achieved']:.1%} | {r['ppl']:.2f} | {r['eval_s']:.2f} "
              f"| {r['other']:.2f} |", flush=True)


# ------------------------------------------------------------------------------------------ part 2


def loop_n_of_m(score, n: int, m: int):
    """Keep-mask with the n best of every m consecutive inputs of each row: one top-k per group, in Python."""
    import torch

    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    for g in range(0, cols, m):
        mask[:, g : g + m].scatter_(1, torch.topk(score[:, g : g + m], n, dim=1).indices, True)
    return mask


def loop_wanda_mask(weight, input_norm, ratio: float, nm):
    from prunectl.prune import sparse

    score = weight.abs() * input_norm[None, :].to(weight.dtype)
    return loop_n_of_m(score, *nm) if nm else sparse.keep_top_per_row(score, ratio)


def select(layer, stats, i: int, method: str, ratio: float, nm, product: bool, masks: dict) -> None:
    """The sparse methods' per-layer step: choose every Linear's mask from `stats` and prune it in place."""
    from prunectl.prune import calibration as calib
    from prunectl.prune import sparse

    for name in calib.LINEARS:
        lin, s = layer.get_submodule(name), stats[name]
        if method == "wanda":
            norm = s.norm.to(lin.weight.device)
            keep = (sparse.wanda_mask if product else loop_wanda_mask)(lin.weight.data, norm, ratio, nm)
            lin.weight.data.mul_(keep)
        else:
            keep = sparse.sparsegpt_(lin.weight, s.xtx, s.n, ratio, nm, sparse.SparseGPTConfig(),
                                     f"model.layers.{i}.{name}")
        masks[f"model.layers.{i}.{name}.weight"] = keep.cpu()


def per_linear_stats(layer, walk, gram: bool) -> dict:
    """The straightforward way: each Linear hooked on its own, with its own calibration pass through the
    (still unpruned) layer and its own accumulation, so q, k and v each rerun the layer and each sum
    their own statistics of the same tensor."""
    from prunectl.prune import calibration as calib

    stats = {}
    for name in calib.LINEARS:
        stats[name] = calib.InputStats(gram=gram)
        hook = layer.get_submodule(name).register_forward_pre_hook(lambda _m, a, s=stats[name]: s.add(a[0].detach()))
        try:
            walk.forward(layer, update=False)
        finally:
            hook.remove()
    return stats


def interleaved_pass(parent, ids, micro: int, method: str, ratio: float, nm, product_first: bool):
    """The sequential pass of the sparse methods (Layerwise + each_layer's steps), run for both sides in lockstep.

    Each side has its own copy of the parent and its own Layerwise activations. Layer by layer, one
    side does its step (move the layer in, collect statistics, select, forward the pruned layer
    onward, move it out) and then the other; which side goes first alternates with the layer, so a
    change in machine load hits both sides alike.
    """
    import torch

    from prunectl.prune import calibration as calib

    device = torch.device("cpu")
    sides = (True, False) if product_first else (False, True)
    models = {side: copy.deepcopy(parent) for side in sides}
    clocks = {side: {"total": 0.0, "stats": 0.0, "select": 0.0} for side in sides}
    masks: dict[bool, dict] = {side: {} for side in sides}
    walks = {}
    gc.collect()
    marks = cpu_marks()
    for side in sides:
        t = time.perf_counter()
        walks[side] = calib.Layerwise(models[side], ids, micro, device)
        clocks[side]["total"] += time.perf_counter() - t
    for i in range(len(parent.model.layers)):
        for side in sides if i % 2 == 0 else sides[::-1]:
            clock, walk = clocks[side], walks[side]
            with timed_stats(clock):
                start = time.perf_counter()
                layer = models[side].model.layers[i].to(device)
                if side:
                    stats = calib.collect(layer, lambda: walk.forward(layer, update=False), gram=method == "sparsegpt")
                else:
                    stats = per_linear_stats(layer, walk, gram=method == "sparsegpt")
                t = time.perf_counter()
                select(layer, stats, i, method, ratio, nm, side, masks[side])
                clock["select"] += time.perf_counter() - t
                walk.forward(layer, update=True)
                layer.to("cpu")
                clock["total"] += time.perf_counter() - start
    other = other_cores(marks)
    for side in sides:
        clocks[side]["forward"] = clocks[side]["total"] - clocks[side]["stats"] - clocks[side]["select"]
    return models, masks, clocks, other


def compare(parent, spec, ids, micro: int, repeats: int, stage_masks: dict | None) -> dict:
    import torch

    from prunectl.prune.sparse import parse_pattern

    label, method, ratio, pattern = spec
    nm = parse_pattern(pattern)
    ratio = ratio if ratio is not None else 1 - nm[0] / nm[1]
    sides: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(repeats):
        models, masks, clocks, other = interleaved_pass(parent, ids, micro, method, ratio, nm, product_first=r % 2 == 0)
        mp, mb = masks[True], masks[False]
        bad = [k for k in mp if not torch.equal(mp[k], mb[k])]
        bad += [k for k in mp if not torch.equal(models[True].get_parameter(k), models[False].get_parameter(k))]
        assert mp.keys() == mb.keys() and not bad, f"{label}: masks or pruned weights differ: {bad[:3]}"
        if stage_masks:
            bad = [k for k in mp if not torch.equal(mp[k], stage_masks[k])]
            assert mp.keys() == stage_masks.keys() and not bad, f"{label}: product pass != the method table's apply: {bad[:3]}"
        del models, masks
        for side in (True, False):
            sides[side].append(clocks[side])
        p, b = clocks[True], clocks[False]
        print(f"  {label:14s} pass {r + 1} ({'product' if r % 2 == 0 else 'baseline'} first): "
              f"baseline {b['total']:6.2f} s, product {p['total']:6.2f} s, ratio {b['total'] / p['total']:.3f}; "
              f"statistics {b['stats']:.2f} / {p['stats']:.2f} s, selection {b['select']:.2f} / {p['select']:.2f} s, "
              f"forward {b['forward']:.2f} / {p['forward']:.2f} s; other load {other:.2f} cores", flush=True)
    ratios = [b["total"] / p["total"] for p, b in zip(sides[True], sides[False])]
    changed = (lambda c: c["stats"] + c["select"]) if method == "wanda" else (lambda c: c["stats"])  # noqa: E731
    part = [changed(b) / changed(p) for p, b in zip(sides[True], sides[False])]
    med = {side: {k: statistics.median(c[k] for c in sides[side]) for k in ("total", "forward", "stats", "select")}
           for side in (True, False)}
    bound = statistics.median(b["total"] / (p["total"] - changed(p)) for p, b in zip(sides[True], sides[False]))
    return {"label": label, "product": med[True], "baseline": med[False], "speedup": statistics.median(ratios),
            "bound": bound,
            "ratios": ratios, "part_speedup": statistics.median(part), "stage_checked": bool(stage_masks)}


def print_compare(results: list[dict]) -> None:
    print("\n| pass | side | total s | forward s | statistics s | selection s | speedup (total) | per pass | "
          "speedup (changed parts) | bound |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for side in ("baseline", "product"):
            m = res[side]
            extra = (f"**{res['speedup']:.3f}** | {', '.join(f'{x:.3f}' for x in res['ratios'])} | "
                     f"{res['part_speedup']:.2f} | {res['bound']:.2f}" if side == "product" else " | | | ")
            print(f"| {res['label']} | {side} | {m['total']:.2f} | {m['forward']:.2f} | {m['stats']:.2f} | "
                  f"{m['select']:.2f} | {extra} |")
    for res in results:
        verdict = "PASS" if res["speedup"] >= TARGET else "FAIL"
        print(f"speedup {res['label']:14s} = {res['speedup']:.3f} (median over passes of baseline s / product s; "
              f"median times {res['baseline']['total']:.2f} s / {res['product']['total']:.2f} s)   target {TARGET}   "
              f"{verdict}   (masks identical{', and equal to the stage' if res['stage_checked'] else ''})",
              flush=True)


# ------------------------------------------------------------------------------------------ main


def section(title: str, parent, ids, heldout, args, methods, compares) -> None:
    from prunectl.prune.surgery import Shape

    start, marks = time.perf_counter(), cpu_marks()
    print(f"\n## {title}: {Shape.of(parent).describe()}", flush=True)
    print(f"calibration {ids.shape[0]} x {ids.shape[1]} tokens, micro-batch {args.micro_batch}; "
          f"held-out {heldout.numel():,} tokens ({heldout.shape[0]} x {heldout.shape[1]})", flush=True)
    rows = [parent_row(parent, heldout, args.micro_batch)]
    compared = {s[0] for s in compares}
    for spec in methods:
        rows.append(run_method(parent, spec, ids, heldout, args.micro_batch, args.candidates))
        r = rows[-1]
        if r["label"] not in compared:
            r["masks"] = None  # only the compared passes check against them
        print(f"  {r['label']:18s} prune {r['prune_s']:6.2f} s, held-out ppl {r['ppl']:9.2f}, "
              f"{r['shape']['layers']} layers / hidden {r['shape']['hidden']} / kv {r['shape']['kv_heads']} / "
              f"ffn {r['shape']['ffn']}", flush=True)
    print_methods(rows)
    by_label = {r["label"]: r.get("masks") for r in rows}
    results = []
    for spec in compares:
        results.append(compare(parent, spec, ids, args.micro_batch, args.repeats, by_label.get(spec[0])))
    if results:
        print_compare(results)
    print(f"\n{title}: section took {time.perf_counter() - start:.0f} s, other load {other_cores(marks):.2f} cores",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", default=None, help="runs root (default: $PRUNECTL_RUNS or ./runs)")
    ap.add_argument("--parent", default="tiny-parent@latest")
    ap.add_argument("--data", default=None, help="data run (default: the parent's inputs.data)")
    ap.add_argument("--models", default="tiny,50m", help="comma-separated: tiny, 50m")
    ap.add_argument("--methods", default=",".join(s[0] for s in METHODS), help="labels to run in part 1")
    ap.add_argument("--compare", default=",".join(COMPARE), help="labels timed both ways in part 2 (wanda/sparsegpt)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved product/baseline passes per compared method")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--tiny-samples", type=int, default=32, help="calibration sequences for the tiny parent")
    ap.add_argument("--tiny-heldout", type=int, default=16384, help="held-out tokens for the tiny parent")
    ap.add_argument("--big-samples", type=int, default=16, help="calibration sequences for the 50M model")
    ap.add_argument("--big-heldout", type=int, default=8192, help="held-out tokens for the 50M model")
    ap.add_argument("--big-hidden", type=int, default=768)
    ap.add_argument("--big-layers", type=int, default=8)
    ap.add_argument("--big-heads", type=int, default=12)
    ap.add_argument("--big-kv-heads", type=int, default=4)
    ap.add_argument("--big-ffn", type=int, default=2048)
    ap.add_argument("--min-params", type=int, default=50_000_000)
    ap.add_argument("--candidates", type=int, default=5, help="prune.search.candidates (the tiny recipes' 5)")
    ap.add_argument("--seed", type=int, default=0, help="the 50M model's initialisation")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: see the docstring; 2 on a machine nobody else uses)")
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    known = {s[0]: s for s in METHODS}
    pick = lambda text: [known[x] for x in text.split(",") if x]  # noqa: E731
    unknown = [x for x in (args.methods + "," + args.compare).split(",") if x and x not in known]
    if unknown:
        sys.exit(f"unknown method label(s) {unknown}; choose from {', '.join(known)}")
    methods, compares = pick(args.methods), pick(args.compare)
    if any(s[1] not in ("wanda", "sparsegpt") for s in compares):
        sys.exit("--compare takes wanda and sparsegpt labels only")
    models = [m for m in args.models.split(",") if m]

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"prunectl at {rev or '?'}; {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    run, tiny, data_run, stream = load_inputs(args)
    print(f"parent {run.ref} ({run.final}), data {data_run.ref} (vocab {stream.vocab_size})", flush=True)

    if "tiny" in models:
        ids, heldout = token_batches(stream, data_run.ref, args.tiny_samples, args.seq_len, args.tiny_heldout,
                                     args.micro_batch)
        section(f"tiny parent {run.ref}", tiny, ids, heldout, args, methods, compares)
    if "50m" in models:
        big = build_50m(args, tiny, stream.vocab_size)
        total = sum(p.numel() for p in {id(p): p for p in big.parameters()}.values())
        print(f"\n50M model: {total:,} parameters (tied embedding counted once)", flush=True)
        assert total >= args.min_params, f"the 50M model has {total:,} parameters, below --min-params {args.min_params:,}"
        ids, heldout = token_batches(stream, data_run.ref, args.big_samples, args.seq_len, args.big_heldout,
                                     args.micro_batch)
        section(f"random-init {total / 1e6:.1f}M Llama", big, ids, heldout, args, methods, compares)
    print(f"\nwhole run: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Prune memory: peak host memory of the `prune` stage against the number of calibration samples and the
parent's size, with the layer-wise pass's hidden states spilled to the run directory past a budget.

What it runs: the real stage (`prunectl prune <recipe> --executor debug`, one rank in the worker's own
process) on a bf16 parent built here: a random-init Llama (prunectl.model.build, --seed) with hidden 3072,
2 layers, 24 heads, 8 KV heads, MLP 6144 and the data run's tied 2048 vocabulary, 170 M parameters (the
script refuses fewer than --min-params, 150 M), saved with its tokenizer as a Hugging Face directory in
bf16 (config.json records it, so the stage loads and saves bf16). Wide and shallow on purpose: the hidden
states per calibration token are large against the compute per token, so they show in memory within
minutes on two cores. Calibration reads the data run's "calibration" range (default tiny-data@latest
under --runs-dir) at --seq-len tokens, micro batch 8; held-out loss is off.

Per method (Wanda 50% unstructured, Minitron-width 50% with 2 candidates), prunes each in a fresh subprocess:

  1x           --samples sequences, calibration.memory_gb = --budget-gb (sized so they fit: kept in memory);
  4x spilled   4 x --samples sequences, the same budget (they exceed it: spilled to the run directory);
  4x in RAM    4 x --samples sequences, calibration.memory_gb = 64 (kept in memory);

Minitron-width keeps no hidden states across batches, so it runs 1x and 4x only (its budget changes nothing).

Columns: peak growth = the worker's peak resident memory (VmHWM) over the whole prune minus its VmRSS just
before it (torch, transformers' Llama, deepspeed and prunectl's stage already imported). The workers run
with MALLOC_MMAP_THRESHOLD_=1 MiB, so freed blocks leave the resident set and the peak is the live
memory's, not the allocator's history (without it the same prune's peak moved by ~100 MB between runs).
vs parent = peak growth / the parent's bf16 safetensors size; in phase = the same peak within the method's
own Meter phases (prune (sequential), or score channels + search: where the calibration data lives; the
worker resets VmHWM through /proc/self/clear_refs as each phase starts); hidden MB and spilled from the
report's calibration_memory (the layer-wise pass's hidden states: Wanda only; Minitron-width scores the
whole model a batch at a time and keeps no per-sample state); prune s = the seconds of those phases;
total s = every phase.

Printed ratios, all from this one run: peak growth 4x spilled / 1x, whole run and in the method's phases
(the spill bounds memory: target <= 1.10), 4x in RAM / 1x (what the hidden states cost without it), and
prune s 4x spilled / 4x in RAM (the time cost of spilling: the pass writes and reads every batch's hidden
states once per layer).

    .venv/bin/python benchmarks/prune_memory.py [--runs-dir runs] [--samples 24] [--seq-len 128]
                                                [--budget-gb 0.025] [--threads 2] [--smoke]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPE = """
name: {name}
stage: prune
parent: {parent}
data: {data}
calibration: {{range: calibration, samples: {samples}, seq_len: {seq_len}, micro_batch: 8, memory_gb: {budget}}}
heldout: {{range: validation, tokens: 0, seq_len: {seq_len}}}
prune: {{method: {method}, ratio: 0.5, search: {{candidates: 2}}}}
launch: {{tasks_per_node: 1, cpus_per_task: {threads}, time_min: 60}}
"""
IN_RAM_GB = 64
LAYERWISE = ("wanda",)  # the methods of --methods whose hidden states the budget bounds
METHOD_PHASES = {"wanda": ("prune (sequential)",), "minitron-width": ("score channels", "search")}


def status(key: str) -> int:
    """VmRSS / VmHWM of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak() -> None:
    """VmHWM starts again from the current VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(recipe: str, root: str) -> None:
    """One prune in this fresh process; prints the peak of each Meter phase and the report as a JSON line."""
    from contextlib import contextmanager

    # imported before the baseline, so the growth is the prune's own: the rank setup loads deepspeed, and
    # transformers' Llama modules alone add ~130 MB
    for module in ("deepspeed", "transformers.models.llama.modeling_llama", "prunectl.prune.methods",
                   "prunectl.stages.prune"):
        importlib.import_module(module)
    from prunectl import cli
    from prunectl.prune.meter import Meter

    peaks: dict[str, int] = {}
    phase = Meter.phase

    @contextmanager
    def measured(self, name: str):  # the phases cover the job from loading the parent to saving the result
        reset_peak()
        try:
            with phase(self, name):
                yield
        finally:
            peaks[name] = status("VmHWM")

    Meter.phase = measured
    base = status("VmRSS")
    sys.argv = ["prunectl", "prune", recipe, "--executor", "debug", "--runs-dir", root]
    try:
        cli.main()
    except SystemExit as done:
        if done.code:
            raise
    name = Path(recipe).stem
    report = json.loads((Path(root) / name / "v001" / "report.json").read_text())
    print(json.dumps({"growth": {k: v - base for k, v in peaks.items()}, "report": report}))


def build_parent(args, data_dir: Path, out: Path) -> int:
    """A seeded bf16 Llama saved with the data run's tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer

    from prunectl import model as models

    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    cfg = models.ModelConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                             ffn=args.ffn, max_position=max(256, args.seq_len), tie_embeddings=True)
    config = models.llama_config(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                 tokenizer.pad_token_id)
    parent = models.build(config, args.seed).to(torch.bfloat16)
    parent.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in parent.parameters())


def prune_in_subprocess(root: Path, name: str, fields: dict) -> dict:
    recipe = root / f"{name}.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(name=name, **fields)))
    # glibc otherwise serves large blocks from its heap once large frees raised its mmap threshold, and freed
    # memory then stays resident by chance: a fixed threshold returns every block over 1 MiB when it is freed
    env = {**os.environ, "PRUNECTL_RUNS": str(root), "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, __file__, "--worker", str(recipe), str(root)], env=env, cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", default=None, help="runs root holding the data run (default: $PRUNECTL_RUNS or ./runs)")
    ap.add_argument("--data", default="tiny-data@latest")
    ap.add_argument("--samples", type=int, default=24, help="calibration sequences at 1x")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--budget-gb", type=float, default=0.025, help="calibration.memory_gb: 1x fits, 4x spills")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="wanda,minitron-width")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=6144)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-params", type=float, default=150e6)
    ap.add_argument("--smoke", action="store_true", help="a tiny parent and 8 samples: checks the script runs")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.smoke:
        args.hidden, args.heads, args.kv_heads, args.ffn, args.samples, args.seq_len = 64, 4, 2, 128, 8, 32
        args.min_params, args.budget_gb = 0, 1e-4

    from prunectl import store

    data_run = store.resolve(store.runs_root(args.runs_dir), args.data)
    with tempfile.TemporaryDirectory(prefix="prune-memory-") as tmp:
        root = Path(tmp)
        (root / data_run.dir.parent.name).mkdir()
        (root / data_run.dir.parent.name / data_run.dir.name).symlink_to(data_run.dir, target_is_directory=True)
        parent = root / "parent"
        params = build_parent(args, data_run.dir, parent)
        parent_bytes = sum(f.stat().st_size for f in parent.glob("*.safetensors"))
        print(f"bf16 parent: {params:,} parameters, {parent_bytes / 2**20:,.0f} MiB; calibration {args.samples} "
              f"and {4 * args.samples} x {args.seq_len} tokens; budget {args.budget_gb} GB; {args.threads} threads")
        if params < args.min_params:
            raise SystemExit(f"{params:,} parameters is below --min-params {args.min_params:,.0f}")
        common = {"parent": parent, "data": data_run.ref, "seq_len": args.seq_len, "threads": args.threads}
        print(f"{'method':15s} {'case':11s} {'peak growth MiB':>15s} {'vs parent':>9s} {'in phase MiB':>12s} "
              f"{'hidden MB':>9s} {'spilled':>7s} {'prune s':>8s} {'total s':>8s}")
        for method in args.methods.split(","):
            cases = [("1x", args.samples, args.budget_gb), ("4x spilled", 4 * args.samples, args.budget_gb),
                     ("4x in RAM", 4 * args.samples, IN_RAM_GB)]
            if method not in LAYERWISE:  # nothing to spill: the budget changes nothing
                cases = [("1x", args.samples, args.budget_gb), ("4x", 4 * args.samples, args.budget_gb)]
            rows = {}
            for k, (case, samples, budget) in enumerate(cases):
                out = prune_in_subprocess(root, f"{method}-{k}", {**common, "method": method, "samples": samples,
                                                                   "budget": budget})
                growth, phases = out["growth"], out["report"]["phases"]
                memory = out["report"].get("calibration_memory") or {}
                ours = [p["phase"] for p in phases if p["phase"].startswith(METHOD_PHASES[method])]
                rows[case] = row = {
                    "peak": max(growth.values()) / 2**20, "method_peak": max(growth[p] for p in ours) / 2**20,
                    "prune_s": sum(p["seconds"] for p in phases if p["phase"] in ours),
                    "total_s": sum(p["seconds"] for p in phases)}
                hidden = f"{memory['hidden_states_gb'] * 1024:.0f}" if memory else "-"
                print(f"{method:15s} {case:11s} {row['peak']:15,.0f} {row['peak'] * 2**20 / parent_bytes:9.2f} "
                      f"{row['method_peak']:12,.0f} {hidden:>9s} {str(memory.get('spilled', '-')):>7s} "
                      f"{row['prune_s']:8.1f} {row['total_s']:8.1f}", flush=True)
            one = rows["1x"]
            for case in [c for c in rows if c != "1x"]:
                r = rows[case]
                print(f"{method}: peak growth {case} / 1x = {r['peak'] / one['peak']:.3f}, in its phases "
                      f"{r['method_peak'] / one['method_peak']:.3f}" + (" (target <= 1.10)" if case != "4x in RAM" else ""))
            if "4x in RAM" in rows:
                print(f"{method}: prune s 4x spilled / 4x in RAM = "
                      f"{rows['4x spilled']['prune_s'] / rows['4x in RAM']['prune_s']:.2f} (the time cost of spilling)")


if __name__ == "__main__":
    main()

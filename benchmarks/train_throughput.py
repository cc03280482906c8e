"""Training throughput: prunectl's engine against a bare PyTorch loop, same model, batches and CPU threads.

What it measures: steady-state training tokens/s (optimizer steps of global_batch x seq_len tokens) of

  bare      a plain loop: prunectl.model.build(seed), the batches of prunectl.data.SequencePlan in
            run order, torch.optim.AdamW with the recipe's hyperparameters, the recipe's LR schedule
            (prunectl.train.lr_factor via LambdaLR), grad clipping, fp32, loss.item() every step;
  prunectl  the real engine, prunectl.stages.train.run(run, recipe) in this process (single gloo rank,
            DeepSpeed ZeRO), on a run directory set up the way `prunectl pretrain` sets it up;

and the ratio prunectl / bare (target >= 0.9).

How: the tiny data is prepared into a temporary runs dir (`prunectl data prepare
recipes/tiny/data.yaml`) and recipes/tiny/parent.yaml is resolved with train.tokens=--tokens,
eval_every=0, checkpoint_every=0 (so the one evaluation, at the end, and the save fall outside the
timed windows) and log_every=5. Both sides time windows of 5 optimizer steps the same way;
prunectl's come from the run's metrics.jsonl ("tokens_per_s"). The first --warmup-windows windows
are dropped and a run's steady-state rate is its median window, which shrugs off short bursts of
other load on a shared machine; the CPU other processes used during each run is printed in cores
(more than ~0.1 spoils a 2-core timing). Both sides use the recipe's launch.cpus_per_task (2)
torch threads, which prunectl gets as PRUNECTL_THREADS. Repeats alternate which side goes first
(bare, prunectl, prunectl, bare, ...) so drifts cancel; the table gives the medians over repeats
and the median of the per-repeat ratios. End-to-end wall time (prunectl: DeepSpeed setup, training,
final evaluation and save; bare: build and loop) is for information only. The last window's loss of
both sides is printed to show they train the same thing.

    .venv/bin/python benchmarks/train_throughput.py [--tokens 409600] [--zero-stage 2] [--repeats 4]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prunectl import recipe as recipes, store  # noqa: E402

LOG_EVERY = 5


def cpu_marks() -> tuple[float, float, float]:
    """(CPU-seconds busy machine-wide, CPU-seconds of this process, wall seconds), to tell other load apart."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    t = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.monotonic()


def steady(windows: list[tuple[int, float]], skip: int) -> float:
    """Median tokens/s of the (tokens, seconds) windows after the first `skip`."""
    return statistics.median(t / s for t, s in windows[skip:])


def threads(r) -> int:
    return r.launch.cpus_per_task or 1  # what launch.Threaded exports as PRUNECTL_THREADS


def bare(r, runs: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from prunectl import model as models
    from prunectl.data import SequencePlan, TokenStream, batch
    from prunectl.train import lr_factor

    t0 = time.perf_counter()
    torch.set_num_threads(threads(r))
    cfg, opt = r.train, r.optimizer
    data_dir = store.resolve(runs, r.data).dir
    stream, tok = TokenStream(data_dir), AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    step_tokens = cfg.global_batch * cfg.seq_len
    steps, micro = cfg.tokens // step_tokens, cfg.global_batch // cfg.micro_batch
    plan = SequencePlan([stream.range(n) for n in cfg.data_ranges], cfg.seq_len, steps * cfg.global_batch, cfg.seed)
    net = models.build(models.llama_config(r.model, stream.vocab_size, tok.bos_token_id, tok.eos_token_id,
                                           tok.pad_token_id), cfg.seed)
    net.train()
    optim = torch.optim.AdamW(net.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, steps, opt))

    windows, losses, start = [], [], time.perf_counter()
    for step in range(steps):
        starts = plan.starts(step * cfg.global_batch, cfg.global_batch)
        step_loss = 0.0
        for m in range(micro):
            x = torch.from_numpy(batch(stream, starts[m * cfg.micro_batch:(m + 1) * cfg.micro_batch], cfg.seq_len))
            loss = net(input_ids=x, labels=x).loss
            (loss / micro).backward()
            step_loss += loss.item() / micro
        if opt.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), opt.grad_clip)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            now = time.perf_counter()
            windows.append((len(losses) * step_tokens, now - start))
            last_loss, losses, start = sum(losses) / len(losses), [], now
    return {"windows": windows, "wall": time.perf_counter() - t0, "loss": last_loss}


def prunectl_run(r, runs: Path) -> dict:
    from prunectl.stages import train as train_stage

    run = store.allocate(runs, r.name)
    (run.dir / "recipe.yaml").write_text(recipes.dump(r))
    run.write_manifest(store.Manifest(name=r.name, version=run.version, stage="pretrain",
                                      inputs={"data": store.resolve(runs, r.data).ref}, executor="here"))
    os.environ["PRUNECTL_THREADS"] = str(threads(r))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the Reporter's per-window lines
        train_stage.run(run, r)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    records = [x for x in records if "tokens_per_s" in x]
    windows, prev = [], 0
    for x in records:
        windows.append((x["tokens"] - prev, (x["tokens"] - prev) / x["tokens_per_s"]))
        prev = x["tokens"]
    return {"windows": windows, "wall": wall, "loss": records[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100 * 16 * 256, help="training budget per run (default: 100 steps)")
    ap.add_argument("--zero-stage", type=int, default=None, help="DeepSpeed ZeRO stage (default: the recipe's, 2)")
    ap.add_argument("--repeats", type=int, default=4,
                    help="bare/prunectl pairs (odd: bare first, even: prunectl first); one pair varies by up to ~9%%")
    ap.add_argument("--warmup-windows", type=int, default=2, help=f"leading windows of {LOG_EVERY} steps to drop")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the temporary runs dir is removed

    overrides = [f"train.tokens={args.tokens}", "train.eval_every=0", "train.checkpoint_every=0",
                 f"train.log_every={LOG_EVERY}"]
    if args.zero_stage is not None:
        overrides.append(f"train.zero_stage={args.zero_stage}")
    r = recipes.resolve(str(ROOT / "recipes/tiny/parent.yaml"), overrides)
    cfg = r.train
    steps = cfg.tokens // (cfg.global_batch * cfg.seq_len)
    if steps < (args.warmup_windows + 1) * LOG_EVERY:
        sys.exit(f"--tokens gives {steps} steps; need more than {args.warmup_windows} warm-up windows of {LOG_EVERY}")

    with tempfile.TemporaryDirectory(prefix="prunectl-bench-") as tmp:
        runs = Path(tmp)
        cli = Path(sys.executable).parent / "prunectl"
        subprocess.run([str(cli), "data", "prepare", str(ROOT / "recipes/tiny/data.yaml"), "--runs-dir", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"{r.name}: {steps} steps of {cfg.global_batch}x{cfg.seq_len} tokens, micro_batch {cfg.micro_batch}, "
              f"ZeRO {cfg.zero_stage}, fp32, {threads(r)} threads; steady state = windows of {LOG_EVERY} steps "
              f"after the first {args.warmup_windows}", flush=True)
        results: dict[str, list[dict]] = {"bare": [], "prunectl": []}
        for i in range(args.repeats):
            order = (("bare", bare), ("prunectl", prunectl_run))
            for side, fn in order if i % 2 == 0 else order[::-1]:
                before = cpu_marks()
                res = fn(r, runs)
                busy, own, wall = (b - a for a, b in zip(before, cpu_marks()))
                res["other"] = (busy - own) / wall
                res["tps"] = steady(res["windows"], args.warmup_windows)
                results[side].append(res)
                gc.collect()
                print(f"  repeat {i + 1} {side:8s} {res['tps']:8.0f} tokens/s  (end-to-end {res['wall']:.1f} s, "
                      f"last-window loss {res['loss']:.4f}, other load {res['other']:.2f} cores)", flush=True)

    ratios = [x["tps"] / y["tps"] for x, y in zip(results["prunectl"], results["bare"])]
    ratio = statistics.median(ratios)
    print(f"\n{'':10s}{'tokens/s':>10s}{'end-to-end s':>14s}")
    for side in ("bare", "prunectl"):
        med = {k: statistics.median(x[k] for x in results[side]) for k in ("tps", "wall")}
        print(f"{side:10s}{med['tps']:10.0f}{med['wall']:14.1f}")
    print(f"ratio     {ratio:10.3f}   target 0.9   {'PASS' if ratio >= 0.9 else 'FAIL'}"
          f"   (median of per-repeat ratios {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()

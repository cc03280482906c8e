"""Training memory per rank: ZeRO-0 vs ZeRO-3, activation checkpointing off vs on, full-vocabulary vs chunked loss,
each measured peak next to the preflight's estimate (prunectl.memory).

What it runs: prunectl's own training pieces (the `CausalLM` root with `next_token_loss`, `checkpoint_layers`,
`train.deepspeed_config`, DeepSpeed ZeRO with torch AdamW, fp32) on 2 CPU ranks over gloo, one optimizer step
of one 2048-token sequence per rank, for a Llama with Llama-3's 128,256-token vocabulary (default: 8 layers,
hidden 512, 8 heads, 2 KV heads, ffn 1536: 156M parameters). Each setting runs in 2 fresh processes.

What it measures, per rank: the growth of resident memory from just before the model is built to the peak of the
second training step (Linux VmHWM, reset after the first step: the steady state every later step repeats, with
the optimizer's state in place), and, apart, the peak of the model build itself: the whole model on every rank
at ZeRO-0, made straight into partitions at ZeRO-3 (deepspeed.zero.Init, as train.fit does). The CPU proxy for
per-GPU memory.

    .venv/bin/python benchmarks/train_memory.py [--layers 8 --hidden 512 --vocab 128256 --seq 2048 --chunk 256]
    .venv/bin/python benchmarks/train_memory.py --build-only --layers 16 --hidden 2048 --heads 16 --kv-heads 4 \
        --ffn 5632 --vocab 32000      # the build alone, for a model whose weights dominate (~1 min)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MIB = 1 << 20

# (label, ZeRO stage, activation checkpointing, loss chunk tokens: 0 = the whole sequence's logits at once)
SETTINGS = [
    ("ZeRO-0, no checkpointing, full-vocabulary loss", 0, "none", 0),
    ("ZeRO-0, no checkpointing, chunked loss", 0, "none", None),
    ("ZeRO-0, full checkpointing, chunked loss", 0, "full", None),
    ("ZeRO-3, full checkpointing, chunked loss", 3, "full", None),
]
# Bucket sizes below the model's size, so the buffers DeepSpeed allocates are touched (and counted in RSS) as on a GPU.
BUCKETS = {"zero_optimization": {"reduce_bucket_size": 20_000_000, "stage3_prefetch_bucket_size": 5_000_000,
                                 "allgather_bucket_size": 20_000_000}}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def train_config(args, zero: int, checkpointing: str, chunk: int):
    from prunectl.train import TrainConfig

    deepspeed = BUCKETS if zero else {}
    return TrainConfig(tokens=4 * args.seq, seq_len=args.seq, global_batch=2, micro_batch=1, zero_stage=zero,
                       activation_checkpointing=checkpointing, loss_chunk_tokens=chunk, deepspeed=deepspeed)


def shape(args):
    from prunectl.model import Shape

    return Shape(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                 head_dim=args.hidden // args.heads, ffn=args.ffn, vocab=args.vocab)


def rank(r: int, port: int, args, setting: tuple, out) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=os.path.join(sys.prefix, "torch_extensions"))
    import deepspeed
    import torch

    from prunectl import model as models
    from prunectl.loss import CausalLM, checkpoint_layers
    from prunectl.train import OptimizerConfig, deepspeed_config

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    _, zero, checkpointing, chunk = setting
    cfg = train_config(args, zero, checkpointing, args.chunk if chunk is None else chunk)
    s = shape(args)
    config = models.llama_config(models.ModelConfig(layers=s.layers, hidden=s.hidden, heads=s.heads,
                                                    kv_heads=s.kv_heads, ffn=s.ffn, vocab=s.vocab), s.vocab, 1, 2, 0)
    ds_config = deepspeed_config(cfg, OptimizerConfig(), 2, False)
    # the collectives' own buffers (gloo, DeepSpeed's shared-memory op) are made by the first calls: before the baseline
    x = torch.zeros(1 << 20)
    torch.distributed.broadcast(x, 0)
    torch.distributed.all_gather_into_tensor(torch.zeros(2 << 20), x)
    base = _status("VmRSS")
    # as train.fit builds it: ZeRO-3 makes the model straight into partitions (deepspeed.zero.Init)
    root = CausalLM(models.build(config, 0, ds_config if zero == 3 else None), cfg.loss_chunk_tokens)
    built = (_status("VmHWM") - base) / MIB
    if args.build_only:
        out.put((r, 0.0, built))
        return
    checkpoint_layers(root.lm, checkpointing)
    engine, *_ = deepspeed.initialize(model=root, model_parameters=[p for p in root.parameters()], config=ds_config)
    engine.train()
    for step in range(2):  # the first step creates the optimizer's state; the second is every later step
        if step == 1:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is step 2's
        x = torch.randint(0, s.vocab, (1, args.seq), generator=torch.Generator().manual_seed(2 * step + r))
        loss = engine(x)
        engine.backward(loss)
        engine.step()
    out.put((r, (_status("VmHWM") - base) / MIB, built))


def measure(args, setting) -> tuple[list[float], list[float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=rank, args=(r, port, args, setting, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return [growth for _, growth, _ in results], [built for _, _, built in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 8), ("hidden", 512), ("heads", 8), ("kv-heads", 2), ("ffn", 1536),
                          ("vocab", 128_256), ("seq", 2048), ("chunk", 256), ("threads", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--build-only", action="store_true",
                        help="only the model build's peak, ZeRO-0 (whole model per rank) vs ZeRO-3 (zero.Init)")
    args = parser.parse_args()
    from prunectl.memory import estimate, total

    if args.build_only:
        return build_only(args)

    s = shape(args)
    print(f"Llama: {s.parameters() / 1e6:.0f}M parameters ({args.layers} layers, hidden {args.hidden}, vocab "
          f"{args.vocab:,}); {args.seq} tokens per rank; 2 ranks, fp32, CPU; loss chunk {args.chunk} tokens")
    peaks, builds = {}, {}
    print(f"{'setting':50s} {'rank 0 MiB':>11s} {'rank 1 MiB':>11s} {'estimate MiB':>13s} {'estimate/measured':>18s}"
          f" {'build peak MiB':>15s}")
    for setting in SETTINGS:
        label, zero, checkpointing, chunk = setting
        growth, built = measure(args, setting)
        cfg = train_config(args, zero, checkpointing, args.chunk if chunk is None else chunk)
        est = total(estimate(s, cfg, 2, False, False)) / MIB
        peaks[label], builds[label] = max(growth), max(built)
        print(f"{label:50s} {growth[0]:11.0f} {growth[1]:11.0f} {est:13.0f} {est / max(growth):18.2f}"
              f" {max(built):15.0f}", flush=True)
    names = [label for label, *_ in SETTINGS]
    print()
    for what, a, b in (("full-vocabulary loss / chunked loss", names[0], names[1]),
                       ("checkpointing off / on", names[1], names[2]), ("ZeRO-0 / ZeRO-3", names[2], names[3])):
        print(f"{what:40s} {peaks[a] / peaks[b]:.2f}x  (peak per rank {peaks[a]:.0f} / {peaks[b]:.0f} MiB)")
    # The build: ZeRO-0 holds the whole fp32 model on each rank; zero.Init its half plus one module made whole.
    whole, largest = 4 * s.parameters() / MIB, 4 * s.vocab * s.hidden / MIB
    print(f"{'model build, ZeRO-0 / ZeRO-3 (zero.Init)':40s} {builds[names[2]] / builds[names[3]]:.2f}x  (peak per rank "
          f"{builds[names[2]]:.0f} / {builds[names[3]]:.0f} MiB; whole model {whole:.0f} MiB, half {whole / 2:.0f} + "
          f"largest module {largest:.0f} MiB)")


def build_only(args) -> None:
    """The build's peak per rank: the whole fp32 model on every rank (ZeRO-0) against zero.Init's partitions."""
    # glibc's default lets freed tensors stay resident (its mmap threshold grows with each free); a fixed threshold
    # returns each freed tensor to the system, so the peak is what was live at once (read at the ranks' start)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    s = shape(args)
    whole, largest = 4 * s.parameters() / MIB, 4 * max(s.vocab * s.hidden, s.ffn * s.hidden) / MIB
    print(f"Llama: {s.parameters() / 1e6:.0f}M parameters ({args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, "
          f"vocab {args.vocab:,}), fp32: {whole:.0f} MiB; 2 ranks")
    peaks = {}
    for label, zero in (("ZeRO-0: the whole model on each rank", 0), ("ZeRO-3: made in partitions (zero.Init)", 3)):
        built = measure(args, (label, zero, "none", None))[1]
        peaks[zero] = max(built)
        print(f"{label:45s} build peak: rank 0 {built[0]:6.0f} MiB, rank 1 {built[1]:6.0f} MiB", flush=True)
    bound = whole / 2 + 2 * largest  # a tensor being made or gathered whole, and a collective's copy of it
    print(f"ZeRO-0 / ZeRO-3 build peak: {peaks[0] / peaks[3]:.2f}x; ZeRO-3's expected peak: half the model "
          f"{whole / 2:.0f} + twice the largest tensor {largest:.0f} MiB = {bound:.0f} MiB "
          f"(measured / expected {peaks[3] / bound:.2f})")


if __name__ == "__main__":
    main()

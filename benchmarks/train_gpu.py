"""Training throughput on one GPU: tokens/s and MFU for Llama-3.1-8B layer shapes at 8192 tokens, with and without
activation checkpointing and torch.compile.

What it runs: prunectl's training root (`prunectl.loss.CausalLM`: the decoder, then the chunked next-token loss)
for a Llama with Llama-3.1-8B's layer shapes (hidden 4096, 32 heads, 8 KV heads, ffn 14,336, vocabulary 128,256)
and as many layers as --layers asks (default 4: an 8B parent's 32 do not fit one GPU without sharding), in bf16
with TF32 matmuls and fused AdamW, one 8192-token sequence per step. For each setting: --warmup steps, then
--steps timed steps (synchronised). MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s, with model
FLOPs per token = 6 x parameters + 12 x layers x hidden x sequence (attention), as in the PaLM paper's appendix;
recomputation is not counted as useful work.

    .venv/bin/python benchmarks/train_gpu.py                  # on a GPU machine; --peak-tflops if not H100/H200
    .venv/bin/python benchmarks/train_gpu.py --smoke          # tiny shapes on CPU: the script itself works
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def run(args, checkpointing: str, compiled: bool) -> dict[str, float]:
    import torch

    from prunectl import model as models
    from prunectl.loss import CausalLM, checkpoint_layers

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = models.llama_config(models.ModelConfig(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        ffn=args.ffn, vocab=args.vocab, max_position=args.seq), args.vocab, 1, 2, 0)
    root = CausalLM(models.build(config, 0), args.chunk).to(device=device, dtype=dtype)
    checkpoint_layers(root.lm, checkpointing)
    if compiled:
        for layer in root.lm.model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-4, fused=cuda)
    x = torch.randint(0, args.vocab, (1, args.seq), device=device)
    root.train()

    def step() -> None:
        loss = root(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    n = sum(p.numel() for p in root.parameters())
    flops_per_token = 6 * n + 12 * args.layers * args.hidden * args.seq
    tokens_per_s = args.seq / seconds
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if cuda and k in torch.cuda.get_device_name()),
                                    None)
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / (peak * 1e12) if peak else float("nan"),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), "parameters": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    for name, default in (("layers", 4), ("hidden", 4096), ("heads", 32), ("kv-heads", 8), ("ffn", 14336),
                          ("vocab", 128_256), ("seq", 8192), ("chunk", 2048), ("steps", 10), ("warmup", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.heads, args.kv_heads, args.ffn = 2, 128, 4, 2, 256
        args.vocab, args.seq, args.chunk, args.steps, args.warmup = 1024, 128, 64, 2, 1
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{args.layers} layers of hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab:,}; {args.seq} tokens per step")
    print(f"{'checkpointing':14s} {'compile':8s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s}")
    settings = [("none", False), ("selective", False), ("full", False)]
    if not args.smoke:  # compiling needs a GPU toolchain to be worth measuring
        settings += [("none", True), ("selective", True)]
    for checkpointing, compiled in settings:
        try:
            r = run(args, checkpointing, compiled)
        except torch.OutOfMemoryError:
            print(f"{checkpointing:14s} {str(compiled):8s} {'out of memory':>10s}")
            torch.cuda.empty_cache()
            continue
        print(f"{checkpointing:14s} {str(compiled):8s} {r['tokens_per_s']:10.0f} {r['mfu']:6.1%} {r['peak_gib']:9.1f}",
              flush=True)


if __name__ == "__main__":
    main()

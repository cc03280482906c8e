"""Perplexity memory: peak memory of prunectl's evaluator against lm-eval's loglikelihood_rolling.

What it measures: how much a process's peak resident memory grows while it scores the same texts
with the same model, window length and batch size, by

  lm-eval   HFLM(pretrained=model, max_length=M, batch_size=B, add_bos_token=False).loglikelihood_rolling,
            which takes log-softmax over the whole [B, M, vocabulary] logits;
  prunectl  prunectl.evaluate.perplexity.score_windows at batch B, which runs the LM head only on the
            scored positions, a slice at a time, so no [B, M, vocabulary] tensor exists;

each side in its own fresh process (peak = ru_maxrss after scoring minus ru_maxrss after loading),
and their time and total log-likelihood (which must agree). The model is a seeded random Llama with
the tiny parent's shape (12 layers, hidden 128) but a real vocabulary size (default 32,000, Llama-2's;
--vocab 128256 for Llama-3's), since the vocabulary is what makes logits large; the texts are the
first --docs documents of the tiny data's validation range.

    .venv/bin/python benchmarks/eval_memory.py [--vocab 32000] [--max-length 1024] [--batch 8] [--docs 16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]


def side(name: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """(total log-likelihood, peak growth in MiB, seconds) of one side, in this (fresh) process."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import torch

    from eval_throughput import load

    torch.set_num_threads(args.threads)
    model, tokenizer, texts = load(None, args.vocab, args.docs)
    if name == "lm-eval":
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch,
                  max_length=args.max_length, add_bos_token=False)
        requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in texts]
        run = lambda: sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))  # noqa: E731
    else:
        from prunectl.evaluate.perplexity import score_windows, text_windows

        windows = [w for t in texts for w in text_windows(tokenizer, [t], args.max_length, None)]
        run = lambda: score_windows(model, windows, args.batch, torch.device("cpu")).log_likelihood  # noqa: E731
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    total = run()
    seconds = time.perf_counter() - start
    return total, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logits = args.batch * args.max_length * args.vocab * 4 / 2**20
    print(f"random Llama, tiny parent's shape, vocabulary {args.vocab:,}; windows of {args.max_length}, batch "
          f"{args.batch}, {args.threads} threads; one batch's fp32 logits: {logits:,.0f} MiB")
    results = {}
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for name in ("lm-eval", "prunectl"):
            results[name] = pool.apply(side, (name, args))
    print(f"{'side':9s} {'peak growth MiB':>16s} {'seconds':>8s} {'total log-likelihood':>22s}")
    for name, (total, peak, seconds) in results.items():
        print(f"{name:9s} {peak:16,.0f} {seconds:8.1f} {total:22.4f}")
    (a, pa, _), (b, pb, _) = results["lm-eval"], results["prunectl"]
    print(f"log-likelihood relative difference {abs(a - b) / abs(b):.1e}; "
          f"peak memory lm-eval / prunectl: {pa / max(pb, 1e-9):.1f}x")


if __name__ == "__main__":
    main()

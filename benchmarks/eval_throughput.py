"""Perplexity throughput: prunectl's batched evaluator against lm-eval's loglikelihood_rolling, same run.

What it measures: tokens scored per second when computing the rolling log-likelihood of the same
texts with the same model, window length and batch size, by

  lm-eval-1  HFLM(pretrained=model, max_length=M, add_bos_token=False).loglikelihood_rolling at lm-eval's
             default batch size (1), the path a perplexity task takes unless told otherwise;
  lm-eval-B  the same at batch size B;
  prunectl   prunectl.evaluate.perplexity: every text's windows batched together (B per forward), the
             LM head run only on the scored positions;
  forward    the decoder's forward pass alone over the same padded batches, without the LM head: less
             than any side can do, so lm-eval-1 / forward bounds what any evaluator could gain;

and the ratios prunectl / lm-eval-1 (the target, >= 3 on this CPU) and prunectl / lm-eval-B. All
sides must give the same total log-likelihood (printed, with the relative difference). Sides rotate
their order over repeats; medians are reported.

The speed-up comes from batching, from not doing per-window work in Python and from not taking
log-softmax over the whole vocabulary at every position; against lm-eval already batched at B it is
small with a small vocabulary. --vocab N times a seeded random Llama of the tiny shape with N tokens.

The model is the newest complete tiny-parent (`make pretrain-tiny`), --model DIR or --vocab N; the texts are
the first --docs documents of the tiny data's validation range, as text.

    .venv/bin/python benchmarks/eval_throughput.py [--model DIR | --vocab N] [--docs 64] [--max-length 256] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load(model_dir: Path | None, vocab: int | None, docs: int):
    """(model, tokenizer, texts): the trained tiny parent (or model_dir), or with a vocabulary size a
    seeded random Llama of the tiny parent's shape with that vocabulary; the first `docs` documents of
    the tiny data's validation range."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunectl import model as models
    from prunectl import recipe as recipes
    from prunectl import store
    from prunectl.data import deal_ranges, read_documents

    parent = store.resolve(store.runs_root(), "tiny-parent@latest").final
    tokenizer = AutoTokenizer.from_pretrained(model_dir or parent)
    if vocab is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir or parent, dtype=torch.float32, attn_implementation="sdpa")
    else:
        shape = recipes.resolve(str(REPO / "recipes/tiny/parent.yaml")).model
        model = models.build(models.llama_config(shape, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, None), seed=0)
    data = recipes.resolve(str(REPO / "recipes/tiny/data.yaml")).data
    texts = deal_ranges(read_documents(data), data.ranges, data.seed)["validation"][:docs]
    return model.eval(), tokenizer, texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="a random Llama of the tiny shape with this vocabulary")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from prunectl.evaluate.perplexity import score_windows, text_windows

    torch.set_num_threads(args.threads)
    model, tokenizer, texts = load(args.model, args.vocab, args.docs)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch,
              max_length=args.max_length, add_bos_token=False)
    lm_default = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu",
                      max_length=args.max_length, add_bos_token=False)  # batch_size: lm-eval's default
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in texts]
    device = torch.device("cpu")

    def lm_eval_side(harness) -> tuple[float, float]:
        start = time.perf_counter()
        total = sum(harness.loglikelihood_rolling(requests, disable_tqdm=True))
        return total, time.perf_counter() - start

    def prunectl_side() -> tuple[float, float]:
        start = time.perf_counter()
        windows = [w for t in texts for w in text_windows(tokenizer, [t], args.max_length, None)]
        total = score_windows(model, windows, args.batch, device).log_likelihood
        return total, time.perf_counter() - start

    def forward_side() -> tuple[float, float]:
        """The floor: the decoder's forward pass alone over the same padded batches; no LM head, no scoring."""
        windows = sorted((w.inputs for t in texts for w in text_windows(tokenizer, [t], args.max_length, None)), key=len)
        start = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(windows), args.batch):
                chunk = windows[b : b + args.batch]
                x = torch.zeros(len(chunk), len(chunk[-1]), dtype=torch.long)
                for r, ids in enumerate(chunk):
                    x[r, : len(ids)] = torch.from_numpy(ids)
                model.model(input_ids=x, use_cache=False)
        return math.nan, time.perf_counter() - start

    tokens = sum(len(w.targets) for t in texts for w in text_windows(tokenizer, [t], args.max_length, None))
    name = f"random Llama, tiny shape, vocabulary {args.vocab:,}" if args.vocab else args.model or "tiny-parent@latest"
    print(f"model {name}\n{len(texts)} texts, {tokens:,} tokens scored, windows of {args.max_length}, "
          f"batch {args.batch}, {args.threads} threads")
    sides = [("lm-eval-1", lambda: lm_eval_side(lm_default)), (f"lm-eval-{args.batch}", lambda: lm_eval_side(lm)),
             ("prunectl", prunectl_side), ("forward", forward_side)]
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    totals: dict[str, float] = {}
    for r in range(args.repeats):
        for name, fn in sides[r % len(sides) :] + sides[: r % len(sides)]:
            totals[name], seconds = fn()
            times[name].append(seconds)
    print(f"{'side':10s} {'median s':>9s} {'tokens/s':>10s} {'total log-likelihood':>22s} {'rel. diff':>10s}")
    for name in times:
        med = statistics.median(times[name])
        rel = abs(totals[name] - totals["prunectl"]) / abs(totals["prunectl"])
        print(f"{name:10s} {med:9.2f} {tokens / med:10,.0f} {totals[name]:22.4f} {rel:10.1e}".replace("nan", "   "))
    ours = statistics.median(times["prunectl"])
    ratio = statistics.median(times["lm-eval-1"]) / ours
    same = statistics.median(times[f"lm-eval-{args.batch}"]) / ours
    print(f"speed ratio prunectl / lm-eval at its default batch size: {ratio:.2f}x (target 3x) {'PASS' if ratio >= 3 else 'FAIL'}")
    print(f"speed ratio prunectl / lm-eval at batch {args.batch}: {same:.2f}x")
    floor = statistics.median(times["lm-eval-1"]) / statistics.median(times["forward"])
    print(f"bound on any evaluator, lm-eval at its default batch size / the decoder's forward alone: {floor:.2f}x "
          "(every side also pays the LM head on each scored token)")


if __name__ == "__main__":
    main()

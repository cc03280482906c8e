"""Batched perplexity with lm-eval's rolling-window semantics, and held-out loss on a token range.

lm-eval scores a text of n tokens in disjoint windows of M predictions: the first window reads a
prefix token (BOS) then t[0:M-1] and predicts t[0:M]; each later one reads the M tokens before
its first target and predicts up to M more; the last reads a full M tokens and scores only its
new targets. Reproducing exactly that gives the same log-likelihood, while every window of every
document is batched together and the head runs only on the scored positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class Window:
    inputs: np.ndarray  # what the model reads
    targets: np.ndarray  # the tokens its last len(targets) positions predict


def rolling_windows(tokens: np.ndarray, prefix: int, max_len: int) -> Iterator[Window]:
    n = len(tokens)
    if n == 0:
        return
    first = min(max_len, n)
    yield Window(np.concatenate([[prefix], tokens[: first - 1]]).astype(np.int64), tokens[:first])
    done = first
    while done < n:
        end = min(done + max_len, n)
        yield Window(tokens[end - max_len - 1 : end - 1].astype(np.int64), tokens[done:end])
        done = end


@dataclass
class Score:
    """Summed log-likelihood of the scored tokens, how many, and in how many windows."""

    log_likelihood: float = 0.0
    tokens: int = 0
    windows: int = 0

    @property
    def loss(self) -> float:
        return -self.log_likelihood / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def score_windows(model, windows: list[Window], batch_size: int, device, label: str | None = None) -> Score:
    """Sum of log p(target | inputs) over every window; batches of similar length, right-padded
    (exact for a causal model: padding only follows the positions that are scored).

    With a label, progress is shown: a rich bar on a terminal, a line per ~10% in a job's log."""
    import torch

    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
    total = torch.zeros((), dtype=torch.float64)
    count, expected = 0, sum(len(w.targets) for w in windows)
    report = _progress(label, expected) if label else None
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            chunk = [windows[i] for i in order[b : b + batch_size]]
            width = len(chunk[0].inputs)
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, w in enumerate(chunk):
                length, k = len(w.inputs), len(w.targets)
                x[r, :length] = torch.from_numpy(w.inputs)
                rows.append(np.full(k, r))
                cols.append(np.arange(length - k, length))
                targets.append(w.targets)
            at = (torch.from_numpy(np.concatenate(rows)).to(device), torch.from_numpy(np.concatenate(cols)).to(device))
            y = torch.from_numpy(np.concatenate(targets).astype(np.int64)).to(device)
            total += scored_log_likelihood(model, x.to(device), at, y).double().cpu()
            count += len(y)
            if report:
                report(count)
    if report:
        report(count, done=True)
    return Score(float(total), count, len(windows))


def scored_log_likelihood(model, x: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Sum of log p(y) at positions `at` (rows, columns) of a batch.

    A Llama's logits are its head applied to its decoder's last hidden states, so the head runs only
    on the scored positions, a slice of rows at a time: the [batch, length, vocabulary] logits never
    exist (at 8192 tokens and a 128k vocabulary they would be 4 GiB per sequence in fp32). Other
    architectures may transform logits (soft-capping, scaling) and take the plain path."""
    import torch.nn.functional as F

    if model.config.model_type != "llama":
        return -F.cross_entropy(model(input_ids=x, use_cache=False).logits[at].float(), y, reduction="sum")
    hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[at]
    head = model.get_output_embeddings()
    rows = max(1, _HEAD_SLICE // head.out_features)
    return -sum(F.cross_entropy(head(hidden[s : s + rows]).float(), y[s : s + rows], reduction="sum")
                for s in range(0, len(y), rows))


_HEAD_SLICE = 1 << 23  # logits computed at once (32 MiB in fp32)


def _progress(label: str, expected: int):
    import sys
    import time

    start, shown = time.perf_counter(), [0]
    bar = None
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                       TimeElapsedColumn())
        task = bar.add_task(label, total=expected)
        bar.start()

    def report(count: int, done: bool = False) -> None:
        rate = count / max(time.perf_counter() - start, 1e-9)
        if bar is not None:
            bar.update(task, completed=count)
            if done:
                bar.stop()
        elif done or count >= shown[0] + expected / 10:
            shown[0] = count
            print(f"{label}: {count:,}/{expected:,} tokens, {rate:,.0f} tokens/s", flush=True)

    return report


def text_windows(tokenizer, texts: list[str], max_len: int, max_windows: int | None) -> list[Window]:
    """Each text's rolling windows (tokens without special tokens; BOS, or EOS, is the prefix), up to max_windows."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out: list[Window] = []
    for text in texts:
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        for w in rolling_windows(ids, prefix, max_len):
            if max_windows is not None and len(out) >= max_windows:
                return out
            out.append(w)
    return out


def stream_windows(stream, start: int, end: int, seq_len: int, max_windows: int | None) -> list[Window]:
    """Non-overlapping windows of a token range: seq_len tokens read, seq_len - 1 predicted (as training scores them)."""
    n = (end - start) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    out = []
    for i in range(n):
        ids = stream.read(start + i * seq_len, seq_len).astype(np.int64)
        out.append(Window(ids[:-1], ids[1:]))
    return out


def joined_windows(tokenizer, texts, max_len: int, max_windows: int) -> list[Window]:
    """A corpus split scored the usual way (SparseGPT, Wanda): its documents joined by a blank line into
    one stream, cut into rolling windows; only as many documents are tokenized as the windows need."""
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    needed, ids = max_windows * max_len, []
    for i, text in enumerate(texts):
        if i:
            ids.extend(sep)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return list(rolling_windows(np.asarray(ids[:needed], dtype=np.int64), prefix, max_len))

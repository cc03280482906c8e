"""Corpora -> tokenizer -> memory-mapped token shards with named, disjoint ranges; deterministic sampling.

`data prepare` shuffles whole documents with a seed, deals them into the named ranges by
character share (so no document straddles two ranges), trains or loads the tokenizer on the
pretrain documents only, and writes the ranges one after another into uint16/uint32 shards.
A training run draws sequences of seq_len tokens from a prefix of its ranges in an order that
is a pure function of (seed, ranges, budget, step), so resuming continues exactly.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from .errors import PrunectlError
from .evaluate.choice_task import ChoiceTaskConfig
from .schema import Strict

if TYPE_CHECKING:
    from .artifacts import DataMeta

REQUIRED_RANGES = ("pretrain", "retrain", "validation")
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


class SourceConfig(Strict):
    """One corpus. `text`: files (each cut into documents at paragraph breaks); `jsonl`/`parquet`:
    one record per document, or consecutive records sharing `group_by` joined into one; `hf`: a
    Hugging Face dataset id (from the local cache when HF_DATASETS_OFFLINE=1) or a saved dataset dir."""

    kind: Literal["text", "jsonl", "parquet", "hf"]
    path: str | None = Field(None, description="file, directory or glob; relative to `package` if set")
    package: str | None = Field(None, description="installed Python package whose files hold the corpus")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of file names to skip")
    field: str = "text"
    group_by: list[str] = Field(default_factory=list)
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    max_docs: int | None = Field(None, gt=0)
    tokens_per_doc: float | None = Field(
        None, gt=0, description="estimated tokens per document: with max_docs, a study checks its budgets against "
                                "the ranges before the data is prepared (DCLM-Baseline, Llama-3.1 tokenizer: ~1,250)")

    @model_validator(mode="after")
    def _where(self) -> SourceConfig:
        if self.kind == "hf" and not self.dataset:
            raise ValueError("an hf source needs `dataset` (a hub id or a saved dataset directory)")
        if self.kind != "hf" and not self.path:
            raise ValueError(f"a {self.kind} source needs `path`")
        return self


class TokenizerConfig(Strict):
    kind: Literal["bpe", "hf"] = "bpe"
    path: str | None = Field(None, description="hf: a local tokenizer directory or a hub id")
    vocab_size: int = Field(4096, ge=259, le=1 << 20, description="bpe: vocabulary size to train")

    @model_validator(mode="after")
    def _hf_needs_path(self) -> TokenizerConfig:
        if self.kind == "hf" and not self.path:
            raise ValueError("an hf tokenizer needs `path`")
        return self


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    tokenizer: TokenizerConfig = TokenizerConfig()
    ranges: dict[str, float] = Field(
        default_factory=lambda: {"validation": 0.02, "calibration": 0.02, "retrain": 0.2, "pretrain": 0.76},
        description="range name -> share of the text, dealt in this order after the document shuffle",
    )
    doc_chars: int = Field(20_000, ge=100, description="long texts are cut into documents of about this size")
    seed: int = Field(0, ge=0)
    shard_tokens: int = Field(1 << 24, ge=1024)
    choice_task: ChoiceTaskConfig | None = Field(
        ChoiceTaskConfig(), description="a local multiple-choice task built from held-out text (tasks/continuation.jsonl)")
    role: Literal["corpus", "calibration"] = Field(
        "corpus", description="calibration: a set apart from the corpus (WikiText-103, C4 in the paper), tokenized "
                              "with the parent's HF tokenizer; it needs only a calibration range")

    @field_validator("ranges")
    @classmethod
    def _shares(cls, ranges: dict[str, float]) -> dict[str, float]:  # a field validator: the error names data.ranges
        bad = [f"{k}={v}" for k, v in ranges.items() if not 0 < v <= 1]
        if bad:
            raise ValueError(f"range shares must be in (0, 1]: {', '.join(bad)}")
        if sum(ranges.values()) > 1 + 1e-9:
            raise ValueError(f"range shares add up to {sum(ranges.values()):.4g} > 1")
        return ranges

    def estimated_tokens(self) -> dict[str, int] | None:
        """Tokens each range will hold, estimated from max_docs x tokens_per_doc (None without both on every source)."""
        if any(s.max_docs is None or s.tokens_per_doc is None for s in self.sources):
            return None
        total = sum(s.max_docs * s.tokens_per_doc for s in self.sources)
        return {name: round(share * total) for name, share in self.ranges.items()}

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        required = REQUIRED_RANGES if self.role == "corpus" else ("calibration",)
        missing = [r for r in required if r not in self.ranges]
        if missing:
            raise ValueError(f"ranges must include {', '.join(missing)}")
        if self.role == "calibration" and self.tokenizer.kind != "hf":
            raise ValueError("a calibration set must use the parent's tokenizer: tokenizer.kind hf with its path")
        return self


# ---------------------------------------------------------------------------- reading corpora


def _files(source: SourceConfig) -> list[Path]:
    base = Path(".")
    if source.package:
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            raise PrunectlError(
                f"data.sources: package '{source.package}' is not installed; `make setup` installs the tiny corpora"
            )
        base = Path(list(spec.submodule_search_locations)[0])
    pattern = str(base / source.path)
    paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    paths = [p for p in paths if p.is_file()] + [f for p in paths if p.is_dir() for f in sorted(p.rglob("*")) if f.is_file()]
    paths = [p for p in paths if not any(fnmatch.fnmatch(p.name, x) for x in source.exclude)]
    if not paths:
        raise PrunectlError(f"data.sources: no files match {pattern}")
    return paths


def _cut(text: str, doc_chars: int) -> Iterator[str]:
    """Split a long text at blank lines into documents of roughly doc_chars characters."""
    buf: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        buf.append(para)
        size += len(para) + 2
        if size >= doc_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def _grouped(records: Iterator[dict[str, Any]], field: str, group_by: list[str]) -> Iterator[str]:
    key, lines = None, []
    for rec in records:
        if field not in rec:
            raise PrunectlError(f"data.sources: record has no field '{field}' (fields: {', '.join(rec)})")
        k = tuple(rec.get(g) for g in group_by)
        if group_by and k != key and lines:
            yield "\n".join(lines)
            lines = []
        key = k
        lines.append(str(rec[field]))
        if not group_by:
            yield lines.pop()
    if lines:
        yield "\n".join(lines)


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a jsonl file; a line that is not a JSON object is one line naming file and line."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # bytes: UTF-8/16/32 detected, a bad encoding is a ValueError too
            except ValueError as err:
                detail = f"{err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else str(err)
                raise PrunectlError(f"data.sources: {path} line {number}: not valid JSON ({detail}); "
                                    "a jsonl source holds one JSON object per line") from None
            if not isinstance(record, dict):
                raise PrunectlError(f"data.sources: {path} line {number}: a JSON {type(record).__name__}, not an object; "
                                    "a jsonl source holds one JSON object per line")
            yield number, record


def _records(source: SourceConfig) -> Iterator[dict[str, Any]]:
    if source.kind == "jsonl":
        for path in _files(source):
            yield from (record for _, record in _jsonl(path))
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        for path in _files(source):  # a row group at a time: a parquet file is never all in memory
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[source.field, *source.group_by]):
                yield from batch.to_pylist()
    else:
        yield from _hf_dataset(source)


def _hf_dataset(source: SourceConfig) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        if Path(source.dataset).is_dir() and (Path(source.dataset) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(source.dataset)
            ds = ds[source.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            # streaming: records arrive as they are read, so max_docs stops the download too
            ds = datasets.load_dataset(source.dataset, source.config, split=source.split, streaming=True)
    except Exception as err:  # datasets raises many types; the user needs one line
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "it is not in the local cache; fill the cache on a machine with network access first"
            if offline
            else "check the dataset id, config and split"
        )
        raise PrunectlError(f"data.sources: cannot load dataset '{source.dataset}' ({type(err).__name__}): {hint}") from None
    yield from ds


def check_sources(config: DataConfig, records: int = 8) -> None:
    """Every problem the start of each source file shows (unreadable, malformed, no text field), before anything
    is written. hf sources are checked by loading them, which `prepare` does."""
    problems: list[str] = []
    for source in config.sources:
        if source.kind == "hf":
            continue
        try:
            for path in _files(source):
                _check_file(source, path, records)
        except PrunectlError as err:
            problems.extend(err.problems)
    if problems:
        raise PrunectlError(*problems)


def _check_file(source: SourceConfig, path: Path, records: int) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise PrunectlError(f"data.sources: cannot read {path}: {err.strerror or err}") from None
    if source.kind == "jsonl":
        for _, (number, record) in zip(range(records), _jsonl(path)):
            if source.field not in record:
                raise PrunectlError(f"data.sources: {path} line {number}: record has no field '{source.field}' "
                                    f"(fields: {', '.join(record) or 'none'}); set the source's `field`")
    elif source.kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            columns = parquet.schema_arrow.names
            if source.field in columns and parquet.num_row_groups:
                parquet.read_row_group(0, columns=[source.field])
        except (pa.ArrowException, OSError, ValueError) as err:
            raise PrunectlError(f"data.sources: {path}: not a readable parquet file "
                                f"({(str(err).splitlines() or [type(err).__name__])[0]})") from None
        if source.field not in columns:
            raise PrunectlError(f"data.sources: {path}: no column '{source.field}' (columns: {', '.join(columns)}); "
                                "set the source's `field`")


def read_documents(config: DataConfig) -> list[str]:
    docs: list[str] = []
    for source in config.sources:
        if source.kind == "text":
            found = (d for p in _files(source) for d in _cut(p.read_text(errors="replace"), config.doc_chars))
        else:
            found = (
                d
                for text in _grouped(_records(source), source.field, source.group_by)
                for d in _cut(text, config.doc_chars)
            )
        for i, doc in enumerate(found):
            if source.max_docs is not None and i >= source.max_docs:
                break
            docs.append(doc)
    if not docs:
        raise PrunectlError("data.sources: the sources hold no text")
    return docs


def deal_ranges(docs: list[str], shares: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Shuffle whole documents and deal them into ranges by character share, in recipe order."""
    order = np.random.default_rng(seed).permutation(len(docs))
    total = sum(len(d) for d in docs)
    out: dict[str, list[str]] = {name: [] for name in shares}
    names = list(shares)
    cum_target = np.cumsum([shares[n] * total for n in names])
    filled, slot = 0, 0
    for idx in order:
        while slot < len(names) - 1 and filled >= cum_target[slot]:
            slot += 1
        if filled >= cum_target[-1]:
            break
        out[names[slot]].append(docs[idx])
        filled += len(docs[idx])
    empty = [n for n, d in out.items() if not d]
    if empty:
        raise PrunectlError(
            f"data.ranges: {', '.join(empty)} got no document ({len(docs)} documents in all); "
            "add text, lower data.doc_chars or raise those shares"
        )
    return out


# ---------------------------------------------------------------------------- tokenizer


def build_tokenizer(config: TokenizerConfig, training_docs: list[str]):
    """A transformers fast tokenizer: a byte-level BPE trained on `training_docs`, or a given one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if config.kind == "hf":
        try:
            return AutoTokenizer.from_pretrained(config.path)
        except (OSError, ValueError) as err:
            raise PrunectlError(f"data.tokenizer.path: cannot load tokenizer '{config.path}': {err}".splitlines()[0]) from None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_docs, trainer)
    # Like Llama's tokenizer, tokenizer(text) starts with BOS, as every training document does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def encode(tokenizer, docs: list[str], batch: int = 256) -> Iterator[np.ndarray]:
    """Each document as BOS + tokens + EOS (whichever of the two the tokenizer has)."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i in range(0, len(docs), batch):
        for ids in tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]:
            yield np.asarray(head + ids + tail, dtype=np.int64)


# ---------------------------------------------------------------------------- shards


class ShardWriter:
    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        folder.mkdir(parents=True, exist_ok=True)
        self.sizes: list[int] = []
        self._handle = None
        self.total = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype)
        while len(ids):
            if self._handle is None or self.sizes[-1] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.sizes[-1]
            part, ids = ids[:room], ids[room:]
            self._handle.write(part.tobytes())
            self.sizes[-1] += len(part)
            self.total += len(part)

    def _open_next(self) -> None:
        self.close()
        self._handle = open(self.folder / f"{len(self.sizes):05d}.bin", "wb")
        self.sizes.append(0)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass(frozen=True)
class TokenRange:
    name: str
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def first(self, tokens: int | None) -> TokenRange:
        """Its first `tokens` tokens (all of it for None)."""
        if tokens is None:
            return self
        if tokens > len(self):
            raise PrunectlError(f"train.range_tokens: {tokens:,} tokens asked of range '{self.name}', which holds {len(self):,}")
        return TokenRange(self.name, self.start, self.start + tokens)


class TokenStream:
    """Read-only view of a prepared data run's token shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        from .artifacts import DataMeta

        self.meta = DataMeta.read(self.folder)
        dtype = np.dtype(self.meta.dtype)
        self.shards = [
            np.memmap(self.folder / "tokens" / f"{i:05d}.bin", dtype=dtype, mode="r", shape=(n,))
            for i, n in enumerate(self.meta.shards)
        ]
        self.bounds = np.concatenate([[0], np.cumsum(self.meta.shards)])

    @property
    def vocab_size(self) -> int:
        return self.meta.tokenizer.vocab_size

    def range(self, name: str) -> TokenRange:
        try:
            r = self.meta.ranges[name]
        except KeyError:
            raise PrunectlError(
                f"data range '{name}' does not exist; this data has {', '.join(self.meta.ranges)}"
            ) from None
        return TokenRange(name, r.start, r.end)

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        shard = int(np.searchsorted(self.bounds, start, side="right") - 1)
        while filled < length:
            offset = pos - self.bounds[shard]
            take = min(length - filled, self.meta.shards[shard] - offset)
            out[filled : filled + take] = self.shards[shard][offset : offset + take]
            filled += take
            pos += take
            shard += 1
        return out


@dataclass
class Plan:
    """What `prepare` writes, decided in memory: every user error is found before a file is written."""

    docs: int
    dealt: dict[str, list[str]]
    tokenizer: Any
    choice_items: list[dict] | None


def plan(config: DataConfig) -> Plan:
    docs = read_documents(config)
    dealt = deal_ranges(docs, config.ranges, config.seed)
    tokenizer = build_tokenizer(config.tokenizer, dealt.get("pretrain", []))
    items = None
    if config.choice_task is not None and config.choice_task.range in dealt:
        from .evaluate import choice_task

        try:
            items = choice_task.build(dealt[config.choice_task.range], config.choice_task)
        except ValueError as err:
            raise PrunectlError(f"data.choice_task: {err}") from None
    return Plan(len(docs), dealt, tokenizer, items)


def prepare(config: DataConfig, out: Path, progress=None, planned: Plan | None = None) -> DataMeta:
    """Write tokenizer/, tokens/*.bin and data.json into `out` (from `planned`, else planned here)."""
    planned = planned or plan(config)
    dealt, tokenizer = planned.dealt, planned.tokenizer
    tokenizer.save_pretrained(out / "tokenizer")
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32)
    writer = ShardWriter(out / "tokens", dtype, config.shard_tokens)
    ranges: dict[str, dict[str, int]] = {}
    counts = np.zeros(vocab, dtype=np.int64)
    task = progress.add_task("tokenizing", total=planned.docs) if progress else None
    try:
        for name, range_docs in dealt.items():
            start = writer.total
            for ids in encode(tokenizer, range_docs):
                writer.write(ids)
                if name == ("pretrain" if "pretrain" in dealt else "calibration"):
                    counts += np.bincount(ids, minlength=vocab)
                if progress:
                    progress.advance(task)
            ranges[name] = {"start": start, "end": writer.total, "docs": len(range_docs), "chars": sum(map(len, range_docs))}
    finally:
        writer.close()  # a failed write (disk full) must not leave the shard open while the run is cleaned up
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    meta = {
        "dtype": dtype.name,
        "shard_tokens": config.shard_tokens,
        "shards": writer.sizes,
        "total_tokens": writer.total,
        "ranges": ranges,
        "tokenizer": {
            "kind": config.tokenizer.kind,
            "vocab_size": vocab,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "documents": planned.docs,
        # The loss a model that knows only token frequencies reaches: the bar to clear.
        "unigram_entropy_nats": entropy,
        "seed": config.seed,
    }
    if planned.choice_items is not None:
        from .evaluate import choice_task

        choice_task.write(planned.choice_items, out / "tasks" / "continuation.jsonl")
        meta["choice_task"] = {"file": "tasks/continuation.jsonl", "items": len(planned.choice_items),
                               **config.choice_task.model_dump()}
    from .artifacts import DataMeta

    typed = DataMeta.model_validate(meta)
    typed.write(out)
    return typed


# ---------------------------------------------------------------------------- sampling


class SequencePlan:
    """Sequence i of a run -> the token offset of its chunk.

    The ranges are cut into chunks of seq_len tokens (never across a range boundary). A budget of
    S sequences draws whole epochs over every chunk, then a final partial epoch over the first
    chunks in range order, each epoch in a seeded random order. So the set of tokens a run consumes
    is exact and recordable, and its order is a pure function of (seed, ranges, S, i).
    """

    def __init__(self, ranges: list[TokenRange], seq_len: int, sequences: int, seed: int) -> None:
        self.ranges, self.seq_len, self.sequences, self.seed = ranges, seq_len, sequences, seed
        self.chunk_starts = np.concatenate(
            [np.arange(r.start, r.start + (len(r) // seq_len) * seq_len, seq_len, dtype=np.int64) for r in ranges]
        )
        if len(self.chunk_starts) == 0:
            names = "+".join(r.name for r in ranges)
            raise PrunectlError(f"data range {names} holds fewer than seq_len={seq_len} tokens")
        self.full_epochs, self.remainder = divmod(sequences, len(self.chunk_starts))
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def chunks(self) -> int:
        return len(self.chunk_starts)

    @property
    def epochs(self) -> float:
        return self.sequences / self.chunks

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            size = self.chunks if epoch < self.full_epochs else self.remainder
            self._order = np.random.default_rng([self.seed, epoch]).permutation(size)
            self._epoch = epoch
        return self._order

    def starts(self, first: int, count: int) -> np.ndarray:
        if first + count > self.sequences:
            raise IndexError("past the run's sequence budget")
        out = np.empty(count, dtype=np.int64)
        for k, i in enumerate(range(first, first + count)):
            epoch, j = divmod(i, self.chunks)
            out[k] = self.chunk_starts[self._epoch_order(epoch)[j]]
        return out

    def intervals(self) -> list[TokenRange]:
        """The token intervals consumed: every chunk if an epoch completed, else the prefix."""
        used = self.chunks if self.full_epochs else self.remainder
        out = []
        for r in self.ranges:
            n = min(used, len(r) // self.seq_len)
            if n:
                out.append(TokenRange(r.name, r.start, r.start + n * self.seq_len))
            used -= n
        return out


def batch(stream: TokenStream, starts: np.ndarray, seq_len: int) -> np.ndarray:
    return np.stack([stream.read(int(s), seq_len) for s in starts])


def validation_starts(stream: TokenStream, name: str, seq_len: int, max_tokens: int) -> np.ndarray:
    """The first max_tokens of a held-out range, as non-overlapping chunks (the same every time)."""
    r = stream.range(name)
    n = min(len(r), max_tokens) // seq_len
    if n == 0:
        raise PrunectlError(f"data range '{name}' holds fewer than seq_len={seq_len} tokens")
    return r.start + np.arange(n, dtype=np.int64) * seq_len


class HeldOutConfig(Strict):
    """Mean next-token loss on the first `tokens` of a held-out range, in non-overlapping windows (the
    paper's DCLM loss). Prune scores it before and after pruning, eval stores it with the model."""

    range: str = "validation"
    tokens: int = Field(65536, ge=0, description="0 skips it")
    seq_len: int = Field(256, ge=8)

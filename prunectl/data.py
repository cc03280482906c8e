"""Corpora -> tokenizer -> memory-mapped token shards with named, disjoint ranges; deterministic sampling.

`data prepare` streams documents in work units (a file, an HF streaming shard, a block of rows of a
saved dataset) and puts each whole document in the range a keyed hash of its text picks (so no document
straddles two ranges, and the ranges do not depend on how the work is split or ordered). The tokenizer is
trained (or loaded) on a bounded sample of the pretrain range; each unit writes tokens/<range>/<unit>.bin;
data.json lists, per range, its unit files in unit order: the ranges one after another form one token stream.
A training run draws sequences of seq_len tokens from a prefix of its ranges in an order that
is a pure function of (seed, ranges, budget, step), so resuming continues exactly.
"""

from __future__ import annotations

import bisect
import fnmatch
import glob
import hashlib
import importlib.util
import itertools
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
    sample_chars: int = Field(50_000_000, ge=1000, description="bpe: trained on the first this many characters of "
                                                               "pretrain documents, in unit order")

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
        description="range name -> share of the documents: a keyed hash of each document's text in [0, 1) against "
                    "the cumulative shares in this order (beyond their sum: unused)",
    )
    doc_chars: int = Field(20_000, ge=100, description="long texts are cut into documents of about this size")
    seed: int = Field(0, ge=0)
    shard_tokens: int = Field(1 << 24, ge=1024, description="unused since data.json schema 2 (one file per range and unit)")
    workers: int = Field(1, ge=1, description="tokenize tasks: one job array of this many tasks")
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


def _cut(paragraphs: Iterator[str], doc_chars: int) -> Iterator[str]:
    """Join paragraphs into documents of roughly doc_chars characters."""
    buf: list[str] = []
    size = 0
    for para in paragraphs:
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


def _paragraphs(path: Path) -> Iterator[str]:
    """A text file's paragraphs (split at blank lines), a line at a time: the file is never all in memory."""
    with open(path, errors="replace") as handle:
        lines: list[str] = []
        for line in handle:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines)
                lines = []
        if lines:
            yield "".join(lines)


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


HF_BLOCK_ROWS = 65_536  # a saved dataset's work unit: rows, memory-mapped by datasets


@dataclass(frozen=True)
class Unit:
    """One piece of work: ("file", path) | ("rows", start, stop) of a saved dataset | ("shard", index, count) of a
    streamed one; it yields at most `max_docs` documents (its even share of its source's max_docs)."""

    source: int
    where: tuple
    max_docs: int | None


def units(config: DataConfig) -> list[Unit]:
    """Every source's units, in recipe order; the same list on every machine that reads the same inputs."""
    out = []
    for s, source in enumerate(config.sources):
        parts = _parts(source)
        m, n = source.max_docs, len(parts)
        out += [Unit(s, where, None if m is None else m // n + (i < m % n)) for i, where in enumerate(parts)]
    return out


def _parts(source: SourceConfig) -> list[tuple]:
    if source.kind != "hf":
        return [("file", str(p)) for p in _files(source)]
    ds, saved = _hf_open(source)
    if saved:
        return [("rows", a, min(a + HF_BLOCK_ROWS, len(ds))) for a in range(0, len(ds), HF_BLOCK_ROWS)]
    return [("shard", i, ds.n_shards) for i in range(ds.n_shards)]


def unit_documents(config: DataConfig, unit: Unit) -> Iterator[str]:
    """The unit's documents, lazily; reading stops at its max_docs."""
    source = config.sources[unit.source]
    if source.kind == "text":
        found = _cut(_paragraphs(Path(unit.where[1])), config.doc_chars)
    else:
        texts = _grouped(_unit_records(source, unit.where), source.field, source.group_by)
        found = (d for text in texts for d in _cut(iter(text.split("\n\n")), config.doc_chars))
    return itertools.islice(found, unit.max_docs)


def _unit_records(source: SourceConfig, where: tuple) -> Iterator[dict[str, Any]]:
    if source.kind == "jsonl":
        yield from (record for _, record in _jsonl(Path(where[1])))
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        # a row group at a time: a parquet file is never all in memory
        for batch in pq.ParquetFile(where[1]).iter_batches(batch_size=1024, columns=[source.field, *source.group_by]):
            yield from batch.to_pylist()
    elif where[0] == "rows":
        ds, _ = _hf_open(source)
        for a in range(where[1], where[2], 1024):
            block = ds[a : min(a + 1024, where[2])]
            yield from (dict(zip(block, values)) for values in zip(*block.values()))
    else:
        ds, _ = _hf_open(source)
        yield from ds.shard(num_shards=where[2], index=where[1])


def _hf_open(source: SourceConfig):
    """(dataset, saved): a saved dataset directory (memory-mapped), else a streamed hub/local dataset."""
    import datasets

    try:
        if Path(source.dataset).is_dir() and (Path(source.dataset) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(source.dataset)
            return (ds[source.split] if isinstance(ds, datasets.DatasetDict) else ds), True
        # streaming: records arrive as they are read, so max_docs stops the download too
        return datasets.load_dataset(source.dataset, source.config, split=source.split, streaming=True), False
    except Exception as err:  # datasets raises many types; the user needs one line
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "it is not in the local cache; fill the cache on a machine with network access first"
            if offline
            else "check the dataset id, config and split"
        )
        raise PrunectlError(f"data.sources: cannot load dataset '{source.dataset}' ({type(err).__name__}): {hint}") from None


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
    """Every document in a list (small corpora, tests and benchmarks; `prepare` streams units instead)."""
    docs = [d for unit in units(config) for d in unit_documents(config, unit)]
    if not docs:
        raise PrunectlError("data.sources: the sources hold no text")
    return docs


def range_of(text: str, seed: int, bounds: list[float]) -> int | None:
    """The index of the range a document belongs to: a keyed hash of its text in [0, 1) against the
    cumulative shares, so it depends on nothing but (seed, text, shares); None beyond their sum."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little"))
    i = bisect.bisect_right(bounds, int.from_bytes(digest.digest(), "little") / 2**64)
    return i if i < len(bounds) else None


def cumulative(shares: dict[str, float]) -> list[float]:
    return list(itertools.accumulate(shares.values()))


def deal_ranges(docs: list[str], shares: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Each whole document into its range (`range_of`), keeping their order."""
    bounds, names = cumulative(shares), list(shares)
    out: dict[str, list[str]] = {name: [] for name in shares}
    for doc in docs:
        if (i := range_of(doc, seed, bounds)) is not None:
            out[names[i]].append(doc)
    _no_empty({n: len(d) for n, d in out.items()}, len(docs))
    return out


def _no_empty(docs: dict[str, int], total: int) -> None:
    empty = [n for n, d in docs.items() if not d]
    if empty:
        raise PrunectlError(
            f"data.ranges: {', '.join(empty)} got no document ({total} documents in all); "
            "add text, lower data.doc_chars or raise those shares"
        )


# ---------------------------------------------------------------------------- tokenizer


def build_tokenizer(config: TokenizerConfig, training_docs: Iterator[str]):
    """A transformers fast tokenizer: a byte-level BPE trained on `training_docs`, or a given one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if config.kind == "hf":
        try:
            return AutoTokenizer.from_pretrained(config.path, use_fast=True)
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
    """Each document as BOS + tokens + EOS (whichever of the two the tokenizer has), a batch per call
    of the fast (Rust) tokenizer."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i in range(0, len(docs), batch):
        for ids in tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]:
            yield np.asarray(head + ids + tail, dtype=np.int64)


def _sample(config: DataConfig) -> Iterator[str]:
    """The BPE's training text: pretrain documents in unit order, up to sample_chars characters."""
    bounds, target = cumulative(config.ranges), list(config.ranges).index("pretrain")
    left = config.tokenizer.sample_chars
    for unit in units(config):
        for doc in unit_documents(config, unit):
            if range_of(doc, config.seed, bounds) == target:
                yield doc
                left -= len(doc)
                if left <= 0:
                    return


def write_tokenizer(config: DataConfig, out: Path) -> None:
    """Phase 1: tokenizer/ (kept by a rerun: it was renamed into place only once complete)."""
    if (out / "tokenizer").is_dir():
        return
    tokenizer = build_tokenizer(config.tokenizer, _sample(config) if config.tokenizer.kind == "bpe" else iter(()))
    staging = out / "tokenizer.partial"
    tokenizer.save_pretrained(staging)
    os.replace(staging, out / "tokenizer")


def load_tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out / "tokenizer", use_fast=True)


def token_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32)


def entropy_range(config: DataConfig) -> str:
    return "pretrain" if "pretrain" in config.ranges else "calibration"


CHOICE_DOCS_PER_UNIT = 256  # documents of the choice task's range a unit keeps for finalize
CHOICE_DOCS = 4096  # and finalize gathers, in unit order
STOP_ENV = "PRUNECTL_DATA_STOP_AFTER"  # tests: a task raises after this many units, as if killed


def unit_record(out: Path, index: int) -> Path:
    return out / "units" / f"{index:06d}.json"


def tokenize_unit(config: DataConfig, tokenizer, index: int, unit: Unit, out: Path, batch: int = 256) -> None:
    """Phase 2, one unit: tokens/<range>/<index>.bin per range it feeds (renamed into place when complete),
    then its record, which marks it done: per-range counts, sparse unigram counts, choice documents."""
    from .store import write_json

    names, bounds, vocab = list(config.ranges), cumulative(config.ranges), len(tokenizer)
    dtype, counted = token_dtype(vocab), entropy_range(config)
    choice = config.choice_task.range if config.choice_task is not None else None
    ranges = {name: {"docs": 0, "tokens": 0, "chars": 0} for name in names}
    handles: dict[str, Any] = {}
    unigram = np.zeros(vocab, dtype=np.int64)
    chosen: list[str] = []
    documents = 0
    docs = unit_documents(config, unit)
    try:
        while texts := list(itertools.islice(docs, batch)):
            documents += len(texts)
            picked = [(names[i], t) for t in texts if (i := range_of(t, config.seed, bounds)) is not None]
            seen = []
            for (name, text), ids in zip(picked, encode(tokenizer, [t for _, t in picked], batch)):
                if name not in handles:
                    (out / "tokens" / name).mkdir(parents=True, exist_ok=True)
                    handles[name] = open(out / "tokens" / name / f"{index:06d}.bin.partial", "wb")
                handles[name].write(ids.astype(dtype).tobytes())
                r = ranges[name]
                r["docs"], r["tokens"], r["chars"] = r["docs"] + 1, r["tokens"] + len(ids), r["chars"] + len(text)
                if name == counted:
                    seen.append(ids)
                if name == choice and len(chosen) < CHOICE_DOCS_PER_UNIT:
                    chosen.append(text)
            if seen:  # one bincount per batch: a large vocabulary costs per call, not per document
                unigram += np.bincount(np.concatenate(seen), minlength=vocab)
    except BaseException:
        for name, handle in handles.items():  # a failed unit (a full disk) gives its space back
            handle.close()
            (out / "tokens" / name / f"{index:06d}.bin.partial").unlink(missing_ok=True)
        raise
    for handle in handles.values():
        handle.close()
    for name in handles:
        os.replace(out / "tokens" / name / f"{index:06d}.bin.partial", out / "tokens" / name / f"{index:06d}.bin")
    ids = np.flatnonzero(unigram)
    write_json(unit_record(out, index), {
        "documents": documents, "ranges": {n: r for n, r in ranges.items() if r["tokens"]},
        "unigram": {"ids": ids.tolist(), "counts": unigram[ids].tolist()}, "choice_docs": chosen})


def tokenize_task(config: DataConfig, out: Path, task: int, tasks: int) -> int:
    """Phase 2, task `task` of `tasks`: units u with u % tasks == task that have no record yet. Returns how many
    it tokenized."""
    todo = [(u, unit) for u, unit in enumerate(units(config)) if u % tasks == task and not unit_record(out, u).exists()]
    if not todo:
        return 0
    tokenizer = load_tokenizer(out)
    (out / "units").mkdir(exist_ok=True)
    stop = int(os.environ.get(STOP_ENV, "0"))
    for done, (u, unit) in enumerate(todo):
        if stop and done == stop:
            raise RuntimeError(f"{STOP_ENV}={stop}: stopped after {stop} unit(s)")
        tokenize_unit(config, tokenizer, u, unit, out)
    return len(todo)


def finalize(config: DataConfig, out: Path) -> DataMeta:
    """Phase 3: the ranges in recipe order, each its unit files in unit order (no copying); the unigram
    entropy, the choice task, data.json."""
    from .artifacts import DataMeta

    tokenizer = load_tokenizer(out)
    vocab, n = len(tokenizer), len(units(config))
    missing = [u for u in range(n) if not unit_record(out, u).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {n} units are not tokenized (first: {missing[0]}); run the prepare again")
    unigram = np.zeros(vocab, dtype=np.int64)
    ranges: dict[str, dict[str, Any]] = {name: {"docs": 0, "chars": 0, "files": []} for name in config.ranges}
    choice_docs: list[str] = []
    documents = 0
    for u in range(n):  # one record at a time: finalize holds O(units) file names, never the documents
        record = json.loads(unit_record(out, u).read_text())
        documents += record["documents"]
        for name, r in record["ranges"].items():
            ranges[name]["docs"] += r["docs"]
            ranges[name]["chars"] += r["chars"]
            ranges[name]["files"].append({"file": f"tokens/{name}/{u:06d}.bin", "tokens": r["tokens"]})
        np.add.at(unigram, np.asarray(record["unigram"]["ids"], dtype=np.int64), record["unigram"]["counts"])
        choice_docs += record["choice_docs"][: CHOICE_DOCS - len(choice_docs)]
    _no_empty({name: r["docs"] for name, r in ranges.items()}, documents)
    pos = 0
    for r in ranges.values():
        r["start"] = pos
        pos += sum(f["tokens"] for f in r["files"])
        r["end"] = pos
    p = unigram[unigram > 0] / unigram.sum()
    meta: dict[str, Any] = {
        "dtype": token_dtype(vocab).name,
        "total_tokens": pos,
        "ranges": ranges,
        "units": n,
        "tokenizer": {
            "kind": config.tokenizer.kind,
            "vocab_size": vocab,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "documents": documents,
        # The loss a model that knows only token frequencies reaches: the bar to clear.
        "unigram_entropy_nats": float(-(p * np.log(p)).sum()),
        "seed": config.seed,
    }
    if config.choice_task is not None and config.choice_task.range in ranges:
        from .evaluate import choice_task

        try:
            items = choice_task.build(choice_docs, config.choice_task)
        except ValueError as err:
            raise PrunectlError(f"data.choice_task: {err}") from None
        choice_task.write(items, out / "tasks" / "continuation.jsonl")
        meta["choice_task"] = {"file": "tasks/continuation.jsonl", "items": len(items), **config.choice_task.model_dump()}
    typed = DataMeta.model_validate(meta)
    typed.write(out)
    return typed


def prepare(config: DataConfig, out: Path) -> DataMeta:
    """All three phases here, in one process (tests, benchmarks): tokenizer, every unit, finalize."""
    write_tokenizer(config, out)
    tokenize_task(config, out, 0, 1)
    return finalize(config, out)


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
    """Read-only view of a prepared data run's token files, as one stream (the ranges one after another)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        from .artifacts import DataMeta

        self.meta = DataMeta.read(self.folder)
        self.dtype = np.dtype(self.meta.dtype)
        self.files = self.meta.token_files()
        self.sizes = [n for _, n in self.files]
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self._maps: dict[int, np.memmap] = {}  # mapped on first read: a run may have thousands of files

    def _map(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.folder / self.files[i][0], dtype=self.dtype, mode="r", shape=(self.sizes[i],))
        return self._maps[i]

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
        i = int(np.searchsorted(self.bounds, start, side="right") - 1)
        while filled < length:
            offset = pos - self.bounds[i]
            take = min(length - filled, self.sizes[i] - offset)
            out[filled : filled + take] = self._map(i)[offset : offset + take]
            filled += take
            pos += take
            i += 1
        return out


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

"""The typed files stages hand each other, each read and written here and nowhere else.

| file                         | model          | written by            | read by                                 |
|------------------------------|----------------|-----------------------|-----------------------------------------|
| <data run>/data.json         | DataMeta       | data.finalize         | TokenStream, every stage's check        |
| <prune run>/report.json      | PruneReport    | the prune stage       | render, study/compare                   |
| <run>/eval/<key>.json        | EvalResults    | the eval stage        | compare                                 |
| <study run>/graph.json       | StudyGraph     | study.submit          | status, compare, the study's compare job|
| manifest.json `summary`      | *Summary       | each stage            | status, compare, sweeps                 |

Every file carries `schema_version`. Files written before versions existed read as version 1 (their
layout is version 1); a file from a newer prunectl is refused in one line naming both versions.
Unknown keys are kept, so nothing an older or newer writer added is lost on the way through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import PrunectlError

A = TypeVar("A", bound="Artifact")


class Artifact(BaseModel):
    model_config = ConfigDict(extra="allow")

    SCHEMA: ClassVar[int] = 1
    FILE: ClassVar[str] = ""
    schema_version: int = 1

    @classmethod
    def read(cls: type[A], path: Path) -> A:
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise PrunectlError(f"{path}: missing; the run that should have written it is incomplete") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PrunectlError(f"{path}: not valid JSON ({err}); the file is damaged") from None
        version = raw.get("schema_version", 1) if isinstance(raw, dict) else 1
        if not isinstance(version, int) or version > cls.SCHEMA:
            raise PrunectlError(f"{path}: schema version {version} is newer than this prunectl reads "
                                f"({cls.SCHEMA}); upgrade prunectl")
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PrunectlError(f"{path}: {where}: {first['msg']} (a damaged or foreign {cls.FILE})") from None

    def write(self, path: Path) -> Path:
        """Atomically, as indented JSON (stdlib floats: exactly what was computed)."""
        from .store import write_json

        path = Path(path)
        if path.is_dir():
            path = path / self.FILE
        write_json(path, {"schema_version": self.SCHEMA, **self.model_dump(mode="json", exclude={"schema_version"})})
        return path


# ---------------------------------------------------------------------------- data.json


class TokenFile(BaseModel):
    file: str  # relative to the data run
    tokens: int


class RangeInfo(BaseModel):
    start: int
    end: int
    docs: int
    chars: int
    files: list[TokenFile] = Field(default_factory=list)  # schema 2: this range's unit files, in unit order

    @property
    def tokens(self) -> int:
        return self.end - self.start


class TokenizerInfo(BaseModel):
    kind: str
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


class DataMeta(Artifact):
    """A prepared data run: one token stream and its named disjoint ranges.

    Schema 2: each range lists its own files (tokens/<range>/<unit>.bin), the ranges one after another in
    recipe order. Schema 1 (older runs, still read): `shards`, tokens/00000.bin... of `shard_tokens` each."""

    SCHEMA: ClassVar[int] = 2
    FILE: ClassVar[str] = "data.json"
    dtype: str
    shard_tokens: int | None = None
    shards: list[int] | None = None
    units: int | None = None
    total_tokens: int
    ranges: dict[str, RangeInfo]
    tokenizer: TokenizerInfo
    documents: int
    unigram_entropy_nats: float
    seed: int
    choice_task: dict[str, Any] | None = None

    def token_files(self) -> list[tuple[str, int]]:
        """(path relative to the run, tokens) of every token file, in stream order."""
        if self.shards is not None:
            return [(f"tokens/{i:05d}.bin", n) for i, n in enumerate(self.shards)]
        ordered = sorted(self.ranges.values(), key=lambda r: r.start)
        return [(f.file, f.tokens) for r in ordered for f in r.files]

    def summary(self) -> DataSummary:
        return DataSummary(tokens=self.total_tokens, documents=self.documents, vocab_size=self.tokenizer.vocab_size,
                           unigram_entropy_nats=round(self.unigram_entropy_nats, 4),
                           ranges={k: [v.start, v.end] for k, v in self.ranges.items()})


# ---------------------------------------------------------------------------- manifest summaries


class Summary(BaseModel):
    model_config = ConfigDict(extra="allow")


class DataSummary(Summary):
    tokens: int
    documents: int
    vocab_size: int
    unigram_entropy_nats: float
    ranges: dict[str, list[int]]


class TrainSummary(Summary):
    """A pretrain or retrain run (and a sweep's prefix run); filled in as the run goes."""

    parameters: dict[str, int] | None = None
    steps: int | None = None
    world_size: int | None = None
    tokens: int | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    unigram_entropy_nats: float | None = None
    mask_sparsity: float | None = None
    masked_nonzero: int | None = None
    masked_linears_zero_fraction: float | None = None


class PruneSummary(Summary):
    method: str
    pattern: str | None = None
    target_ratio: float | None = None
    achieved_ratio: float | None = None
    parameters: dict[str, dict[str, int]] | None = None
    architecture: dict[str, dict[str, Any]] | None = None
    calibration_loss: dict[str, float | None] | None = None
    heldout: dict[str, Any] | None = None


class CompareSummary(Summary):
    methods: int
    finding_1: dict[str, bool]
    eval_key: str
    not_token_matched: list[str] = Field(default_factory=list)
    left_out: list[str] = Field(default_factory=list)


_SUMMARIES: dict[str, type[Summary]] = {"data": DataSummary, "pretrain": TrainSummary, "retrain": TrainSummary,
                                        "prune": PruneSummary, "compare": CompareSummary}


def summary_of(manifest) -> Summary:
    """The typed summary of a manifest's stage (an empty one for a run that has not written it yet)."""
    cls = _SUMMARIES.get(manifest.stage, Summary)
    try:
        return cls.model_validate(manifest.summary)
    except ValidationError:
        return Summary.model_validate(manifest.summary)  # partial: a run that failed before its summary


# ---------------------------------------------------------------------------- report.json


class PruneReport(Artifact):
    """What a prune run did: target and achieved ratio (on ratio_of), shapes, losses, candidates, per-phase time
    and memory."""

    FILE: ClassVar[str] = "report.json"
    method: str
    pattern: str | None = None
    target_ratio: float | None = None
    ratio_of: str  # total, decoder or layers (reports before prune.ratio_of existed: a phrase)
    target_shape: dict[str, int] | None = None  # prune.target, when the recipe pinned the shape
    parent: str
    dtype: str | None = None  # the parent's stored dtype: what the method ran in and the pruned model is saved in
    calibration: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] = Field(default_factory=list)
    achieved_ratio: float
    parameters: dict[str, dict[str, int]]
    architecture: dict[str, dict[str, Any]]
    calibration_loss: dict[str, float | None]
    heldout: dict[str, Any] | None = None
    flap: dict[str, Any] | None = None  # FLAP's settings: whose statistics scored the layers, the KV-group score
    phases: list[dict[str, Any]] = Field(default_factory=list)

    def summary(self) -> PruneSummary:
        return PruneSummary.model_validate(self.model_dump(include=set(PruneSummary.model_fields)))


# ---------------------------------------------------------------------------- eval/<key>.json


class Score(BaseModel):
    model_config = ConfigDict(extra="allow")
    loss: float | None = None
    perplexity: float | None = None
    tokens: int | None = None
    windows: int | None = None
    seq_len: int | None = None
    tokens_per_s: float | None = None


class TaskScore(BaseModel):
    model_config = ConfigDict(extra="allow")
    metric: str
    value: float | None
    n: int | None = None

    @property
    def stderr(self) -> float | None:
        return (self.model_extra or {}).get(f"{self.metric}_stderr")


class ZeroShotResults(BaseModel):
    model_config = ConfigDict(extra="allow")
    tasks: dict[str, TaskScore] = Field(default_factory=dict)
    average: float | None = None


class EvalResults(Artifact):
    """One eval configuration's numbers for one model version; the file name is the configuration's key."""

    run: str | None = None
    stage: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    key: str | None = None
    parameters: dict[str, int]
    device: str | None = None
    dtype: str | None = None
    code_version: str | None = None
    heldout: Score | None = None
    perplexity: dict[str, Score] = Field(default_factory=dict)
    zero_shot: ZeroShotResults | None = None
    seconds: float | None = None
    finished: str | None = None
    packages: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------- graph.json


class StudyNode(BaseModel):
    """One job of a study: which recipe (with which overrides), after which nodes, as which run."""

    key: str
    group: str
    stage: str
    source: str  # recipe file
    overrides: list[str]
    deps: list[str] = Field(default_factory=list)
    ref: str | None = None  # name@vNNN (eval: the evaluated run)
    state: str = "new"  # new | reused | resume | in-flight | planned | skipped
    job: str | None = None
    results: str | None = None  # eval: the results file
    pins: list[str] = Field(default_factory=list)  # the overrides that pin inputs to this study's versions

    @property
    def name(self) -> str:
        return self.key.split("/", 1)[1]


class StudyGraph(Artifact):
    FILE: ClassVar[str] = "graph.json"
    study_file: str
    executor: str
    eval: dict[str, Any]
    methods: list[dict[str, Any]]
    nodes: list[StudyNode]

"""What an eval measures: held-out loss, perplexity corpora and lm-eval zero-shot tasks; a key per configuration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..data import HeldOutConfig
from ..errors import PrunectlError
from ..schema import Strict


class PerplexityCorpus(Strict):
    """Perplexity on a corpus: a held-out range of a prepared data run, or a Hugging Face dataset split."""

    name: str
    data: str | None = Field(None, description="prepared data run whose range is scored (its token stream)")
    range: str | None = None
    dataset: str | None = Field(None, description="Hugging Face dataset id, read from the local cache")
    subset: str | None = Field(None, description="dataset configuration, e.g. wikitext-2-raw-v1")
    split: str = Field("test", description="validation or test: never a split anything trained or calibrated on")
    data_files: str | None = Field(None, description="files of the dataset to read (e.g. one C4 validation shard)")
    field: str = "text"
    seq_len: int = Field(8192, ge=2)
    sequences: int = Field(256, ge=1, description="non-overlapping windows scored")

    @model_validator(mode="after")
    def _one_source(self) -> PerplexityCorpus:
        if (self.dataset is None) == (self.data is None or self.range is None):
            raise ValueError(f"perplexity corpus '{self.name}': give either data + range or dataset")
        if self.dataset is not None and self.split not in ("validation", "test"):
            raise ValueError(f"perplexity corpus '{self.name}': split '{self.split}' is not held out; use validation or test")
        return self

    def files(self) -> dict[str, str] | None:
        """data_files, named after the split they are (so `split` still says what is read)."""
        return {self.split: self.data_files} if self.data_files else None


class ZeroShot(Strict):
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names (the built-in choice task: data-run name + '-continuation')")
    include: list[str] = Field(default_factory=list, description="directories of local lm-eval task YAMLs")
    trust_code: bool = Field(False, description="allow the include directories' Python code to run: lm-eval imports "
                                                "the modules their YAMLs name with `!function` (never under --dry-run)")
    batch_size: int | Literal["auto"] = Field("auto", description="auto: 16 on CPU, lm-eval's search on GPU")
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1, description="score only the first N documents of each task")

    def untrusted(self) -> str | None:
        """The problem, if the include directories would run code the user has not allowed."""
        if self.include and not self.trust_code:
            return (f"eval.zero_shot.include: {', '.join(self.include)}: lm-eval task directories can execute Python "
                    "(`!function`); set eval.zero_shot.trust_code=true to allow it")
        return None

    def include_paths(self) -> list[Path]:
        """The include directories, only once the user has allowed their code; the one way to get them."""
        if problem := self.untrusted():
            raise PrunectlError(problem)
        return [Path(p) for p in self.include]


class EvalConfig(Strict):
    heldout: HeldOutConfig | None = HeldOutConfig()
    perplexity: list[PerplexityCorpus] = Field(default_factory=list)
    zero_shot: ZeroShot = ZeroShot()
    batch_size: int = Field(8, ge=1, description="windows per forward pass for held-out loss and perplexity")

    def key(self) -> str:
        """The results file's name: a hash of everything that changes a number (trust_code does not, so stored
        results keep their key)."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"zero_shot": {"trust_code"}}), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


CHOICE_SUFFIX = "-continuation"


def results_path(run_dir: Path, cfg: EvalConfig) -> Path:
    return Path(run_dir) / "eval" / f"{cfg.key()}.json"

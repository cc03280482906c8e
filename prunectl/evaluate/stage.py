"""`prunectl eval`: measure a complete run's final model and store the results with that exact version.

Results live in <run>/eval/<key>.json, where key hashes the eval configuration, so an identical eval
is a no-op and a changed one is a new file. A result file is written atomically at the very end:
an interrupted eval leaves nothing that looks like a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from ..errors import PrunectlError
from ..schema import Strict


class HeldOutLoss(Strict):
    """Mean next-token loss on the training stream's held-out range (the paper's DCLM loss)."""

    range: str = "validation"
    tokens: int = Field(65536, ge=2)
    seq_len: int = Field(256, ge=2)


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
    batch_size: int | Literal["auto"] = Field("auto", description="auto: 16 on CPU, lm-eval's search on GPU")
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1, description="score only the first N documents of each task")


class EvalConfig(Strict):
    heldout: HeldOutLoss | None = HeldOutLoss()
    perplexity: list[PerplexityCorpus] = Field(default_factory=list)
    zero_shot: ZeroShot = ZeroShot()
    batch_size: int = Field(8, ge=1, description="windows per forward pass for held-out loss and perplexity")

    def key(self) -> str:
        """The results file's name: a hash of everything that changes a number."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


CHOICE_SUFFIX = "-continuation"


def results_path(run_dir: Path, cfg: EvalConfig) -> Path:
    return Path(run_dir) / "eval" / f"{cfg.key()}.json"


def local_tasks(root: Path, data_ref: str | None, tasks: list[str], folder: Path) -> list[Path]:
    """lm-eval YAMLs for the data runs' built-in choice tasks named in `tasks`, written into `folder`."""
    from .. import store
    from .choice_task import task_yaml

    written = []
    for name in tasks:
        if not name.endswith(CHOICE_SUFFIX):
            continue
        data_name = name[: -len(CHOICE_SUFFIX)]
        ref = data_ref if data_ref and data_ref.split("@")[0] == data_name else f"{data_name}@latest"
        try:
            data_run = store.resolve(root, ref)
        except PrunectlError:
            continue  # not ours: lm-eval reports it as an unknown task
        jsonl = data_run.dir / "tasks" / f"{CHOICE_SUFFIX[1:]}.jsonl"
        if not jsonl.exists():
            raise PrunectlError(f"eval.zero_shot.tasks: {data_run.ref} has no choice task; prepare the data again "
                                "with this prunectl (data prepare builds it from the validation range)")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.yaml").write_text(task_yaml(name, jsonl))
        written.append(folder)
    return sorted(set(written))


def run_eval(run_dir: Path, cfg_json: str, force: bool = False) -> dict[str, Any]:
    """Every measurement of `cfg` on the run's final model; the results file is the last thing written."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import store
    from ..data import TokenStream, validation_starts
    from ..model import parameter_counts
    from . import harness
    from .perplexity import joined_windows, score_windows, stream_windows

    cfg = EvalConfig.model_validate_json(cfg_json)
    run_dir = Path(run_dir)
    out_path = results_path(run_dir, cfg)
    if out_path.exists() and not force:
        return json.loads(out_path.read_text())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    threads = int(os.environ.get("PRUNECTL_THREADS", "0"))
    if threads and not cuda:
        torch.set_num_threads(threads)
    run = store.Run.at(run_dir)
    manifest = run.manifest()
    started = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(run.final, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.final)
    data_ref = manifest.inputs.get("data")
    results: dict[str, Any] = {
        "run": run.ref, "stage": manifest.stage, "config": cfg.model_dump(mode="json"), "key": cfg.key(),
        "parameters": parameter_counts(model), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "code_version": store.code_version(),
    }

    if cfg.heldout is not None:
        stream = TokenStream(store.resolve(run.root, data_ref).dir)
        r = stream.range(cfg.heldout.range)
        starts = validation_starts(stream, cfg.heldout.range, cfg.heldout.seq_len, cfg.heldout.tokens)
        windows = stream_windows(stream, r.start, r.start + len(starts) * cfg.heldout.seq_len, cfg.heldout.seq_len, None)
        score = _timed(score_windows, model, windows, cfg.batch_size, device, f"held-out loss ({cfg.heldout.range})")
        results["heldout"] = {"data": data_ref, "range": cfg.heldout.range, **score}

    results["perplexity"] = {}
    for corpus in cfg.perplexity:
        if corpus.dataset is None:
            data_run = store.resolve(run.root, corpus.data)
            stream = TokenStream(data_run.dir)
            r = stream.range(corpus.range)
            windows = stream_windows(stream, r.start, r.end, corpus.seq_len, corpus.sequences)
            source = {"data": data_run.ref, "range": corpus.range}
        else:
            from datasets import load_dataset

            with harness.offline():
                split = load_dataset(corpus.dataset, corpus.subset, split=corpus.split, data_files=corpus.files())
            windows = joined_windows(tokenizer, (row[corpus.field] for row in split), corpus.seq_len, corpus.sequences)
            source = {"dataset": corpus.dataset, "subset": corpus.subset, "split": corpus.split}
        results["perplexity"][corpus.name] = {**source, **_timed(score_windows, model, windows, cfg.batch_size, device,
                                                                 f"perplexity {corpus.name}")}

    if cfg.zero_shot.tasks:
        with tempfile.TemporaryDirectory() as tmp, harness.offline():
            include = [*local_tasks(run.root, data_ref, cfg.zero_shot.tasks, Path(tmp)), *map(Path, cfg.zero_shot.include)]
            batch = cfg.zero_shot.batch_size
            if batch == "auto" and device.type != "cuda":
                batch = 16
            del model  # lm-eval loads its own copy
            results["zero_shot"] = harness.evaluate(run.final, cfg.zero_shot.tasks, include, batch, device,
                                                    cfg.zero_shot.limit, cfg.zero_shot.num_fewshot,
                                                    f"prunectl eval <recipe> run={run.ref} --prefetch")
        values = [t["value"] for t in results["zero_shot"]["tasks"].values() if t.get("value") is not None]
        results["zero_shot"]["average"] = sum(values) / len(values) if values else None
    results["seconds"] = round(time.perf_counter() - started, 2)
    results["finished"] = store.now()
    results["packages"] = store.package_versions()
    store.write_json(out_path, results)
    return results


def _timed(fn, *args) -> dict[str, Any]:
    start = time.perf_counter()
    score = fn(*args)
    seconds = time.perf_counter() - start
    return {"loss": score.loss, "perplexity": score.perplexity, "tokens": score.tokens, "windows": score.windows,
            "seq_len": max((len(w.inputs) for w in args[1]), default=0), "tokens_per_s": score.tokens / seconds if seconds else None}


# ------------------------------------------------------------------------------------------ checks


def trained_on(root: Path, run) -> set[tuple[str, str]]:
    """(data run, range) pairs a model's lineage trained or calibrated on: never scored as held out."""
    from .. import store

    seen: set[tuple[str, str]] = set()
    frontier = [run]
    while frontier:
        current = frontier.pop()
        manifest = current.manifest()
        if manifest is None:
            continue
        if manifest.data is not None:
            seen.update((manifest.data.data, name) for name in manifest.data.ranges)
        if manifest.stage == "prune":
            calib = yaml.safe_load((current.dir / "recipe.yaml").read_text()).get("calibration") or {}
            data = manifest.inputs.get("calibration") or manifest.inputs.get("data")
            if data:
                seen.add((data, calib.get("range", "calibration")))
        for key in ("parent", "init", "like"):
            ref = manifest.inputs.get(key)
            if ref and not Path(ref).is_absolute():
                try:
                    frontier.append(store.resolve(root, ref))
                except PrunectlError:
                    continue
    return seen


def check(root: Path, r, tasks: bool = True) -> tuple[Any, str | None]:
    """The run and its data, and every problem with the eval configuration; nothing is written."""
    from .. import store
    from . import harness

    problems: list[str] = []
    try:
        run = store.resolve(root, r.run)
    except PrunectlError as err:
        raise PrunectlError(f"run: {err.problems[0]}") from None
    if not (run.final / "config.json").exists():
        raise PrunectlError(f"run: {run.ref} has no final model to evaluate (an LR sweep's prefix run keeps none)")
    data_ref = run.manifest().inputs.get("data")
    cfg = r.eval
    if cfg.heldout is not None:
        if data_ref is None:
            problems.append(f"eval.heldout: {run.ref} names no data run; set eval.heldout=null")
        else:
            meta = json.loads((store.resolve(root, data_ref).dir / "data.json").read_text())
            if cfg.heldout.range not in meta["ranges"]:
                problems.append(f"eval.heldout.range: {data_ref} has no range {cfg.heldout.range}")
    used = trained_on(root, run)
    for corpus in cfg.perplexity:
        if corpus.data is None:
            continue
        try:
            data_run = store.resolve(root, corpus.data)
        except PrunectlError as err:
            problems.append(f"eval.perplexity[{corpus.name}].data: {err.problems[0]}")
            continue
        ranges = json.loads((data_run.dir / "data.json").read_text())["ranges"]
        if corpus.range not in ranges:
            problems.append(f"eval.perplexity[{corpus.name}].range: {data_run.ref} has no range {corpus.range}")
        elif (data_run.ref, corpus.range) in used:
            problems.append(f"eval.perplexity[{corpus.name}].range: {run.ref}'s lineage trained or calibrated on "
                            f"'{corpus.range}' of {data_run.ref}; score a held-out range (e.g. validation)")
    if problems:
        raise PrunectlError(*problems)
    if cfg.zero_shot.tasks and tasks:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp, harness.offline():
            include = [*local_tasks(root, data_ref, cfg.zero_shot.tasks, Path(tmp)), *map(Path, cfg.zero_shot.include)]
            harness.check_tasks(cfg.zero_shot.tasks, include, f"prunectl eval {r.name} --prefetch")
    return run, data_ref

"""`prunectl eval`: measure a complete run's final model and store the results with that exact version.

Results live in <run>/eval/<key>.json, where key hashes the eval configuration, so an identical eval
is a no-op and a changed one is a new file. A result file is written atomically at the very end:
an interrupted eval leaves nothing that looks like a result.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import lineage, store
from ..artifacts import DataMeta, EvalResults
from ..errors import PrunectlError
from ..evaluate import harness
from ..evaluate.config import CHOICE_SUFFIX, results_path

if TYPE_CHECKING:
    from ..recipe import EvalRecipe


def local_tasks(root: Path, data_ref: str | None, tasks: list[str], folder: Path) -> list[Path]:
    """lm-eval YAMLs for the data runs' built-in choice tasks named in `tasks`, written into `folder`."""
    from ..evaluate.choice_task import task_yaml

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


def run(recipe: EvalRecipe, run_dir: Path, force: bool = False) -> EvalResults:
    """Every measurement of the recipe's eval on the run's final model; the results file is the last thing written."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import TokenStream, validation_starts
    from ..evaluate.perplexity import joined_windows, score_windows, stream_windows
    from ..model import parameter_counts

    cfg = recipe.eval
    user_tasks = cfg.zero_shot.include_paths()  # refused before any work unless their code is allowed
    run_dir = Path(run_dir)
    out_path = results_path(run_dir, cfg)
    if out_path.exists() and not force:
        return EvalResults.read(out_path)
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

    if cfg.heldout is not None and cfg.heldout.tokens:
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
            include = [*local_tasks(run.root, data_ref, cfg.zero_shot.tasks, Path(tmp)), *user_tasks]
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
    typed = EvalResults.model_validate(results)
    typed.write(out_path)
    return typed


def _timed(fn, *args) -> dict[str, Any]:
    start = time.perf_counter()
    score = fn(*args)
    seconds = time.perf_counter() - start
    return {"loss": score.loss, "perplexity": score.perplexity, "tokens": score.tokens, "windows": score.windows,
            "seq_len": max((len(w.inputs) for w in args[1]), default=0), "tokens_per_s": score.tokens / seconds if seconds else None}


# ------------------------------------------------------------------------------------------ checks


def prefetch(recipe: EvalRecipe) -> list[str]:
    """On a login node with internet: fill the Hugging Face cache with every dataset the suite reads."""
    from datasets import load_dataset

    done = []
    for corpus in recipe.eval.perplexity:
        if corpus.dataset:
            with harness.offline(False):
                load_dataset(corpus.dataset, corpus.subset, split=corpus.split, data_files=corpus.files())
            done.append(f"cached {corpus.dataset} {corpus.subset or ''} {corpus.split}")
    hub = [t for t in recipe.eval.zero_shot.tasks if not t.endswith(CHOICE_SUFFIX)]
    if hub:
        harness.prefetch(hub, recipe.eval.zero_shot.include_paths())
        done.append(f"cached the data of {', '.join(hub)}")
    return done


def check_target(run_dir: Path) -> None:
    """A study's eval job, at its start: the run it evaluates must have completed."""
    run = store.Run.at(run_dir)
    manifest = run.manifest()
    if manifest is None or manifest.status != "complete":
        raise PrunectlError(f"{run.ref}: is {manifest.status if manifest else 'missing'}, not complete; nothing to evaluate")


def check(root: Path, r: EvalRecipe, tasks: bool = True, *, includes: bool = True) -> tuple[store.Run, str | None]:
    """The run and its data, and every problem with the eval configuration; nothing is written.

    `tasks`: check the zero-shot task names with lm-eval's index. `includes`: index the include directories too,
    which imports their code: False for a dry run, which then leaves the task names of such a suite unchecked."""

    problems: list[str] = []
    try:
        run = store.resolve(root, r.run)
    except PrunectlError as err:
        raise PrunectlError(f"run: {err.problems[0]}") from None
    if not (run.final / "config.json").exists():
        raise PrunectlError(f"run: {run.ref} has no final model to evaluate (an LR sweep's prefix run keeps none)")
    data_ref = run.manifest().inputs.get("data")
    cfg = r.eval
    if problem := cfg.zero_shot.untrusted():
        problems.append(problem)
    used = _trained_on(root, run)
    if cfg.heldout is not None and cfg.heldout.tokens:
        if data_ref is None:
            problems.append(f"eval.heldout: {run.ref} names no data run; set eval.heldout=null")
        else:
            data_run = store.resolve(root, data_ref)
            if cfg.heldout.range not in DataMeta.read(data_run.dir).ranges:
                problems.append(f"eval.heldout.range: {data_ref} has no range {cfg.heldout.range}")
            elif (data_run.dir.resolve(), cfg.heldout.range) in used:
                problems.append(f"eval.heldout.range: {run.ref}'s lineage trained or calibrated on "
                                f"'{cfg.heldout.range}' of {data_ref}; score a held-out range (e.g. validation)")
    for corpus in cfg.perplexity:
        if corpus.data is None:
            continue
        try:
            data_run = store.resolve(root, corpus.data)
        except PrunectlError as err:
            problems.append(f"eval.perplexity[{corpus.name}].data: {err.problems[0]}")
            continue
        ranges = DataMeta.read(data_run.dir).ranges
        if corpus.range not in ranges:
            problems.append(f"eval.perplexity[{corpus.name}].range: {data_run.ref} has no range {corpus.range}")
        elif (data_run.dir.resolve(), corpus.range) in used:  # the same data under any name (symlinks)
            problems.append(f"eval.perplexity[{corpus.name}].range: {run.ref}'s lineage trained or calibrated on "
                            f"'{corpus.range}' of {data_run.ref}; score a held-out range (e.g. validation)")
    if problems:
        raise PrunectlError(*problems)
    if cfg.zero_shot.tasks and tasks and (includes or not cfg.zero_shot.include):
        with tempfile.TemporaryDirectory() as tmp, harness.offline():
            include = [*local_tasks(root, data_ref, cfg.zero_shot.tasks, Path(tmp)), *cfg.zero_shot.include_paths()]
            harness.check_tasks(cfg.zero_shot.tasks, include, f"prunectl eval {r.name} --prefetch")
    return run, data_ref


def _trained_on(root: Path, run: store.Run) -> set[tuple[Path, str]]:
    """lineage.trained_on as (real data run directory, range): a ref spelled another way (an alias, a symlinked
    runs root) is still the same data."""
    found = set()
    for ref, name in lineage.trained_on(root, run):
        try:
            found.add((store.Run.of(root, ref).dir.resolve(), name))
        except (PrunectlError, ValueError):
            continue  # not a run reference: nothing under this root to compare with
    return found

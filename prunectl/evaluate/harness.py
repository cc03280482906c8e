"""lm-evaluation-harness adapter: zero-shot tasks on a run's final model, offline as compute nodes need.

The paper's eight tasks and their metrics (Appendix E) are the default suite in recipes/paper; any
other lm-eval task name or local task YAML directory works too. The standard error recorded is
sqrt(acc (1 - acc) / N), with N the number of documents scored.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import PrunectlError

# The metric the paper reports for each of its tasks (Appendix E); other tasks report acc and acc_norm.
PAPER_METRICS = {"winogrande": "acc", "hellaswag": "acc_norm", "piqa": "acc_norm", "arc_challenge": "acc_norm",
                 "arc_easy": "acc_norm", "sciq": "acc", "openbookqa": "acc_norm", "boolq": "acc"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextmanager
def offline(enabled: bool = True):
    """Compute nodes have no internet: read the Hugging Face cache only (what --prefetch filled)."""
    saved = {k: os.environ.get(k) for k in OFFLINE_VARS}
    if enabled:
        os.environ.update({k: "1" for k in OFFLINE_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(include: list[Path], tasks: list[str]):
    """lm-eval's task index. Indexing its thousands of built-in task files takes ~13 s on a small CPU, so
    when every task is one of the included (local) ones, only those are indexed."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths or None)


def check_tasks(tasks: list[str], include: list[Path], prefetch_hint: str, load: bool = True) -> None:
    """Unknown task names, and (offline) tasks whose data is not cached: one line each."""
    import difflib

    manager = task_manager(include, tasks)
    known = set(manager.all_tasks)
    problems = []
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            problems.append(f"eval.zero_shot.tasks: '{name}' is not an lm-eval task"
                            + (f"; did you mean '{close[0]}'?" if close else "; `lm_eval ls tasks` lists them"))
    if problems:
        raise PrunectlError(*problems)
    if load:
        load_tasks(manager, tasks, prefetch_hint)


def load_tasks(manager, tasks: list[str], prefetch_hint: str):
    try:
        return manager.load(tasks)
    except ConnectionError as err:  # datasets raises it when offline mode meets an empty cache
        found = re.search(r"reach '([^']+)'", str(err))  # "Couldn't reach 'org/name' on the Hub (...)"
        missing = found.group(1) if found else "of a task"
        raise PrunectlError(f"eval.zero_shot.tasks: dataset {missing} is not in the local Hugging Face cache "
                            f"(offline mode); fill it on a login node with `{prefetch_hint}`") from None


def evaluate(model_dir: Path, tasks: list[str], include: list[Path], batch_size: int | str, device,
             limit: int | None, num_fewshot: int, prefetch_hint: str) -> dict[str, Any]:
    """Run lm-eval's simple_evaluate with its Hugging Face wrapper; per-task metrics, N and versions."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    lm = HFLM(pretrained=str(model_dir), device=str(device), batch_size=batch_size, dtype=dtype)
    manager = task_manager(include, tasks)
    load_tasks(manager, tasks, prefetch_hint)  # the clear error for a missing cache, before any scoring
    with torch.inference_mode():
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0)
    results = {}
    for task in tasks:
        metrics = out["results"][task]
        n = out["n-samples"][task]["effective"]
        row: dict[str, Any] = {"n": n, "version": out["versions"].get(task)}
        for key in ("acc", "acc_norm"):
            value = metrics.get(f"{key},none")
            if value is not None:
                row[key] = value
                row[f"{key}_stderr"] = math.sqrt(value * (1 - value) / n) if n else math.nan
        row["metric"] = PAPER_METRICS.get(task, "acc_norm" if "acc_norm" in row else "acc")
        row["value"] = row.get(row["metric"])
        results[task] = row
    return {"tasks": results, "lm_eval_version": out.get("lm_eval_version") or lm_eval.__version__,
            "num_fewshot": num_fewshot, "limit": limit}


def prefetch(tasks: list[str], include: list[Path]) -> None:
    """On a login node (with internet): download every dataset the tasks read into the HF cache."""
    with offline(False):
        task_manager(include, tasks).load(tasks)

"""Where a run came from: the chain of runs behind it, through prune `parent`, retrain `init` and twin `like`.

Every question about ancestry (what pretraining is behind this model, which data it read, which
ranges it must never be scored on) walks the one chain here. A chain ends at a Hugging Face
directory (its history is not prunectl's to know) or at a run that no longer resolves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import yaml

from . import store
from .errors import PrunectlError

UPSTREAM = ("parent", "init", "like")  # prune, retrain, scratch twin: each stage has at most one
MAX_DEPTH = 16


def chain(root: Path, run: store.Run) -> Iterator[tuple[store.Run, store.Manifest]]:
    """The run itself, then each run it was made from, nearest first."""
    for _ in range(MAX_DEPTH):
        manifest = run.manifest()
        if manifest is None:
            return
        yield run, manifest
        ref = next((manifest.inputs[k] for k in UPSTREAM if k in manifest.inputs), None)
        if ref is None or Path(ref).is_absolute():
            return
        try:
            run = store.resolve(root, ref)
        except PrunectlError:
            return


def pretraining(root: Path, run: store.Run) -> tuple[str, store.DataUse] | None:
    """(run ref, tokens consumed) of the pretraining behind a run: itself if it is one, else its nearest.

    None when the chain ends at a Hugging Face directory, whose training data prunectl cannot know."""
    for each, manifest in chain(root, run):
        if manifest.stage == "pretrain":
            return (each.ref, manifest.data) if manifest.data else None
    return None


def data_of(root: Path, run: store.Run) -> str | None:
    """The prepared data run a model's chain names nearest (name@vNNN)."""
    return next((m.inputs["data"] for _, m in chain(root, run) if "data" in m.inputs), None)


def trained_on(root: Path, run: store.Run) -> set[tuple[str, str]]:
    """(data run, range) pairs a model's chain trained or calibrated on: never to be scored as held out."""
    seen: set[tuple[str, str]] = set()
    for each, manifest in chain(root, run):
        if manifest.data is not None:
            seen.update((manifest.data.data, name) for name in manifest.data.ranges)
        if manifest.stage == "prune":
            calibration = yaml.safe_load((each.dir / "recipe.yaml").read_text()).get("calibration") or {}
            data = manifest.inputs.get("calibration") or manifest.inputs.get("data")
            if data:
                seen.add((data, calibration.get("range", "calibration")))
    return seen

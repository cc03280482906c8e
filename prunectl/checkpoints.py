"""Training checkpoints: save with a record of what was written, find the newest one that verifies, load it safely.

A checkpoint is `checkpoints/stepNNNNNNNN/` (DeepSpeed's files) plus `files.json` (every file's size),
written by rank 0 after every rank has saved and before `latest.json` names it. A directory without
that record is an unfinished save and is never resumed from. Nothing read from the run directory
decides what gets unpickled: tags must be `stepNNNNNNNN` directories inside `checkpoints/` itself, and
every DeepSpeed state is loaded with `torch.load(weights_only=True)` and a short allow-list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from . import distributed, store
from .errors import PrunectlError

TAG = re.compile(r"step\d{8}")
LATEST = "latest.json"
RECORD = "files.json"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def safe_globals() -> list:
    """The classes besides tensors and containers that prunectl's ZeRO checkpoints hold (fp32 and bf16, stages 0-3)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # LossScaler: the ZeRO optimizer's loss_scaler entry (a static scaler of 1 in fp32/bf16);
    # ZeroStageEnum: its zero_stage entry; fragment_address: ZeRO-1/2 param_slice_mappings.
    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    import torch

    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def install(engine) -> None:
    """Make every load DeepSpeed does for `engine.load_checkpoint` a weights-only one (files preloaded by
    verification are handed over instead of read again; DeepSpeed itself reads the model states twice)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.preloaded: dict[str, Any] = {}

        def load(self, path: str, map_location=None):
            key = os.path.realpath(path)
            if key not in self.preloaded:
                self.preloaded[key] = safe_load(path, map_location)
            return self.preloaded[key]

    if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):  # another engine may read files differently
        raise PrunectlError(f"train: DeepSpeed uses {type(engine.checkpoint_engine).__name__}; prunectl loads "
                            "checkpoints through TorchCheckpointEngine only")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


def save(engine, folder: Path, step: int, tokens: int, keep: int, env: distributed.RankEnv) -> None:
    """Every rank saves; then rank 0 records the files, names the checkpoint in latest.json and drops old ones."""
    tag = tag_of(step)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step}, save_latest=False)
    env.barrier()
    if env.writer:
        where = folder / tag
        store.fsync_tree(where)
        files = {p.name: p.stat().st_size for p in sorted(where.iterdir()) if p.name != RECORD}
        store.write_json(where / RECORD, {"step": step, "files": files})
        store.write_json(folder / LATEST, {"tag": tag, "step": step, "tokens": tokens})
        for old in _tags(folder)[:-keep]:
            _remove(folder / old)
    env.barrier()


def resume(engine, folder: Path, env: distributed.RankEnv) -> tuple[int, str | None]:
    """Load the newest checkpoint that verifies on every rank: (its step, why newer ones did not load).

    (0, None) when no checkpoint was ever completed; a PrunectlError when some was but none loads."""
    install(engine)
    tags, problems, committed = _candidates(folder)
    # Every rank lists the same shared directory, so all walk the same tags in step; each tag is
    # taken only when it verified and loaded on every rank.
    chosen = None
    for tag in tags:
        why = _verify(folder, tag, env.rank, engine.checkpoint_engine.preloaded)
        if _everywhere(why is None, env):
            why = _load(engine, folder, tag)
            if _everywhere(why is None, env):
                chosen = tag
                break
        engine.checkpoint_engine.preloaded.clear()
        problems.append(f"checkpoint {tag} did not load: {why or 'it did not load on another rank'}")
    engine.checkpoint_engine.preloaded.clear()
    if chosen is None and committed:
        raise PrunectlError(f"train: no checkpoint in {folder} loads ({'; '.join(problems)}); "
                            "pass --new to start a new version")
    if env.writer:  # what did not load (or was never finished) must not linger to be kept or overwritten in place
        for tag in _tags(folder):
            if chosen is None or tag > chosen:
                _remove(folder / tag)
    env.barrier()
    if chosen is None:
        return 0, None
    return int(chosen[4:]), "; ".join(problems) or None


def _tags(folder: Path) -> list[str]:
    """Names in `folder` shaped like a checkpoint, oldest first (zero-padded steps sort as text)."""
    return sorted(p.name for p in folder.iterdir() if TAG.fullmatch(p.name)) if folder.is_dir() else []


def _candidates(folder: Path) -> tuple[list[str], list[str], bool]:
    """Tags to try newest first, problems with latest.json, and whether any checkpoint was ever completed.

    latest.json names the newest complete checkpoint; anything newer is an unfinished save. Without a
    usable latest.json every recorded checkpoint is a candidate."""
    tags = _tags(folder)[::-1]
    recorded = any((folder / t / RECORD).is_file() for t in tags)
    try:
        latest = json.loads((folder / LATEST).read_text())["tag"]
    except FileNotFoundError:
        return tags, [], recorded
    except (OSError, ValueError, KeyError, TypeError) as err:
        return tags, [f"{LATEST} is unreadable ({type(err).__name__})"], True
    if not isinstance(latest, str) or not TAG.fullmatch(latest):
        return tags, [f"{LATEST} names {str(latest)[:80]!r}, not a checkpoint of this run"], True
    return [latest, *(t for t in tags if t < latest)], [], True


def _verify(folder: Path, tag: str, rank: int, preloaded: dict[str, Any]) -> str | None:
    """None when `tag` is a finished checkpoint of this run whose files this rank reads deserialize; else why not.

    Those files land in `preloaded`, so that a bad one is found before the engine's state is touched."""
    where = folder / tag
    if not where.exists():
        return "it is missing"
    if os.path.realpath(where) != os.path.join(os.path.realpath(folder), tag) or not where.is_dir():
        return "it is not a directory inside checkpoints/"
    try:
        record = json.loads((where / RECORD).read_text())
        files, step = dict(record["files"]), int(record["step"])
    except FileNotFoundError:
        return f"it has no {RECORD} (an unfinished save)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {RECORD} is unreadable ({type(err).__name__})"
    if step != int(tag[4:]):
        return f"its {RECORD} is for step {step}"
    present = {p.name for p in where.iterdir() if p.name != RECORD}
    if present != set(files):
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        return f"files differ from {RECORD} (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, size in files.items():
        path = where / name
        if path.is_symlink() or not path.is_file():
            return f"{name} is not a plain file"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {RECORD} says {size}"
    # What a rank reads: the model states (ZeRO-3: its own) and its own ZeRO optimizer partition.
    mine = re.compile(rf"mp_rank_\d+_model_states\.pt|(bf16_)?zero_pp_rank_{rank}_mp_rank_\d+_(optim|model)_states\.pt")
    for name in files:
        if mine.fullmatch(name):
            try:
                preloaded[os.path.realpath(where / name)] = safe_load(where / name)
            except Exception as err:  # a truncated, corrupted or disallowed pickle: this checkpoint does not verify
                return f"{name}: {_first_line(err)}"
    return None


def _load(engine, folder: Path, tag: str) -> str | None:
    try:
        path, client = engine.load_checkpoint(str(folder), tag=tag)
    except Exception as err:
        return _first_line(err)
    if path is None or not client or client.get("step") != int(tag[4:]):
        return f"DeepSpeed restored step {None if not client else client.get('step')}, not {int(tag[4:])}"
    return None


def _everywhere(ok: bool, env: distributed.RankEnv) -> bool:
    return not distributed.agree(not ok, env)


def _first_line(err: BaseException) -> str:
    """The informative line of an error (torch's weights-only refusal names the global after a long preamble)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    picked = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return f"{type(err).__name__}: {picked.split(' was not an allowed global')[0]}"[:300]


def _remove(path: Path) -> None:
    """A checkpoint directory, or a symlink in its place (never what the symlink points at)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)

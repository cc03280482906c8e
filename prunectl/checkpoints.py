"""Training checkpoints: save with a record of what was written, find the newest one that verifies, load it safely.

A checkpoint is `checkpoints/stepNNNNNNNN/` (DeepSpeed's files) plus `files.json` (every file's size),
written by rank 0 after every rank has saved and before `latest.json` names it. A directory without
that record is an unfinished save and is never resumed from. Nothing read from the run directory
decides what gets unpickled: tags must be `stepNNNNNNNN` directories inside `checkpoints/` itself, and
every DeepSpeed state is loaded with `torch.load(weights_only=True)` and a short allow-list.

Resume anywhere: the record also holds the number of ranks that saved the checkpoint. ZeRO-1/2/3 partition
the optimizer state (and ZeRO-3 the weights) by rank, so a checkpoint saved on W ranks resumed on W' != W
ranks is first converted by rank 0 with DeepSpeed's universal checkpoint (`ds_to_universal`) into
`checkpoints/universal/stepNNNNNNNN/`, which every rank then loads with DeepSpeed's universal load path
(`load_universal_checkpoint`) and which is removed once loaded. The data order does not depend on the
number of ranks (train.py), so the resumed run reads exactly the sequences it would have read next.
DeepSpeed's conversion and universal load call `torch.load(weights_only=False)` themselves; prunectl runs
them with torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch set and the same allow-list, so those loads are
weights-only too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from . import distributed, store
from .errors import PrunectlError

TAG = re.compile(r"step\d{8}")
LATEST = "latest.json"
RECORD = "files.json"
UNIVERSAL = "universal"  # checkpoints/universal/<tag>/: a conversion for another number of ranks, while it loads
# A rank's ZeRO partition of the optimizer state (ZeRO-1/2/3, and DeepSpeed's bf16 optimizer at stage 0).
PARTITION = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


class Resumed(NamedTuple):
    """What resume() loaded: its step (0: a fresh start), why newer checkpoints did not load, and the number
    of ranks that saved it (None on a fresh start)."""

    step: int
    skipped: str | None
    saved_world: int | None


def note(resumed: Resumed, world: int) -> str | None:
    """The manifest's line for a resume: `resumed at step N`, the ranks when they changed, what was skipped."""
    if not resumed.step:
        return None
    text = f"resumed at step {resumed.step}"
    if resumed.saved_world not in (None, world):
        text += f" on {world} ranks from a checkpoint saved on {resumed.saved_world} (DeepSpeed universal checkpoint)"
    return text + (f" ({resumed.skipped})" if resumed.skipped else "")


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


@contextmanager
def _allowed():
    """The allow-list added for weights-only loads, and on leaving removed again, but only what this added:
    torch's own safe_globals context removes its list on leaving even when an outer one still needs it."""
    from torch import serialization

    before = serialization.get_safe_globals()
    serialization.add_safe_globals(safe_globals())
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(before)


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    import torch

    with _allowed():
        return torch.load(path, map_location=map_location, weights_only=True)


@contextmanager
def weights_only_everywhere():
    """Every torch.load in this process is a weights-only one with the allow-list, whatever weights_only its
    caller passes: DeepSpeed's universal-checkpoint conversion and load read files with weights_only=False and
    no hook to change that, so torch's own switch for this (TORCH_FORCE_WEIGHTS_ONLY_LOAD) is set around them."""
    saved = {key: os.environ.pop(key, None) for key in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with _allowed():
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        store.write_json(where / RECORD, {"step": step, "world": env.world, "files": files})
        store.write_json(folder / LATEST, {"tag": tag, "step": step, "tokens": tokens})
        for old in _tags(folder)[:-keep]:
            _remove(folder / old)
    env.barrier()


def resume(engine, folder: Path, env: distributed.RankEnv) -> Resumed:
    """Load the newest checkpoint that verifies on every rank: its step, why newer ones did not load, and
    the number of ranks that saved it (converted first when that is not the current number).

    (0, None, None) when no checkpoint was ever completed; a PrunectlError when some was but none loads."""
    install(engine)
    tags, problems, committed = _candidates(folder)
    # Every rank lists the same shared directory, so all walk the same tags in step; each tag is
    # taken only when it verified and loaded on every rank.
    chosen = saved_world = None
    for tag in tags:
        saved_world = _saved_world(folder / tag)
        other = saved_world not in (None, env.world)
        why = _verify(folder, tag, env.rank, engine.checkpoint_engine.preloaded, model_only=other)
        if _everywhere(why is None, env):
            if _needs_universal(engine, saved_world, env.world):
                why = _load_universal(engine, folder, tag, saved_world, env)
            else:
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
        return Resumed(0, None, None)
    return Resumed(int(chosen[4:]), "; ".join(problems) or None, saved_world or env.world)


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


def _verify(folder: Path, tag: str, rank: int, preloaded: dict[str, Any], model_only: bool = False) -> str | None:
    """None when `tag` is a finished checkpoint of this run whose files this rank reads deserialize; else why not.

    Those files land in `preloaded`, so that a bad one is found before the engine's state is touched.
    With `model_only` (a checkpoint to convert for another number of ranks) only the model states are
    preloaded: the partitions are read by the conversion, whose loads are weights-only too."""
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
    mine = re.compile(rf"mp_rank_\d+_model_states\.pt|(bf16_)?zero_pp_rank_{rank}_mp_rank_\d+_(optim|model)_states\.pt"
                      if not model_only else r"mp_rank_\d+_model_states\.pt")
    for name in files:
        if mine.fullmatch(name):
            try:
                preloaded[os.path.realpath(where / name)] = safe_load(where / name)
            except Exception as err:  # a truncated, corrupted or disallowed pickle: this checkpoint does not verify
                return f"{name}: {_first_line(err)}"
    return None


def _load(engine, folder: Path, tag: str, universal: bool = False) -> str | None:
    before = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal  # what DeepSpeed's load_checkpoint reads to pick its path
    try:
        path, client = engine.load_checkpoint(str(folder), tag=tag)
    except Exception as err:
        return _first_line(err)
    finally:
        engine._config.load_universal_checkpoint = before
    if path is None or not client or client.get("step") != int(tag[4:]):
        return f"DeepSpeed restored step {None if not client else client.get('step')}, not {int(tag[4:])}"
    return None


def _saved_world(where: Path) -> int | None:
    """How many ranks saved the checkpoint: its record says so; one written before records held it counts
    its ranks' optimizer partitions; None when neither tells (a stage-0 checkpoint loads on any number)."""
    try:
        record = json.loads((where / RECORD).read_text())
        world, files = record.get("world"), record["files"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # _verify says what is wrong with it
    if isinstance(world, int) and world > 0:
        return world
    ranks = {int(m.group(2)) for name in files if (m := PARTITION.fullmatch(str(name)))}
    return len(ranks) or None


def _needs_universal(engine, saved_world: int | None, world: int) -> bool:
    """Whether a checkpoint saved on `saved_world` ranks must go through DeepSpeed's universal checkpoint
    to load on `world` ranks; a PrunectlError where DeepSpeed cannot re-partition it at all."""
    if saved_world is None or saved_world == world:
        return False
    stage = int(engine.zero_optimization_stage())
    if stage == 0:
        if engine.bfloat16_enabled():  # the bf16 optimizer partitions its state by rank even at stage 0
            raise PrunectlError(f"train: the checkpoint was saved on {saved_world} ranks with train.zero_stage=0 in "
                                f"bf16, which DeepSpeed cannot re-partition for {world}; resume on {saved_world} ranks "
                                "(launch.nodes x launch.tasks_per_node) or pass --new")
        return False  # every rank holds the whole optimizer state
    if engine.zero_nvme_offload_optimizer():
        raise PrunectlError(f"train: the checkpoint was saved on {saved_world} ranks with the optimizer offloaded to "
                            f"NVMe, which DeepSpeed restores only on as many ranks; resume on {saved_world} ranks "
                            "(launch.nodes x launch.tasks_per_node) or pass --new")
    return True


def _load_universal(engine, folder: Path, tag: str, saved_world: int, env: distributed.RankEnv) -> str | None:
    """Rank 0 converts `tag` with DeepSpeed's ds_to_universal into checkpoints/universal/<tag>/; then every rank
    loads that with DeepSpeed's universal load path, and rank 0 removes it. All loads are weights-only."""
    root = folder / UNIVERSAL
    why = None
    if env.writer:
        _remove(root)  # a conversion a kill interrupted
        try:
            _convert(folder / tag, root / tag)
        except Exception as err:
            why = f"converting it from {saved_world} to {env.world} ranks failed: {_first_line(err)}"
    if _everywhere(why is None, env):
        with weights_only_everywhere():
            why = _load(engine, root, tag, universal=True)
    elif why is None:
        why = f"converting it from {saved_world} to {env.world} ranks failed on rank 0"
    env.barrier()
    if env.writer:
        _remove(root)
    return why


def _convert(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process (one worker: no process pool), every load weights-only."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    target.parent.mkdir(parents=True, exist_ok=True)
    args = Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True,
                     # UNIVERSAL_CHECKPOINT_INFO is what Megatron-style models add; a plain HF Llama has none
                     inject_missing_state=True)
    with weights_only_everywhere():
        ds_to_universal.main(args)


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

"""Retraining (R_N of P-R_N) and scratch twins (S_N, S_total): what they train, and what they must not.

Both run the one training loop (train.fit) with their own Objective:
- Retrain starts from a complete run's final/ model, holds its sparse mask if it has one, and can
  distil from a frozen teacher (by default the pruned run's parent).
- A scratch twin builds the pruned architecture at random (`like: <prune run>`) and, for a sparse
  prune run, zeroes the pruned weights and holds that mask too (the paper's Appendix G setting).

The checks here run on the login node before anything is written: they collect every problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import masks as sparse_masks
from . import store
from .errors import PrunectlError
from .model import locate
from .train import Objective


# ---------------------------------------------------------------------------------------- objectives


class _Masked(Objective):
    """Holds a sparse mask (if any) from build to the saved model, and records the sparsity reached."""

    masks: dict | None = None

    def finish(self, state: dict[str, Any], final: Path) -> dict[str, Any]:
        if not self.masks:
            return {}
        summary = sparse_masks.check(state, self.masks)
        sparse_masks.save(self.masks, final)
        return summary


class RetrainObjective(_Masked):
    def __init__(self, init_dir: Path, teacher_dir: Path | None = None, distill=None) -> None:
        from transformers import AutoTokenizer

        super().__init__()
        self.init_dir, self.teacher_dir, self.distill = Path(init_dir), teacher_dir, distill
        self.masks = sparse_masks.load(self.init_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.init_dir)
        self.teacher = None

    def build(self, tokenizer, vocab_size: int, seed: int):
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.init_dir, dtype=torch.float32, attn_implementation="sdpa")
        if self.masks:
            sparse_masks.hold(model, self.masks)
        return model

    def loss(self, engine, x, step: int):
        if self.distill is None:
            return super().loss(engine, x, step)
        from . import distill

        if self.teacher is None:  # loaded once, on the rank's device, after DeepSpeed has placed the student
            self.teacher = distill.load_teacher(self.teacher_dir, x.device)
        logits = engine(input_ids=x).logits
        ce = distill.next_token_loss(logits, x)
        kd = distill.kd_loss(logits[:, :-1], distill.teacher_logits(self.teacher, x)[:, :-1], self.distill.temperature)
        alpha = self.distill.alpha
        return alpha * kd + (1 - alpha) * ce, {"loss": ce, "kd_loss": kd}


class ScratchTwinObjective(_Masked):
    """The pruned run's architecture at random initialisation, with its sparse mask held if it has one."""

    def __init__(self, like_dir: Path) -> None:
        super().__init__()
        self.like_dir = Path(like_dir)
        self.masks = sparse_masks.load(self.like_dir)

    def build(self, tokenizer, vocab_size: int, seed: int):
        from transformers import AutoConfig

        from . import model as models

        model = models.build(AutoConfig.from_pretrained(self.like_dir), seed)
        if self.masks:
            sparse_masks.hold(model, self.masks)
        return model


def objective_for(root: Path, recipe, inputs: dict[str, str]) -> Objective:
    """The Objective a pretrain or retrain run trains, from its resolved recipe and recorded inputs."""
    if recipe.stage == "retrain":
        teacher = locate(root, inputs["teacher"])[0] if recipe.distill else None
        return RetrainObjective(store.resolve(root, inputs["init"]).final, teacher, recipe.distill)
    if recipe.like is not None:
        return ScratchTwinObjective(store.resolve(root, inputs["like"]).final)
    return Objective(recipe.model)


# ---------------------------------------------------------------------------------------- lineage


def parent_pretraining(root: Path, run: store.Run, _depth: int = 0) -> tuple[str, store.DataUse] | None:
    """The pretraining (run ref, tokens consumed) behind a run: itself, or up through prune/retrain inputs.

    None when the lineage ends at a Hugging Face directory, whose training data prunectl cannot know."""
    manifest = run.manifest()
    if manifest is None or _depth > 16:
        return None
    if manifest.stage == "pretrain":
        return (run.ref, manifest.data) if manifest.data else None
    upstream = manifest.inputs.get("parent" if manifest.stage == "prune" else "init")
    if upstream is None or Path(upstream).is_absolute():
        return None
    return parent_pretraining(root, store.resolve(root, upstream), _depth + 1)


def range_overlaps(root: Path, data_ref: str, train, seen: tuple[str, store.DataUse]) -> list[str]:
    """Every range `train` reads that shares tokens with what the parent was pretrained on."""
    parent_ref, use = seen
    data_run = store.resolve(root, data_ref)
    if data_run.ref != use.data:
        return []  # another token stream: no shared offsets to compare
    meta = json.loads((data_run.dir / "data.json").read_text())["ranges"]
    problems = []
    for name in train.data_ranges:
        if name not in meta:
            continue
        start, end = meta[name]["start"], meta[name]["end"]
        end = min(end, start + train.range_tokens.get(name, end - start))
        shared = sum(max(0, min(end, iv.end) - max(start, iv.start)) for iv in use.intervals)
        if shared:
            problems.append(
                f"train.data_ranges: '{name}' shares {shared:,} tokens with what {parent_ref} was pretrained on "
                f"({'+'.join(use.ranges)}); S_N and P-R_N train on data the parent never saw (e.g. the retrain range)")
    return problems


# ---------------------------------------------------------------------------------------- checks


def _data_meta(root: Path, ref: str, key: str, problems: list[str]) -> tuple[store.Run | None, dict]:
    try:
        run = store.resolve(root, ref)
    except PrunectlError as err:
        problems.append(f"{key}: {err.problems[0]}; prepare it with `prunectl data prepare <its recipe>`")
        return None, {}
    return run, json.loads((run.dir / "data.json").read_text())


def _config(model: Path) -> dict[str, Any]:
    return json.loads((model / "config.json").read_text())


def check_train(r, data_run, meta: dict, res, vocab: int | None, max_position: int | None) -> list[str]:
    """Problems shared by every training stage: ranges, batch split over ranks, vocabulary, context."""
    problems = []
    t = r.train
    if t.global_batch % (t.micro_batch * res.world):
        problems.append(f"train.global_batch: {t.global_batch} is not a multiple of micro_batch x ranks "
                        f"= {t.micro_batch} x {res.world}")
    if data_run is not None:
        missing = [n for n in [*t.data_ranges, t.eval_range] if n not in meta["ranges"]]
        if missing:
            problems.append(f"train.data_ranges: {data_run.ref} has no range {', '.join(missing)} "
                            f"(it has {', '.join(meta['ranges'])})")
        for name, n in t.range_tokens.items():
            if name in meta["ranges"] and n > meta["ranges"][name]["end"] - meta["ranges"][name]["start"]:
                problems.append(f"train.range_tokens: {n:,} tokens of '{name}' asked, but {data_run.ref}'s holds "
                                f"{meta['ranges'][name]['end'] - meta['ranges'][name]['start']:,}")
        have = meta["tokenizer"]["vocab_size"]
        if vocab is not None and vocab < have:
            problems.append(f"vocabulary: the model has {vocab:,} entries, fewer than {data_run.ref}'s tokenizer ({have:,})")
    if max_position is not None and t.seq_len > max_position:
        problems.append(f"train.seq_len: {t.seq_len} exceeds the model's max_position_embeddings {max_position}")
    return problems


def _sparse_zero3(r, masks_present: bool, what: str) -> list[str]:
    if masks_present and r.train.zero_stage == 3:
        return [f"train.zero_stage: 3 partitions the parameters, so the sparse mask of {what} cannot be held on "
                "their gradients; use zero_stage 1 or 2"]
    return []


def check_retrain(root: Path, r, res) -> dict[str, str]:
    """Init run, data, teacher, mask/ZeRO compatibility and data disjointness; every problem at once."""
    problems: list[str] = []
    inputs: dict[str, str] = {}
    init = None
    try:
        init = store.resolve(root, r.init)
        inputs["init"] = init.ref
        if not (init.final / "config.json").exists():
            problems.append(f"init: {init.ref} has no final model to start from")
            init = None
    except PrunectlError as err:
        problems.append(f"init: {err.problems[0]}; prune (or pretrain) it first")
    data_ref = r.data or (_data_of(root, init) if init else None)
    data_run, meta = (None, {})
    if data_ref is None and init is not None:
        problems.append(f"data: {init.ref} names no data run; set data: <prepared data run>")
    elif data_ref is not None:
        data_run, meta = _data_meta(root, data_ref, "data", problems)
    if data_run is not None:
        inputs["data"] = data_run.ref
    config = _config(init.final) if init else None
    problems += check_train(r, data_run, meta, res, config and config["vocab_size"],
                            config and config.get("max_position_embeddings"))
    if init is not None:
        problems += _sparse_zero3(r, (init.final / sparse_masks.FILE).exists(), init.ref)
        lineage = parent_pretraining(root, init)
        if lineage is not None and data_run is not None:
            problems += range_overlaps(root, data_run.ref, r.train, lineage)
    if r.distill is not None and init is not None:
        problems += _check_teacher(root, r, init, config, inputs)
    if problems:
        raise PrunectlError(*problems)
    return inputs


def _data_of(root: Path, run: store.Run) -> str | None:
    """The prepared data a run used, following prune/retrain inputs upward."""
    for _ in range(16):
        manifest = run.manifest()
        if "data" in manifest.inputs:
            return manifest.inputs["data"]
        upstream = manifest.inputs.get("init") or manifest.inputs.get("like")
        if upstream is None:
            return None
        run = store.resolve(root, upstream)
    return None


def _check_teacher(root: Path, r, init: store.Run, student: dict[str, Any], inputs: dict[str, str]) -> list[str]:
    ref = r.distill.teacher
    if ref == "parent":
        ref = init.manifest().inputs.get("parent")
        if ref is None:
            return [f"distill.teacher: 'parent' needs a prune run as init, and {init.ref} is a "
                    f"{init.manifest().stage} run; name the teacher (run or Hugging Face directory)"]
    try:
        teacher, inputs["teacher"] = locate(root, ref)
    except PrunectlError as err:
        return [f"distill.teacher: {err.problems[0]}"]
    config = _config(teacher)
    if config.get("vocab_size") != student["vocab_size"] or _vocab(teacher) != _vocab(init.final):
        return [f"distill.teacher: {ref}'s vocabulary ({config.get('vocab_size'):,} entries) differs from the "
                f"student's ({student['vocab_size']:,}); distillation compares distributions over one shared vocabulary"]
    return []


def _vocab(model: Path) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model).get_vocab()
    except (OSError, ValueError):
        return None


def check_pretrain(root: Path, r, res) -> dict[str, str]:
    """A pretrain recipe (scratch twins included): data, ranges, architecture source; every problem at once."""
    problems: list[str] = []
    data_run, meta = _data_meta(root, r.data, "data", problems)
    inputs = {"data": data_run.ref} if data_run else {}
    vocab, max_position = (r.model.vocab, r.model.max_position) if r.model else (None, None)
    if r.like is not None:
        like = _check_like(root, r, data_run, problems)
        if like is not None:
            inputs["like"] = like.ref
            config = _config(like.final)
            vocab, max_position = config["vocab_size"], config.get("max_position_embeddings")
    problems += check_train(r, data_run, meta, res, vocab, max_position)
    if problems:
        raise PrunectlError(*problems)
    return inputs


def _check_like(root: Path, r, data_run, problems: list[str]) -> store.Run | None:
    try:
        like = store.resolve(root, r.like)
    except PrunectlError as err:
        problems.append(f"like: {err.problems[0]}")
        return None
    stage = like.manifest().stage
    if stage != "prune":
        problems.append(f"like: {like.ref} is a {stage} run; a scratch twin copies the architecture of a prune run")
        return None
    problems += _sparse_zero3(r, (like.final / sparse_masks.FILE).exists(), like.ref)
    lineage = parent_pretraining(root, like)
    if lineage is not None and data_run is not None:
        if r.twin == "N":
            problems += range_overlaps(root, data_run.ref, r.train, lineage)
        else:
            absent = [name for name in lineage[1].ranges if name not in r.train.data_ranges]
            if absent:
                problems.append(f"train.data_ranges: S_total (twin: total) trains on the parent's ranges too; "
                                f"add {', '.join(absent)}")
    return like

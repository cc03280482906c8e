"""`prunectl pretrain` and `prunectl retrain`: the checks that run before anything is written (every problem
at once), the run a job executes on every rank, and the LR-sweep winner a plain submission trains with.

Pretraining (parents, S_N and S_total twins) and retraining (R_N of P-R_N) run the one training loop
(train.fit) with the Objective their recipe names (objectives.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .. import lifecycle, lineage, memory, store
from ..artifacts import DataMeta, TrainSummary, summary_of
from ..errors import PrunectlError
from ..model import Shape, locate
from ..sweep import SweepChoice, prefix_overrides

if TYPE_CHECKING:
    from ..launch import Resources
    from ..recipe import PretrainRecipe, RetrainRecipe
    from ..train import Objective

    TrainRecipe = Union[PretrainRecipe, RetrainRecipe]


def objective_for(root: Path, recipe: TrainRecipe, inputs: dict[str, str]) -> Objective:
    """The Objective a pretrain or retrain run trains, from its resolved recipe and recorded inputs."""
    from ..objectives import RetrainObjective, ScratchTwinObjective
    from ..train import Objective

    if recipe.stage == "retrain":
        teacher = locate(root, inputs["teacher"])[0] if recipe.distill else None
        return RetrainObjective(store.resolve(root, inputs["init"]).final, teacher, recipe.distill)
    if recipe.like is not None:
        return ScratchTwinObjective(store.resolve(root, inputs["like"]).final)
    return Objective(recipe.model)


def run(run: store.Run, recipe: TrainRecipe) -> dict[str, Any]:
    """Run (or resume) a pretrain or retrain run on every rank; rank 0 publishes the model and returns the summary.

    A sweep's prefix run keeps only its metrics and summary: its model is never used."""
    from .. import distributed
    from .. import model as models
    from ..train import Diverged, fit

    env = distributed.init()
    inputs = run.manifest().inputs
    done = lifecycle.published(run)  # every rank reads it before the writer may change anything
    env.barrier()
    summary: dict[str, Any] = {}
    with lifecycle.running(run, env.job_id, writer=env.writer):
        if done:
            if env.writer:
                lifecycle.complete_published(run)
            return run.manifest().summary
        objective = objective_for(run.root, recipe, inputs)
        try:
            result = fit(run, recipe.train, recipe.optimizer, objective, inputs["data"])
        except Diverged as err:
            if recipe.train.prefix_tokens is None:
                raise
            # an LR sweep's prefix run that diverged is an answer (this LR loses), not a failure
            if env.writer:
                lifecycle.complete(run, summary={**run.manifest().summary, "final_train_loss": None,
                                                 "tokens": err.step * recipe.train.global_batch * recipe.train.seq_len},
                                   note=f"diverged: {err.problems[0]}")
            return run.manifest().summary
        if result.rank == 0:
            summary = {**run.manifest().summary, **result.summary}
            if recipe.train.prefix_tokens is None:
                staging = run.dir / "final.partial"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                summary.update(objective.finish(result.state, staging))
                # save_pretrained may drop entries from the dict it is given (shared tensors): hand it a copy
                models.save(objective.language_model(result.module), dict(result.state), result.tokenizer, staging)
            typed = TrainSummary.model_validate(summary).model_dump(exclude_unset=True)
            if recipe.train.prefix_tokens is None:
                lifecycle.publish(run, staging, typed)
            else:
                lifecycle.complete(run, summary=typed)
    result.barrier()
    return summary


# ---------------------------------------------------------------------------------------- LR sweeps


def choose_lr(root: Path, recipe_ref: str, overrides: list[str], recipe: TrainRecipe) -> SweepChoice:
    """The winning LR from complete prefix runs of exactly this recipe; an error naming what is missing."""
    from .. import recipe as recipes

    losses, runs, missing = {}, {}, []
    for lr in recipe.sweep.lrs:
        prefix = recipes.resolve(recipe_ref, [*overrides, *prefix_overrides(recipe.name, recipe.sweep, lr)])
        match = recipes.runs_of(root, prefix, complete=True)
        if not match:
            missing.append(f"{lr:g}")
            continue
        loss = summary_of(match[-1].manifest()).final_train_loss
        runs[f"{lr:g}"] = match[-1].ref
        losses[f"{lr:g}"] = loss if loss is not None and math.isfinite(loss) else math.inf
    if missing:
        raise PrunectlError(
            f"sweep: {recipe.name} has no complete prefix run for lr {', '.join(missing)}; run "
            f"`prunectl {recipe.stage} {recipe_ref} --sweep lr` first (or set sweep=null to train with optimizer.lr)")
    best = min(losses, key=losses.get)
    if not math.isfinite(losses[best]):
        raise PrunectlError(f"sweep: every prefix run of {recipe.name} diverged; widen sweep.lrs toward smaller values")
    return SweepChoice(chosen_lr=float(best), prefix_tokens=recipe.sweep.prefix_tokens, runs=runs,
                       final_train_loss=losses)


# ---------------------------------------------------------------------------------------- checks


def _data_meta(root: Path, ref: str, key: str, problems: list[str]) -> tuple[store.Run | None, DataMeta | None]:
    try:
        run = store.resolve(root, ref)
    except PrunectlError as err:
        problems.append(f"{key}: {err.problems[0]}; prepare it with `prunectl data prepare <its recipe>`")
        return None, None
    return run, DataMeta.read(run.dir)


def _config(model: Path) -> dict[str, Any]:
    return json.loads((model / "config.json").read_text())


def range_overlaps(root: Path, data_ref: str, train, seen: tuple[str, store.DataUse]) -> list[str]:
    """Every range `train` reads that shares tokens with what the parent was pretrained on."""
    parent_ref, use = seen
    data_run = store.resolve(root, data_ref)
    try:
        seen_run = store.resolve(root, use.data)
    except PrunectlError:
        seen_run = None
    if seen_run is None or not data_run.same_as(seen_run):
        return []  # another token stream: no shared offsets to compare
    meta = DataMeta.read(data_run.dir).ranges
    problems = []
    for name in train.data_ranges:
        if name not in meta:
            continue
        start, end = meta[name].start, meta[name].end
        end = min(end, start + train.range_tokens.get(name, end - start))
        shared = sum(max(0, min(end, iv.end) - max(start, iv.start)) for iv in use.intervals)
        if shared:
            problems.append(
                f"train.data_ranges: '{name}' shares {shared:,} tokens with what {parent_ref} was pretrained on "
                f"({'+'.join(use.ranges)}); S_N and P-R_N train on data the parent never saw (e.g. the retrain range)")
    return problems


def check_train(r: TrainRecipe, data_run, meta: DataMeta | None, res: Resources, vocab: int | None,
                max_position: int | None) -> list[str]:
    """Problems shared by every training stage: ranges, batch split over ranks, vocabulary, context."""
    problems = []
    t = r.train
    if t.global_batch % (t.micro_batch * res.world):
        problems.append(f"train.global_batch: {t.global_batch} is not a multiple of micro_batch x ranks "
                        f"= {t.micro_batch} x {res.world}")
    if data_run is not None:
        missing = [n for n in [*t.data_ranges, t.eval_range] if n not in meta.ranges]
        if missing:
            problems.append(f"train.data_ranges: {data_run.ref} has no range {', '.join(missing)} "
                            f"(it has {', '.join(meta.ranges)})")
        for name, n in t.range_tokens.items():
            if name in meta.ranges and n > meta.ranges[name].tokens:
                problems.append(f"train.range_tokens: {n:,} tokens of '{name}' asked, but {data_run.ref}'s holds "
                                f"{meta.ranges[name].tokens:,}")
        if not missing:
            holds = {name: meta.ranges[name].tokens for name in t.data_ranges}
            if (problem := t.budget_problem(r.name, data_run.ref, holds)) is not None:
                problems.append(problem)
        have = meta.tokenizer.vocab_size
        if vocab is not None and vocab < have:
            problems.append(f"vocabulary: the model has {vocab:,} entries, fewer than {data_run.ref}'s tokenizer ({have:,})")
    if max_position is not None and t.seq_len > max_position:
        problems.append(f"train.seq_len: {t.seq_len} exceeds the model's max_position_embeddings {max_position}")
    return problems


def train_shape(root: Path, r: TrainRecipe) -> tuple[Shape, bool] | None:
    """The architecture a training run builds and whether it holds a sparse mask: from its init or like run's
    final/, or its model section and its data's vocabulary; None while those do not exist yet."""
    source = getattr(r, "init", None) or getattr(r, "like", None)
    try:
        if source is not None:
            final = store.resolve(root, source).final
            return Shape.of_json(_config(final)), (final / "masks.safetensors").exists()
        vocab = r.model.vocab or DataMeta.read(store.resolve(root, r.data).dir).tokenizer.vocab_size
        return Shape.of_model(r.model, vocab), False
    except (PrunectlError, OSError, KeyError):  # the stage's own checks say what is missing
        return None


def memory_line(root: Path, r: TrainRecipe, res: Resources) -> str | None:
    """The preflight's estimate for --dry-run: per GPU (per CPU rank when the job has no GPUs)."""
    found = train_shape(root, r)
    if found is None:
        return None
    parts = memory.estimate(found[0], r.train, res.world, r.train.bf16(res.gpus_per_node > 0), found[1])
    limit = f" of {res.gpu_mem_gb} GiB" if res.gpus_per_node and res.gpu_mem_gb else ""
    return f"memory: about {memory.describe(parts)} per {'GPU' if res.gpus_per_node else 'rank'}{limit}"


def memory_problem(root: Path, r: TrainRecipe, res: Resources, found: tuple[Shape, bool] | None = None) -> list[str]:
    """The preflight: a job whose estimated peak per GPU exceeds the profile's GPUs is refused (on GPUs only).
    `found`: the (shape, holds a mask) to estimate, when the caller bounds a model not made yet (a study)."""
    if not res.gpus_per_node or not res.gpu_mem_gb or (found := found or train_shape(root, r)) is None:
        return []
    problem = memory.fit_problem(r.name, found[0], r.train, res.world, r.train.bf16(True), found[1], res.gpu_mem_gb)
    return [problem] if problem else []


def check_retrain(root: Path, r: RetrainRecipe, res: Resources) -> dict[str, str]:
    """Init run, data, teacher and data disjointness; every problem at once."""
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
    data_ref = r.data or (lineage.data_of(root, init) if init else None)
    data_run, meta = (None, None)
    if data_ref is None and init is not None:
        problems.append(f"data: {init.ref} names no data run; set data: <prepared data run>")
    elif data_ref is not None:
        data_run, meta = _data_meta(root, data_ref, "data", problems)
    if data_run is not None:
        inputs["data"] = data_run.ref
    config = _config(init.final) if init else None
    problems += check_train(r, data_run, meta, res, config and config["vocab_size"],
                            config and config.get("max_position_embeddings"))
    problems += memory_problem(root, r, res)
    if init is not None:
        seen = lineage.pretraining(root, init)
        if seen is not None and data_run is not None:
            problems += range_overlaps(root, data_run.ref, r.train, seen)
    if r.distill is not None and init is not None:
        problems += _check_teacher(root, r, init, config, inputs)
    if problems:
        raise PrunectlError(*problems)
    return inputs


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


def check_pretrain(root: Path, r: PretrainRecipe, res: Resources) -> dict[str, str]:
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
    problems += memory_problem(root, r, res)
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
    seen = lineage.pretraining(root, like)
    if seen is not None and data_run is not None:
        if r.twin == "N":
            problems += range_overlaps(root, data_run.ref, r.train, seen)
        else:
            absent = [name for name in seen[1].ranges if name not in r.train.data_ranges]
            if absent:
                problems.append(f"train.data_ranges: S_total (twin: total) trains on the parent's ranges too; "
                                f"add {', '.join(absent)}")
    return like

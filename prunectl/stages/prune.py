"""`prunectl prune`: load a parent, prune it with one method of the method table, save a loadable model,
its masks and a report. Rank 0 does the work; a method that learns (Sheared-LLaMA) trains, and scores its
candidates, on every rank first."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import lifecycle, store
from ..artifacts import DataMeta, PruneReport
from ..errors import PrunectlError
from ..model import locate

if TYPE_CHECKING:
    import torch

    from ..launch import Resources
    from ..recipe import PruneRecipe


def run(run: store.Run, recipe: PruneRecipe) -> PruneReport | None:
    """Every rank of the job; rank 0 returns the report."""
    from .. import distributed

    env = distributed.init()
    inputs = run.manifest().inputs
    method = recipe.prune.spec
    done = lifecycle.published(run)  # every rank reads it before the writer may change anything
    env.barrier()
    with lifecycle.running(run, env.job_id, writer=env.writer):
        if done:
            if env.writer:
                lifecycle.complete_published(run)
            return PruneReport.read(run.dir) if env.writer else None
        if method.learn is not None:  # every rank: DeepSpeed training, resumable, then the candidates scored
            ids = _calibration(run.root, recipe, inputs)[0]
            method.learn(run, recipe.prune, recipe.optimizer, locate(run.root, inputs["parent"])[0], inputs["data"],
                         ids, recipe.calibration.micro_batch)
        if not env.writer:
            return None
        return _prune(run, recipe, inputs, env.device)


def _prune(run: store.Run, recipe: PruneRecipe, inputs: dict[str, str], device) -> PruneReport:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import distributed
    from .. import masks as sparse_masks
    from .. import model as models
    from ..data import TokenStream, batch, validation_starts
    from ..prune import budget
    from ..prune import calibration as calib
    from ..prune.meter import Meter
    from ..prune.context import Context
    from ..prune.surgery import Shape

    root = run.root
    cfg = recipe.prune
    method = cfg.spec
    meter = Meter(device, run.dir / "metrics.jsonl")
    distributed.allow_tf32(device)  # the fp32 statistics and losses; the model's own matmuls run in its dtype
    with meter.phase("load"):
        parent_dir = locate(root, inputs["parent"])[0]
        tokenizer = AutoTokenizer.from_pretrained(parent_dir)
        dtype = models.stored_dtype(parent_dir)  # bf16 for Llama-3.1: half the memory of an fp32 copy
        parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=dtype, attn_implementation="sdpa").eval()
        stream = TokenStream(store.resolve(root, inputs["data"]).dir)
        ids, calib_run = _calibration(root, recipe, inputs)
        heldout = None
        if recipe.heldout.tokens:
            starts = validation_starts(stream, recipe.heldout.range, recipe.heldout.seq_len, recipe.heldout.tokens)
            heldout = torch.from_numpy(batch(stream, starts, recipe.heldout.seq_len).astype("int64"))
    parent.to(device)
    micro = recipe.calibration.micro_batch
    shape = Shape.of(parent)
    before = models.parameter_counts(parent)
    report: dict[str, Any] = {
        "method": cfg.method, "pattern": cfg.pattern if method.sparse else None,
        "target_ratio": cfg.ratio, "ratio_of": cfg.ratio_of,
        "target_shape": cfg.target.model_dump(exclude_none=True) if cfg.target else None,
        "parent": inputs["parent"], "dtype": str(dtype).removeprefix("torch."), "calibration": None, "candidates": [],
    }
    if ids is not None:
        report["calibration"] = {"data": calib_run.ref, "range": recipe.calibration.range,
                                 "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                                 "tokens": int(ids.numel()), "seed": recipe.calibration.seed}
    with meter.phase("loss before"):
        loss_before = calib.lm_loss(parent, ids, micro) if ids is not None else None
        held_before = calib.lm_loss(parent, heldout, micro) if heldout is not None else None

    if device.type != "cpu" and method.layerwise:
        parent.to("cpu")  # the layer-wise pass moves one decoder layer at a time onto the accelerator
    pruned = method.apply(Context(parent, ids, cfg, micro, device, shape, meter, report, run.dir,
                                  recipe.calibration.memory_gb))

    with meter.phase("loss after"):
        pruned.model.to(device)
        loss_after = calib.lm_loss(pruned.model, ids, micro) if ids is not None else None
        held_after = calib.lm_loss(pruned.model, heldout, micro) if heldout is not None else None
    after = models.parameter_counts(pruned.model)
    if method.sparse:
        total = sum(m.numel() for m in pruned.masks.values())
        achieved = 1 - sum(int(m.sum()) for m in pruned.masks.values()) / total
        report["per_layer_sparsity"] = _per_layer(pruned.masks)
    else:
        achieved = budget.removed(shape, Shape.of(pruned.model), cfg.ratio_of)
    report.update(
        achieved_ratio=achieved,
        parameters={"before": before, "after": after},
        architecture={"before": shape.describe(), "after": Shape.of(pruned.model).describe()},
        calibration_loss={"before": loss_before, "after": loss_after},
        heldout=None if heldout is None else {
            "range": recipe.heldout.range, "tokens": int(heldout.numel()),
            "loss_before": held_before, "loss_after": held_after,
            "perplexity_before": math.exp(held_before), "perplexity_after": math.exp(held_after)},
    )
    with meter.phase("save"):
        staging = run.dir / "final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        pruned.model.to("cpu", dtype)  # saved as the parent is (config.json records it)
        pruned.model.config._attn_implementation = "sdpa"
        models.save(pruned.model, None, tokenizer, staging)
        if pruned.masks:
            sparse_masks.save(pruned.masks, staging, {"pattern": cfg.pattern, "method": cfg.method, "keep": "true"})
    report["phases"] = meter.phases
    typed = PruneReport.model_validate(report)
    typed.write(staging / "prune_report.json")
    typed.write(run.dir)
    lifecycle.publish(run, staging, typed.summary().model_dump())
    return typed


def _calibration(root: Path, recipe: PruneRecipe, inputs: dict[str, str]) -> tuple[torch.Tensor | None, store.Run]:
    """The calibration sequences (None for a method that reads none; the same on every rank) and their data run."""
    from ..data import TokenStream
    from ..prune import calibration as calib

    calib_run = store.resolve(root, inputs.get("calibration") or inputs["data"])
    ids = calib.sample(TokenStream(calib_run.dir), recipe.calibration, calib_run.ref) if recipe.prune.spec.calibrated else None
    return ids, calib_run


def _per_layer(masks: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    layers: dict[int, dict[str, float]] = {}
    for name, m in masks.items():
        i = int(name.split(".")[2])
        layers.setdefault(i, {})[name.split(".", 3)[3].removesuffix(".weight")] = round(1 - float(m.float().mean()), 6)
    return [{"layer": i, **layers[i]} for i in sorted(layers)]


# ------------------------------------------------------------------------------------------ checks


def check(root: Path, r: PruneRecipe, res: Resources) -> dict[str, str]:
    """Parent, data, calibration size and ratio feasibility, checked before anything is written."""
    from ..prune.surgery import Shape

    problems: list[str] = []
    inputs: dict[str, str] = {}
    parent_dir = None
    try:
        parent_dir, inputs["parent"] = locate(root, r.parent)
    except PrunectlError as err:
        problems.append(f"parent: {err.problems[0]}; pretrain it first or point at a Hugging Face model directory")
    data_ref = r.data
    if data_ref is None and "@" in inputs.get("parent", ""):  # a run (an HF directory is recorded by path)
        data_ref = store.resolve(root, inputs["parent"]).manifest().inputs.get("data")
    if data_ref is None and parent_dir is not None:
        problems.append("data: required when the parent is not a prunectl run (it names the calibration and held-out data)")
    meta: dict[str, DataMeta] = {}
    for key, ref in (("data", data_ref), ("calibration", r.calibration.data)):
        if ref is None:
            continue
        try:
            run = store.resolve(root, ref)
            inputs[key] = run.ref
            meta[key] = DataMeta.read(run.dir)
        except PrunectlError as err:
            problems.append(f"{key if key == 'data' else 'calibration.data'}: {err.problems[0]}")
    calib_key = "calibration" if r.calibration.data else "data"
    same_data = "calibration" not in inputs or ("data" in inputs and store.Run.of(root, inputs["calibration"]).same_as(
        store.Run.of(root, inputs["data"])))
    if same_data and r.calibration.range == r.heldout.range:
        problems.append(f"calibration.range: '{r.calibration.range}' is the held-out evaluation range; calibrate elsewhere")
    if "data" in meta and r.heldout.tokens and r.heldout.range not in meta["data"].ranges:
        problems.append(f"heldout.range: {inputs['data']} has no range {r.heldout.range}")
    if r.prune.sheared is not None and r.prune.method == "sheared-llama" and "data" in meta:
        t = r.prune.sheared.train
        missing = [n for n in [*t.data_ranges, t.eval_range] if n not in meta["data"].ranges]
        if missing:
            problems.append(f"prune.sheared.train.data_ranges: {inputs['data']} has no range {', '.join(missing)}")
        if t.global_batch % (t.micro_batch * res.world):
            problems.append(f"prune.sheared.train.global_batch: {t.global_batch} is not a multiple of micro_batch x "
                            f"ranks = {t.micro_batch} x {res.world}")
    if r.prune.spec.calibrated and calib_key in meta:
        ranges = meta[calib_key].ranges
        if r.calibration.range not in ranges:
            problems.append(f"calibration.range: {inputs[calib_key]} has no range {r.calibration.range} "
                            f"(it has {', '.join(ranges)})")
        else:
            have = ranges[r.calibration.range].tokens
            need = r.calibration.samples * r.calibration.seq_len
            if have // r.calibration.seq_len < r.calibration.samples:
                problems.append(f"calibration.samples: {r.calibration.samples} sequences of {r.calibration.seq_len} "
                                f"tokens need {need:,} tokens, but range '{r.calibration.range}' of {inputs[calib_key]} "
                                f"has {have:,}; lower calibration.samples or calibration.seq_len")
    if parent_dir is not None:
        import json

        config = json.loads((parent_dir / "config.json").read_text())
        shape = None
        if config.get("model_type") != "llama":
            problems.append(f"parent: {r.parent} is a {config.get('model_type')} model; prunectl prunes Llama models")
        else:
            try:
                shape = Shape.of_json(config)
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
                problems.append(f"parent: {parent_dir / 'config.json'} is not a complete Llama config "
                                f"({type(err).__name__}: {err}); re-save the model with save_pretrained")
        if shape is not None:
            for key in meta:
                vocab = meta[key].tokenizer.vocab_size
                if vocab > shape.vocab:
                    problems.append(f"{'data' if key == 'data' else 'calibration.data'}: {inputs[key]}'s tokenizer has "
                                    f"{vocab:,} tokens, more than the parent's vocabulary of {shape.vocab:,}")
            try:
                r.prune.spec.feasible(r.prune, shape)
            except PrunectlError as err:
                problems.extend(err.problems)
    if problems:
        raise PrunectlError(*problems)
    return inputs

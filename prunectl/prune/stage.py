"""`prunectl prune`: load a parent, prune it with one method, save a loadable model, its masks and a report."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, model_validator

from ..errors import PrunectlError
from ..schema import Strict
from .sheared import ShearedConfig
from .sparse import SparseGPTConfig, parse_pattern

if TYPE_CHECKING:
    import torch

Method = Literal["minitron-depth", "shortgpt", "minitron-width", "flap", "sheared-llama", "wanda", "sparsegpt",
                 "magnitude"]
SPARSE = ("wanda", "sparsegpt", "magnitude")
CALIBRATED = ("minitron-depth", "shortgpt", "minitron-width", "flap", "sheared-llama", "wanda", "sparsegpt")


class SearchConfig(Strict):
    """Architecture search for methods whose budget admits several shapes (Tables 5 and 6)."""

    candidates: int = Field(5, ge=1, description="at most this many shapes, spread over the feasible range")
    quantum: int = Field(8, ge=1, description="hidden and MLP sizes are multiples of this")


class PruneConfig(Strict):
    method: Method
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of parameters removed; N:M implies it")
    pattern: str = Field("unstructured", description="sparse methods: unstructured or N:M such as 2:4")
    search: SearchConfig = SearchConfig()
    sparsegpt: SparseGPTConfig = SparseGPTConfig()
    sheared: ShearedConfig | None = Field(None, description="sheared-llama: mask-learning budget and targets")

    @model_validator(mode="before")
    @classmethod
    def _ratio_from_pattern(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("ratio") is None:
            try:
                nm = parse_pattern(str(data.get("pattern", "unstructured")))
            except ValueError:
                return data  # reported by the after-validator
            if nm:
                data = {**data, "ratio": 1 - nm[0] / nm[1]}
        return data

    @model_validator(mode="after")
    def _ratio_and_pattern(self) -> PruneConfig:
        nm = parse_pattern(self.pattern)
        if nm and self.method not in SPARSE:
            raise ValueError(f"pattern {self.pattern} applies to sparse methods ({', '.join(SPARSE)}), not {self.method}")
        if nm and self.ratio is not None and not math.isclose(self.ratio, 1 - nm[0] / nm[1]):
            raise ValueError(f"ratio {self.ratio} contradicts pattern {self.pattern}, which removes "
                             f"{1 - nm[0] / nm[1]:g}; drop ratio")
        if self.method == "sheared-llama" and self.sheared is None:
            raise ValueError("sheared-llama needs prune.sheared with at least train: {tokens: ...}")
        if self.ratio is None:
            raise ValueError("ratio is required (the fraction of parameters to remove, e.g. 0.5)")
        return self


class HeldOutConfig(Strict):
    """Held-out perplexity before and after pruning, read from the evaluation range (never calibrated on)."""

    range: str = "validation"
    tokens: int = Field(65536, ge=0, description="0 skips it")
    seq_len: int = Field(256, ge=8)


# ------------------------------------------------------------------------------------------ measuring


class Meter:
    """Wall time and peak memory per phase: CUDA's allocator peak, or resident memory sampled on CPU."""

    def __init__(self, device, log: Path | None = None) -> None:
        self.device = device
        self.log = log  # metrics.jsonl: one record per phase start and end, for `--wait` and `status`
        self.phases: list[dict[str, Any]] = []

    def _record(self, **fields) -> None:
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(json.dumps(fields) + "\n")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @contextmanager
    def phase(self, name: str):
        import torch

        cuda = self.device.type == "cuda"
        peak = [self._rss()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], self._rss())

        sampler = None
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        self._record(phase=name, event="start")
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            if sampler:
                stop.set()
                sampler.join()
                peak[0] = max(peak[0], self._rss())
            mem = torch.cuda.max_memory_allocated(self.device) if cuda else peak[0]
            self.phases.append({"phase": name, "seconds": round(seconds, 3),
                                "peak_memory_mb": round(mem / 2**20, 1), "memory": "cuda" if cuda else "rss"})
            self._record(event="end", **self.phases[-1])


# ------------------------------------------------------------------------------------------ the stage


def prune(run_dir: Path) -> dict[str, Any]:
    """Run the prune recipe in run_dir/recipe.yaml; rank 0 does the work."""
    from .. import launch, store

    env = launch.init_distributed()
    from ..recipe import PruneRecipe

    run_dir = Path(run_dir)
    run = store.Run.at(run_dir)
    recipe = PruneRecipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    manifest = run.manifest()
    if recipe.prune.method == "sheared-llama":
        _learn_masks(run, recipe, manifest.inputs)  # every rank: DeepSpeed training, resumable
    if env.rank != 0:
        return {}
    job_ids = [*manifest.job_ids, *([env.job_id] if env.job_id and env.job_id not in manifest.job_ids else [])]
    run.update(status="running", started=store.now(), job_ids=job_ids, pid=os.getpid(), host=os.uname().nodename)
    try:
        report = _prune(run, recipe, manifest.inputs, env.device)
        store.mark_complete(run, summary={k: report[k] for k in ("method", "pattern", "target_ratio", "achieved_ratio",
                                                                 "parameters", "architecture", "calibration_loss",
                                                                 "heldout")})
        return report
    except BaseException as err:
        run.update(status="failed", finished=store.now(), note=f"{type(err).__name__}: {err}".splitlines()[0][:500])
        raise


def _prune(run, recipe, inputs: dict[str, str], device) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import model as models
    from .. import store
    from ..data import TokenStream, batch, validation_starts
    from . import calibration as calib
    from .surgery import Shape

    root = run.root
    cfg = recipe.prune
    (run.dir / "metrics.jsonl").unlink(missing_ok=True)
    meter = Meter(device, run.dir / "metrics.jsonl")
    with meter.phase("load"):
        parent_dir = parent_model_dir(root, inputs["parent"])
        tokenizer = AutoTokenizer.from_pretrained(parent_dir)
        parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        data_run = store.resolve(root, inputs["data"])
        stream = TokenStream(data_run.dir)
        calib_run = store.resolve(root, inputs["calibration"]) if inputs.get("calibration") else data_run
        calib_stream = stream if calib_run == data_run else TokenStream(calib_run.dir)
        ids = calib.sample(calib_stream, recipe.calibration, calib_run.ref) if cfg.method in CALIBRATED else None
        heldout = None
        if recipe.heldout.tokens:
            starts = validation_starts(stream, recipe.heldout.range, recipe.heldout.seq_len, recipe.heldout.tokens)
            heldout = torch.from_numpy(batch(stream, starts, recipe.heldout.seq_len).astype("int64"))
    parent.to(device)
    micro = recipe.calibration.micro_batch
    shape = Shape.of(parent)
    before = models.parameter_counts(parent)
    report: dict[str, Any] = {
        "method": cfg.method, "pattern": cfg.pattern if cfg.method in SPARSE else None,
        "target_ratio": cfg.ratio,
        "ratio_of": "decoder linear weights zeroed" if cfg.method in SPARSE else "total parameters removed",
        "parent": inputs["parent"], "calibration": None, "candidates": [],
    }
    if ids is not None:
        report["calibration"] = {"data": calib_run.ref, "range": recipe.calibration.range,
                                 "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                                 "tokens": int(ids.numel()), "seed": recipe.calibration.seed}
    with meter.phase("loss before"):
        loss_before = calib.lm_loss(parent, ids, micro) if ids is not None else None
        held_before = calib.lm_loss(parent, heldout, micro) if heldout is not None else None

    if device.type != "cpu" and cfg.method in ("wanda", "sparsegpt", "flap"):
        parent.to("cpu")  # the layer-wise pass moves one decoder layer at a time onto the accelerator
    masks: dict[str, torch.Tensor] = {}
    if cfg.method in SPARSE:
        pruned, masks = _sparse(parent, ids, cfg, micro, device, meter)
    elif cfg.method in ("minitron-depth", "shortgpt"):
        pruned = _depth(parent, ids, cfg, micro, shape, meter, report)
    elif cfg.method == "sheared-llama":
        pruned = _sheared_choice(run, ids, micro, device, meter, report)
    else:
        pruned = _width(parent, ids, cfg, micro, device, shape, meter, report)

    with meter.phase("loss after"):
        pruned.to(device)
        loss_after = calib.lm_loss(pruned, ids, micro) if ids is not None else None
        held_after = calib.lm_loss(pruned, heldout, micro) if heldout is not None else None
    after = models.parameter_counts(pruned)
    if cfg.method in SPARSE:
        total = sum(m.numel() for m in masks.values())
        achieved = 1 - sum(int(m.sum()) for m in masks.values()) / total
        report["per_layer_sparsity"] = _per_layer(masks)
    else:
        achieved = 1 - after["total"] / before["total"]
    report.update(
        achieved_ratio=achieved,
        parameters={"before": before, "after": after},
        architecture={"before": shape.describe(), "after": Shape.of(pruned).describe()},
        calibration_loss={"before": loss_before, "after": loss_after},
        heldout=None if heldout is None else {
            "range": recipe.heldout.range, "tokens": int(heldout.numel()),
            "loss_before": held_before, "loss_after": held_after,
            "perplexity_before": math.exp(held_before), "perplexity_after": math.exp(held_after)},
    )
    with meter.phase("save"):
        staging = run.dir / "final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        pruned.to("cpu")
        pruned.config._attn_implementation = "sdpa"
        models.save(pruned, None, tokenizer, staging)
        if masks:
            save_file({k: v.contiguous() for k, v in masks.items()}, str(staging / "masks.safetensors"),
                      metadata={"pattern": cfg.pattern, "method": cfg.method, "keep": "true"})
    report["phases"] = meter.phases
    store.write_json(staging / "prune_report.json", report)
    store.write_json(run.dir / "report.json", report)
    store.publish_dir(staging, run.final)
    return report


def check_feasible(cfg: PruneConfig, shape) -> None:
    """Raises the error a ratio or pattern would hit inside the job, from the parent's shape alone."""
    from . import depth, width

    nm = parse_pattern(cfg.pattern)
    if nm:
        widths = {"hidden": shape.hidden, "attention": shape.heads * shape.head_dim, "ffn": shape.ffn}
        bad = [f"{k} {v}" for k, v in widths.items() if v % nm[1]]
        if bad:
            raise PrunectlError(f"prune.pattern: {cfg.pattern} needs every Linear input width divisible by {nm[1]}; "
                                f"this parent has {', '.join(bad)}")
    elif cfg.method in ("minitron-depth", "shortgpt"):
        depth.layers_for_ratio(shape, cfg.ratio)
    elif cfg.method == "minitron-width":
        width.minitron_candidates(shape, cfg.ratio, cfg.search.quantum, cfg.search.candidates)
    elif cfg.method == "flap":
        width.flap_candidates(shape, cfg.ratio, cfg.search.quantum, cfg.search.candidates)
    elif cfg.method == "sheared-llama":
        from . import sheared

        sheared.candidates(shape, cfg.ratio, cfg.sheared.targets, cfg.search.quantum, cfg.search.candidates)


def check(root: Path, r, res) -> dict[str, str]:
    """Parent, data, calibration size and ratio feasibility, checked before anything is written."""
    from .. import store
    from ..model import locate
    from .surgery import Shape

    problems: list[str] = []
    inputs: dict[str, str] = {}
    parent_dir = None
    try:
        parent_dir, inputs["parent"] = locate(root, r.parent)
    except PrunectlError as err:
        problems.append(f"parent: {err.problems[0]}; pretrain it first or point at a Hugging Face model directory")
    data_ref = r.data
    if data_ref is None and "parent" in inputs and not Path(r.parent).expanduser().is_dir():
        data_ref = store.resolve(root, r.parent).manifest().inputs.get("data")
    if data_ref is None and parent_dir is not None:
        problems.append("data: required when the parent is not a prunectl run (it names the calibration and held-out data)")
    meta = {}
    for key, ref in (("data", data_ref), ("calibration", r.calibration.data)):
        if ref is None:
            continue
        try:
            run = store.resolve(root, ref)
            inputs[key] = run.ref
            meta[key] = json.loads((run.dir / "data.json").read_text())
        except PrunectlError as err:
            problems.append(f"{key if key == 'data' else 'calibration.data'}: {err.problems[0]}")
    calib_key = "calibration" if r.calibration.data else "data"
    if inputs.get("calibration") == inputs.get("data") and r.calibration.range == r.heldout.range:
        problems.append(f"calibration.range: '{r.calibration.range}' is the held-out evaluation range; calibrate elsewhere")
    if "data" in meta and r.heldout.tokens and r.heldout.range not in meta["data"]["ranges"]:
        problems.append(f"heldout.range: {inputs['data']} has no range {r.heldout.range}")
    if r.prune.sheared is not None and r.prune.method == "sheared-llama" and "data" in meta:
        t = r.prune.sheared.train
        missing = [n for n in [*t.data_ranges, t.eval_range] if n not in meta["data"]["ranges"]]
        if missing:
            problems.append(f"prune.sheared.train.data_ranges: {inputs['data']} has no range {', '.join(missing)}")
        if t.global_batch % (t.micro_batch * res.world):
            problems.append(f"prune.sheared.train.global_batch: {t.global_batch} is not a multiple of micro_batch x "
                            f"ranks = {t.micro_batch} x {res.world}")
    needs_calibration = r.prune.method in CALIBRATED
    if needs_calibration and calib_key in meta:
        ranges = meta[calib_key]["ranges"]
        if r.calibration.range not in ranges:
            problems.append(f"calibration.range: {inputs[calib_key]} has no range {r.calibration.range} "
                            f"(it has {', '.join(ranges)})")
        else:
            have = ranges[r.calibration.range]["end"] - ranges[r.calibration.range]["start"]
            need = r.calibration.samples * r.calibration.seq_len
            if have // r.calibration.seq_len < r.calibration.samples:
                problems.append(f"calibration.samples: {r.calibration.samples} sequences of {r.calibration.seq_len} "
                                f"tokens need {need:,} tokens, but range '{r.calibration.range}' of {inputs[calib_key]} "
                                f"has {have:,}; lower calibration.samples or calibration.seq_len")
    if parent_dir is not None:
        config = json.loads((parent_dir / "config.json").read_text())
        if config.get("model_type") != "llama":
            problems.append(f"parent: {r.parent} is a {config.get('model_type')} model; prunectl prunes Llama models")
        else:
            shape = Shape(layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                          heads=config["num_attention_heads"], kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                          head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
                          ffn=config["intermediate_size"], vocab=config["vocab_size"],
                          tied=bool(config.get("tie_word_embeddings")))
            for key in meta:
                vocab = meta[key]["tokenizer"]["vocab_size"]
                if vocab > shape.vocab:
                    problems.append(f"{'data' if key == 'data' else 'calibration.data'}: {inputs[key]}'s tokenizer has "
                                    f"{vocab:,} tokens, more than the parent's vocabulary of {shape.vocab:,}")
            try:
                check_feasible(r.prune, shape)
            except PrunectlError as err:
                problems.extend(err.problems)
    if problems:
        raise PrunectlError(*problems)
    return inputs


def parent_model_dir(root: Path, parent: str) -> Path:
    """A complete prunectl run's final/ or a local Hugging Face model directory (the paper's 'Meta' variant)."""
    from ..model import locate

    return locate(root, parent)[0]


def _per_layer(masks: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    layers: dict[int, dict[str, float]] = {}
    for name, m in masks.items():
        i = int(name.split(".")[2])
        layers.setdefault(i, {})[name.split(".", 3)[3].removesuffix(".weight")] = round(1 - float(m.float().mean()), 6)
    return [{"layer": i, **layers[i]} for i in sorted(layers)]


def _sparse(model, ids, cfg: PruneConfig, micro: int, device, meter: Meter):
    """Magnitude needs no data; Wanda and SparseGPT walk the layers on calibration activations."""
    from . import calibration as calib
    from . import sparse

    nm = parse_pattern(cfg.pattern)
    masks = {}
    if cfg.method == "magnitude":
        with meter.phase("prune"):
            for i, layer in enumerate(model.model.layers):
                for name in calib.LINEARS:
                    lin = layer.get_submodule(name)
                    keep = sparse.magnitude_mask(lin.weight.data, cfg.ratio, nm)
                    lin.weight.data.mul_(keep)
                    masks[f"model.layers.{i}.{name}.weight"] = keep.cpu()
        return model, masks
    with meter.phase("prune (sequential)"):
        walk = calib.Layerwise(model, ids, micro, device)
        for i, layer in walk.each_layer():
            stats = calib.collect(layer, lambda: walk.forward(layer, update=False), gram=cfg.method == "sparsegpt")
            for name in calib.LINEARS:
                lin, s = layer.get_submodule(name), stats[name]
                if cfg.method == "wanda":
                    keep = sparse.wanda_mask(lin.weight.data, s.norm.to(lin.weight.device), cfg.ratio, nm)
                    lin.weight.data.mul_(keep)
                else:
                    keep = sparse.sparsegpt_(lin.weight, s.xtx, s.n, cfg.ratio, nm, cfg.sparsegpt,
                                             f"model.layers.{i}.{name}")
                masks[f"model.layers.{i}.{name}.weight"] = keep.cpu()
    return model, masks


def _depth(model, ids, cfg: PruneConfig, micro: int, shape, meter: Meter, report: dict):
    from . import depth
    from .surgery import cut

    kept = depth.layers_for_ratio(shape, cfg.ratio)
    block = shape.layers - kept
    with meter.phase("score layers"):
        if cfg.method == "minitron-depth":
            losses = depth.block_losses(model, ids, micro, block)
            start = min(range(len(losses)), key=losses.__getitem__)
            removed = list(range(start, start + block))
            report["candidates"] = [{"remove": [i, i + block - 1], "calibration_loss": loss, "selected": i == start}
                                    for i, loss in enumerate(losses)]
        else:
            influence = depth.block_influence(model, ids, micro)
            removed = sorted(sorted(range(shape.layers), key=influence.__getitem__)[:block])
            report["block_influence"] = influence
    report["removed_layers"] = removed
    with meter.phase("cut"):
        return cut(model, layers=[i for i in range(shape.layers) if i not in removed])


def _candidate_dirs(run, recipe, shape) -> list[tuple[Path, Any]]:
    from . import sheared

    cfg = recipe.prune
    targets = sheared.candidates(shape, cfg.ratio, cfg.sheared.targets, cfg.search.quantum, cfg.search.candidates)
    return [(run.dir / "sheared" / f"candidate{k}", t) for k, t in enumerate(targets)]


def _learn_masks(run, recipe, inputs: dict[str, str]) -> None:
    """Learn masks for every target shape (Table 7); each candidate's dense cut lands in its own folder.

    A finished candidate (its dense/ folder exists) is skipped, so a rerun resumes where it stopped."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..train import fit
    from . import sheared
    from .surgery import Shape

    parent_dir = parent_model_dir(run.root, inputs["parent"])
    with torch.device("meta"):
        shape = Shape.of(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(parent_dir)))
    cfg = recipe.prune.sheared
    for folder, target in _candidate_dirs(run, recipe, shape):
        if (folder / "dense").exists():
            continue
        objective = sheared.MaskObjective(parent_dir, target, cfg)
        result = fit(run, cfg.train, recipe.optimizer, objective, inputs["data"], workdir=folder)
        if result.rank == 0:
            dense = sheared.to_dense(result.module, target)
            staging = folder / "dense.partial"
            shutil.rmtree(staging, ignore_errors=True)
            dense.save_pretrained(staging)
            objective.tokenizer.save_pretrained(staging)
            from .. import store

            store.write_json(staging / "masks_summary.json", {"expected": objective.metrics(result.module),
                                                              "tokens": result.summary["tokens"]})
            store.publish_dir(staging, folder / "dense")
        result.barrier()


def _sheared_choice(run, ids, micro: int, device, meter: Meter, report: dict):
    """The learned candidates, each scored by calibration loss; the lowest one is the result."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import calibration as calib

    best, best_loss = None, math.inf
    with meter.phase("score learned candidates"):
        for folder in sorted((run.dir / "sheared").glob("candidate*")):
            model = AutoModelForCausalLM.from_pretrained(folder / "dense", dtype=torch.float32,
                                                         attn_implementation="sdpa").to(device).eval()
            loss = calib.lm_loss(model, ids, micro)
            info = json.loads((folder / "dense" / "masks_summary.json").read_text())
            from .surgery import Shape

            report["candidates"].append({**Shape.of(model).describe(), "calibration_loss": loss,
                                         "mask_tokens": info["tokens"], **info["expected"], "selected": False})
            if loss < best_loss:
                best, best_loss, chosen = model, loss, report["candidates"][-1]
    chosen["selected"] = True
    return best


def _width(model, ids, cfg: PruneConfig, micro: int, device, shape, meter: Meter, report: dict):
    from . import calibration as calib
    from . import width

    make = width.minitron_candidates if cfg.method == "minitron-width" else width.flap_candidates
    candidates = make(shape, cfg.ratio, cfg.search.quantum, cfg.search.candidates)
    if cfg.method == "minitron-width":
        with meter.phase("score channels"):
            scores = width.minitron_scores(model, ids, micro)
    best, best_loss = None, math.inf
    with meter.phase(f"search {len(candidates)} candidate(s)"):
        for target in candidates:
            if cfg.method == "minitron-width":
                small = width.minitron_prune(model, scores, target)
            else:
                small = width.flap_prune(copy.deepcopy(model).cpu(), ids, micro, device, target)
            small.to(device)
            loss = calib.lm_loss(small, ids, micro)
            report["candidates"].append({**target.describe(), "calibration_loss": loss, "selected": False})
            if loss < best_loss:
                best, best_loss, chosen = small, loss, report["candidates"][-1]
            small.to("cpu")
    chosen["selected"] = True
    return best


def print_report(report: dict[str, Any], console) -> None:
    """The terminal view of report.json."""
    from rich.table import Table

    before, after = report["architecture"]["before"], report["architecture"]["after"]
    t = Table(title=f"{report['method']}{' ' + report['pattern'] if report.get('pattern') else ''}: "
                    f"target {report['target_ratio']:.1%}, achieved {report['achieved_ratio']:.1%} "
                    f"({report['ratio_of']})")
    t.add_column("")
    t.add_column("parent", justify="right")
    t.add_column("pruned", justify="right")
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn"):
        t.add_row(key, str(before[key]), str(after[key]))
    p = report["parameters"]
    t.add_row("parameters", f"{p['before']['total']:,}", f"{p['after']['total']:,}")
    t.add_row("non-zero", f"{p['before']['nonzero']:,}", f"{p['after']['nonzero']:,}")
    cl = report["calibration_loss"]
    if cl["before"] is not None:
        t.add_row("calibration loss", f"{cl['before']:.4f}", f"{cl['after']:.4f}")
    if report.get("heldout"):
        h = report["heldout"]
        t.add_row("held-out perplexity", f"{h['perplexity_before']:.2f}", f"{h['perplexity_after']:.2f}")
    console.print(t)
    if report["candidates"]:
        c = Table(title="candidates")
        keys = [k for k in report["candidates"][0] if k != "selected"]
        for k in keys:
            c.add_column(k, justify="right")
        c.add_column("selected")
        for row in report["candidates"]:
            c.add_row(*[f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys],
                      "✓" if row["selected"] else "")
        console.print(c)
    ph = Table(title="phases")
    for col in ("phase", "seconds", "peak memory (MiB)"):
        ph.add_column(col, justify="right" if col != "phase" else "left")
    for row in report["phases"]:
        ph.add_row(row["phase"], f"{row['seconds']:.2f}", f"{row['peak_memory_mb']:.0f} {row['memory']}")
    console.print(ph)


def load_report(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "report.json").read_text())

"""Sheared LLaMA (eq. 6): hard-concrete masks over layers, KV groups, hidden and MLP channels, learned with
the weights under an augmented Lagrangian toward a target shape, then cut to exactly that shape.

Mask learning runs on the shared training loop (DeepSpeed, checkpoints, resume, preemption) through
`MaskObjective`; the dual variables (lambda, phi) rise by gradient *ascent* in proportion to the
violation, so the constraint tightens for as long as the expected shape misses the target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..schema import Strict
from ..train import Objective, TrainConfig
from . import budget
from .budget import ShapeTarget
from .context import Context, Pruned
from .surgery import Shape, cut

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import LlamaForCausalLM



class TargetShape(ShapeTarget):
    """One candidate of the search: hidden, heads and MLP named (Table 7); layers default to the parent's."""

    hidden: int = Field(ge=1)
    heads: int = Field(ge=1, description="query heads; a multiple of the parent's heads per KV group")
    ffn: int = Field(ge=1)


class ShearedConfig(Strict):
    targets: list[TargetShape] = Field(default_factory=list, description="candidates (Table 7); default: generated")
    train: TrainConfig = Field(description="the mask-learning budget: tokens, ranges, batch, ZeRO stage")
    mask_lr: float = Field(0.1, gt=0, description="learning rate of the mask log-alphas (AdamW)")
    dual_lr: float = Field(1.0, gt=0, description="ascent step of the multipliers per forward, times the violation")
    init_log_alpha: float = Field(3.0, description="masks start almost surely open")


class MaskObjective(Objective):
    """Mask learning for one target shape: LM loss + Lagrangian, masks and duals in their own groups."""

    def __init__(self, parent_dir, target: Shape, cfg: ShearedConfig) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.parent_dir, self.target, self.cfg = parent_dir, target, cfg
        self.tokenizer = AutoTokenizer.from_pretrained(parent_dir)

    def build(self, tokenizer, vocab_size: int, seed: int, zero3=None):
        import torch

        from .. import model as models
        from .hardconcrete import MaskedLlama

        llama = models.load(self.parent_dir, zero3)  # ZeRO-3: the parent read straight into partitions
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            masked = MaskedLlama(llama, self.target, self.cfg.init_log_alpha, self.cfg.dual_lr, seed)
        # The masks are read in MaskedLlama.forward, not by the ParameterDict that owns them: ZeRO-3 must
        # gather them around that forward (and its backward) when they are partitioned. A no-op on ZeRO 0-2.
        import deepspeed

        for param in masked.log_alpha.values():
            deepspeed.zero.register_external_parameter(masked, param)
        return masked

    def parameters(self, module) -> Any:
        return [
            {"params": list(module.llama.parameters())},
            {"params": list(module.log_alpha.parameters()), "lr": self.cfg.mask_lr, "weight_decay": 0.0},
        ]

    def loss(self, engine, x, step: int):
        lm, lagrangian = engine(input_ids=x, labels=x)
        return lm + lagrangian, {"loss": lm, "lagrangian": lagrangian}

    def metrics(self, module) -> dict[str, Any]:
        """Rank 0 alone calls this, so it cannot gather: masks that ZeRO-3 partitions are reported as the
        last forward saw them (before the optimizer's last step); whole ones as they are now."""
        import torch

        from ..zero3 import sliced

        if any(sliced(p) for p in module.log_alpha.values()):
            expected = module.last_expected
        else:
            with torch.no_grad():
                expected = module.expected()
        return _expected_metrics(expected)

    def language_model(self, module):
        return module.llama

    def root(self, built, cfg):
        return built  # MaskedLlama's forward returns its loss and the Lagrangian itself

    def final_state(self, state):
        return state  # the masks' log-alphas stay beside the weights: the cut reads both


def candidates(shape: Shape, cfg) -> list[Shape]:
    """The pinned shape, listed targets, or Table 7's procedure: two hidden sizes, query heads in steps of a KV
    group, MLP solved."""
    from ..errors import PrunectlError
    from .width import _spread, at_budget

    pinned = budget.pinned(cfg, shape)
    if pinned is not None:
        return [pinned]
    if cfg.sheared.targets:
        return [budget.resolve(t, shape, "prune.sheared.targets") for t in cfg.sheared.targets]
    quantum, (size, target) = cfg.search.quantum, budget.goal(cfg, shape)
    hiddens = sorted({quantum * round(shape.hidden * f / quantum) for f in (0.75, 0.85)})
    trials = (shape.with_(hidden=h, kv_heads=g, heads=g * shape.group)
              for h in hiddens for g in range(1, shape.kv_heads + 1))
    found = at_budget(trials, target, quantum, lambda s: quantum <= s.ffn <= shape.ffn
                      and abs(size(s) - target) <= 0.05 * size(shape), size)
    if not found:
        raise PrunectlError(f"prune.ratio: {cfg.ratio} is infeasible for sheared-llama on this parent without listed "
                            "targets; list prune.sheared.targets")
    return _spread(found, cfg.search.candidates)


def _expected_metrics(expected) -> dict[str, float]:
    from .hardconcrete import AXES

    return {f"expected_{a}": round(float(v), 4) for a, v in zip(AXES, expected.tolist())}


def to_dense(module, target: Shape, state: dict | None = None) -> LlamaForCausalLM:
    """Keep exactly the target's top units by log-alpha; fold the kept masks' deterministic values into
    the weights, so the dense model computes what the masked one did (up to the residual skip of a
    partly open layer, whose z multiplies the sublayer outputs here).

    Reads `state`, the MaskedLlama's full state dict (what fit() hands rank 0: under ZeRO-3 the module
    itself holds partitions), default module.state_dict(); nothing is changed in place."""
    import torch

    from .hardconcrete import AXES, sample

    state = module.state_dict() if state is None else state
    la = {a: state[f"log_alpha.{a}"].float() for a in AXES}
    weights = {k.removeprefix("llama."): v for k, v in state.items() if k.startswith("llama.")}
    p = module.parent
    with torch.no_grad():
        z = {a: sample(la[a], training=False) for a in AXES}
        layers = torch.topk(la["layers"], target.layers).indices.sort().values.tolist()
        hidden = torch.topk(la["hidden"], target.hidden).indices.sort().values
        groups = [torch.topk(la["kv_groups"][i], target.kv_heads).indices.sort().values for i in layers]
        ffn = [torch.topk(la["ffn"][i], target.ffn).indices.sort().values for i in layers]
        g, d = p.group, p.head_dim
        zh = z["hidden"]

        def scaled(name: str, by: torch.Tensor) -> None:
            weights[name] = weights[name] * by.to(weights[name].dtype)

        # The hidden mask scaled the embeddings and every sublayer's output, i.e. the whole residual
        # stream channel: folding it there reproduces the stream exactly (a tied lm_head is the scaled
        # embedding; kept channels' values are close to 1).
        scaled("model.embed_tokens.weight", zh[None, :])
        for i in layers:
            scale_heads = z["kv_groups"][i].repeat_interleave(g * d)
            scaled(f"model.layers.{i}.self_attn.o_proj.weight", zh[:, None] * z["layers"][i] * scale_heads[None, :])
            scaled(f"model.layers.{i}.mlp.down_proj.weight", zh[:, None] * z["layers"][i] * z["ffn"][i][None, :])
        return cut(module.llama, layers=layers, hidden=hidden, kv_groups=groups, ffn=ffn, state=weights)


def expected_of(state: dict) -> dict[str, float]:
    """The expected kept fraction along each axis, from a MaskedLlama's full state dict."""
    import torch

    from .hardconcrete import AXES, l0

    return _expected_metrics(torch.stack([l0(state[f"log_alpha.{a}"].float()).mean() for a in AXES]))


def feasible(cfg, shape: Shape) -> list[Shape]:
    return candidates(shape, cfg)


def _candidate_dirs(workdir: Path, cfg, shape: Shape) -> list[tuple[Path, Shape]]:
    targets = candidates(shape, cfg)
    return [(workdir / "sheared" / f"candidate{k}", t) for k, t in enumerate(targets)]


def _partitioned(module) -> dict[str, Any]:
    """What ZeRO-3 kept partitioned on this rank at the end of mask learning (a record: masks and weights)."""
    from ..zero3 import sliced
    from .hardconcrete import AXES

    weights = list(module.llama.parameters())
    return {"masks": [a for a in AXES if sliced(module.log_alpha[a])],
            "weights": sum(sliced(w) for w in weights), "of_weights": len(weights)}


def learn(run, cfg, optimizer, parent_dir: Path, data_ref: str, ids, micro: int) -> None:
    """Every rank: learn masks for each target shape (Table 7) on the shared training loop; each candidate's
    dense cut lands in <run>/sheared/candidateK/dense. A finished candidate is skipped, so a rerun resumes.
    Then every rank scores its share of the candidates on the calibration `ids` (sheared/scores.json)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import store
    from ..train import fit

    with torch.device("meta"):
        shape = Shape.of(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(parent_dir)))
    folders = _candidate_dirs(run.dir, cfg, shape)
    for folder, target in folders:
        if (folder / "dense").exists():
            continue
        objective = MaskObjective(parent_dir, target, cfg.sheared)
        result = fit(run, cfg.sheared.train, optimizer, objective, data_ref, workdir=folder)
        if result.rank == 0:
            # result.state: the full state on rank 0 (under ZeRO-3 consolidated from every rank's partitions,
            # masks and buffers included); the module itself is read for its config only.
            dense = to_dense(result.module, target, result.state)
            staging = folder / "dense.partial"
            shutil.rmtree(staging, ignore_errors=True)
            dense.save_pretrained(staging)
            objective.tokenizer.save_pretrained(staging)
            store.write_json(staging / "masks_summary.json", {"expected": expected_of(result.state),
                                                              "tokens": result.summary["tokens"],
                                                              "partitioned": _partitioned(result.module)})
            store.publish_dir(staging, folder / "dense")
        result.barrier()
        del result
    _score(run.dir, [folder for folder, _ in folders], ids, micro)


def _score(workdir: Path, folders: list[Path], ids, micro: int) -> None:
    """Every rank: the candidates' calibration losses, spread over the ranks (bf16 on GPU, fp32 on CPU), into
    sheared/scores.json; the parent is not loaded. Kept, so a rerun does not score again."""
    import torch
    from transformers import AutoModelForCausalLM

    from .. import distributed, store
    from .calibration import spread

    path = workdir / "sheared" / "scores.json"
    if path.exists():
        return
    env = distributed.init()
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32

    def load(k: int):
        print(f"scoring {folders[k].name} on rank {env.rank} ({str(dtype).removeprefix('torch.')})", flush=True)
        return AutoModelForCausalLM.from_pretrained(folders[k] / "dense", dtype=dtype, attn_implementation="sdpa").eval()

    losses = spread(load, len(folders), ids, micro, env.device, env.rank, env.world)
    if env.writer:
        store.write_json(path, {"candidates": [f.name for f in folders], "calibration_loss": losses,
                                "dtype": str(dtype).removeprefix("torch."), "ranks": env.world})
    env.barrier()


def apply(ctx: Context) -> Pruned:
    """The learned candidate with the lowest calibration loss (scored on every rank by learn()); only it is
    loaded. Every candidate is described in the report."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ctx.model.to("cpu")  # the parent is not needed any more: free the device for the chosen model
    scores = json.loads((ctx.workdir / "sheared" / "scores.json").read_text())
    losses = scores["calibration_loss"]
    best = min(range(len(losses)), key=losses.__getitem__)  # the first of equal losses, as select() chooses
    folders = [ctx.workdir / "sheared" / name for name in scores["candidates"]]
    for k, folder in enumerate(folders):
        info = json.loads((folder / "dense" / "masks_summary.json").read_text())
        ctx.report["candidates"].append({
            **Shape.of(AutoConfig.from_pretrained(folder / "dense")).describe(), "mask_tokens": info["tokens"],
            **info["expected"], "calibration_loss": losses[k], "selected": k == best})
    with ctx.meter.phase("load the chosen candidate"):
        model = AutoModelForCausalLM.from_pretrained(folders[best] / "dense", dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
    return Pruned(model)

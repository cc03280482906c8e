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
from .context import Context, Pruned
from .surgery import Shape, cut

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import LlamaForCausalLM



class TargetShape(Strict):
    layers: int | None = Field(None, ge=1, description="default: the parent's")
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

    def build(self, tokenizer, vocab_size: int, seed: int):
        import torch
        from transformers import AutoModelForCausalLM

        from .hardconcrete import MaskedLlama

        llama = AutoModelForCausalLM.from_pretrained(self.parent_dir, dtype=torch.float32, attn_implementation="sdpa")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MaskedLlama(llama, self.target, self.cfg.init_log_alpha, self.cfg.dual_lr, seed)

    def parameters(self, module) -> Any:
        return [
            {"params": list(module.llama.parameters())},
            {"params": list(module.log_alpha.parameters()), "lr": self.cfg.mask_lr, "weight_decay": 0.0},
        ]

    def loss(self, engine, x, step: int):
        lm, lagrangian = engine(input_ids=x, labels=x)
        return lm + lagrangian, {"loss": lm, "lagrangian": lagrangian}

    def metrics(self, module) -> dict[str, Any]:
        import torch

        from .hardconcrete import AXES

        with torch.no_grad():
            expected = module.expected().tolist()
        return {f"expected_{a}": round(v, 4) for a, v in zip(AXES, expected)}

    def language_model(self, module):
        return module.llama

    def root(self, built, cfg):
        return built  # MaskedLlama's forward returns its loss and the Lagrangian itself

    def final_state(self, state):
        return state  # the masks' log-alphas stay beside the weights: the cut reads both


def candidates(shape: Shape, ratio: float, targets: list[TargetShape], quantum: int, count: int) -> list[Shape]:
    """Listed targets, or Table 7's procedure: two hidden sizes, query heads in steps of a KV group, MLP solved."""
    from ..errors import PrunectlError
    from .width import _spread, at_budget

    def as_shape(t: TargetShape) -> Shape:
        if t.heads % shape.group:
            raise PrunectlError(f"prune.sheared.targets: heads={t.heads} is not a multiple of the parent's "
                                f"{shape.group} query heads per KV group (GQA must stay valid)")
        s = shape.with_(layers=t.layers or shape.layers, hidden=t.hidden, heads=t.heads, kv_heads=t.heads // shape.group,
                        ffn=t.ffn)
        if s.layers > shape.layers or s.hidden > shape.hidden or s.heads > shape.heads or s.ffn > shape.ffn:
            raise PrunectlError(f"prune.sheared.targets: {t.model_dump(exclude_none=True)} is larger than the parent "
                                f"along some axis ({shape.describe()})")
        return s

    if targets:
        return [as_shape(t) for t in targets]
    target = (1 - ratio) * shape.parameters()
    hiddens = sorted({quantum * round(shape.hidden * f / quantum) for f in (0.75, 0.85)})
    trials = (shape.with_(hidden=h, kv_heads=g, heads=g * shape.group)
              for h in hiddens for g in range(1, shape.kv_heads + 1))
    found = at_budget(trials, target, quantum, lambda s: quantum <= s.ffn <= shape.ffn
                      and abs(s.parameters() - target) <= 0.05 * shape.parameters())
    if not found:
        raise PrunectlError(f"prune.ratio: {ratio} is infeasible for sheared-llama on this parent without listed "
                            "targets; list prune.sheared.targets")
    return _spread(found, count)


def to_dense(module, target: Shape) -> LlamaForCausalLM:
    """Keep exactly the target's top units by log-alpha; fold the kept masks' deterministic values into
    the weights, so the dense model computes what the masked one did (up to the residual skip of a
    partly open layer, whose z multiplies the sublayer outputs here)."""
    import torch

    from .hardconcrete import AXES, sample

    la = module.log_alpha
    p = module.parent
    with torch.no_grad():
        z = {a: sample(la[a], training=False) for a in AXES}
        layers = torch.topk(la["layers"], target.layers).indices.sort().values.tolist()
        hidden = torch.topk(la["hidden"], target.hidden).indices.sort().values
        groups = [torch.topk(la["kv_groups"][i], target.kv_heads).indices.sort().values for i in layers]
        ffn = [torch.topk(la["ffn"][i], target.ffn).indices.sort().values for i in layers]
        llama = module.llama
        g, d = p.group, p.head_dim
        zh = z["hidden"]
        # The hidden mask scaled the embeddings and every sublayer's output, i.e. the whole residual
        # stream channel: folding it there reproduces the stream exactly (a tied lm_head also sees the
        # scaled embedding; kept channels' values are close to 1).
        llama.model.embed_tokens.weight.mul_(zh[None, :].to(llama.model.embed_tokens.weight.dtype))
        for i in layers:
            layer = llama.model.layers[i]
            o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
            scale_heads = z["kv_groups"][i].repeat_interleave(g * d)
            o.mul_((zh[:, None] * z["layers"][i] * scale_heads[None, :]).to(o.dtype))
            down.mul_((zh[:, None] * z["layers"][i] * z["ffn"][i][None, :]).to(down.dtype))
        return cut(llama, layers=layers, hidden=hidden, kv_groups=groups, ffn=ffn)


def feasible(cfg, shape: Shape) -> None:
    candidates(shape, cfg.ratio, cfg.sheared.targets, cfg.search.quantum, cfg.search.candidates)


def _candidate_dirs(workdir: Path, cfg, shape: Shape) -> list[tuple[Path, Shape]]:
    targets = candidates(shape, cfg.ratio, cfg.sheared.targets, cfg.search.quantum, cfg.search.candidates)
    return [(workdir / "sheared" / f"candidate{k}", t) for k, t in enumerate(targets)]


def learn(run, cfg, optimizer, parent_dir: Path, data_ref: str) -> None:
    """Every rank: learn masks for each target shape (Table 7) on the shared training loop; each candidate's
    dense cut lands in <run>/sheared/candidateK/dense. A finished candidate is skipped, so a rerun resumes."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import store
    from ..train import fit

    with torch.device("meta"):
        shape = Shape.of(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(parent_dir)))
    for folder, target in _candidate_dirs(run.dir, cfg, shape):
        if (folder / "dense").exists():
            continue
        objective = MaskObjective(parent_dir, target, cfg.sheared)
        result = fit(run, cfg.sheared.train, optimizer, objective, data_ref, workdir=folder)
        if result.rank == 0:
            dense = to_dense(result.module, target)
            staging = folder / "dense.partial"
            shutil.rmtree(staging, ignore_errors=True)
            dense.save_pretrained(staging)
            objective.tokenizer.save_pretrained(staging)
            store.write_json(staging / "masks_summary.json", {"expected": objective.metrics(result.module),
                                                              "tokens": result.summary["tokens"]})
            store.publish_dir(staging, folder / "dense")
        result.barrier()


def apply(ctx: Context) -> Pruned:
    """The learned candidates, each scored by calibration loss; the lowest one is the result."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from .calibration import select

    def learned():
        for folder in sorted((ctx.workdir / "sheared").glob("candidate*")):
            model = AutoModelForCausalLM.from_pretrained(folder / "dense", dtype=torch.float32,
                                                         attn_implementation="sdpa").eval()
            info = json.loads((folder / "dense" / "masks_summary.json").read_text())
            yield model, {**Shape.of(model).describe(), "mask_tokens": info["tokens"], **info["expected"]}

    with ctx.meter.phase("score learned candidates"):
        return Pruned(select(learned(), ctx.ids, ctx.micro, ctx.device, ctx.report["candidates"]))

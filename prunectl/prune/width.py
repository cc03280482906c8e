"""Width pruning: Minitron-width (eq. 4) and FLAP (eq. 5, with bias compensation), and their candidates.

Both keep the top-scoring units up to a target shape; the target is not unique for a parameter budget,
so candidates at the budget are enumerated (Tables 5 and 6) and each is pruned and scored by loss.
Both score from one pass over the unpruned parent (FLAP optionally reads the model pruned so far instead),
so each candidate is a cut of the parent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..errors import PrunectlError
from ..schema import Strict
from . import budget
from .context import Context, Pruned
from .calibration import Layerwise, batches, collect, select
from .surgery import Shape, cut

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM



def _spread(items: list, count: int) -> list:
    """At most `count` items, evenly spread (both ends included; a single pick is the middle one)."""
    if len(items) <= count:
        return items
    if count == 1:
        return [items[len(items) // 2]]
    picks = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in picks]


def _ffn_for(shape: Shape, target: float, quantum: int, size) -> int:
    """MLP width (a multiple of quantum) that brings `size(shape)` closest to `target` (size grows linearly with it)."""
    rest = size(shape.with_(ffn=0))
    per_channel = size(shape.with_(ffn=1)) - rest
    return max(quantum, quantum * round((target - rest) / per_channel / quantum))


def at_budget(trials, target: float, quantum: int, keep, size) -> list[Shape]:
    """Each trial shape with the MLP width that brings `size` closest to `target`, if `keep` accepts it."""
    sized = (trial.with_(ffn=_ffn_for(trial, target, quantum, size)) for trial in trials)
    return [s for s in sized if keep(s)]


def minitron_candidates(shape: Shape, cfg) -> list[Shape]:
    """The pinned shape, or (hidden, MLP) pairs at the target with 2h <= MLP <= 4h, heads unchanged (Table 5)."""
    pinned = budget.pinned(cfg, shape)
    if pinned is not None:
        return [pinned]
    quantum, (size, target) = cfg.search.quantum, budget.goal(cfg, shape)
    found = at_budget((shape.with_(hidden=h) for h in range(quantum, shape.hidden + 1, quantum)), target, quantum,
                      lambda s: 2 * s.hidden <= s.ffn <= 4 * s.hidden and s.ffn <= shape.ffn, size)
    if not found:
        raise PrunectlError(
            f"prune.ratio: {cfg.ratio} is infeasible for minitron-width on this parent: no hidden size (multiple of "
            f"{quantum}) and MLP size with 2h <= MLP <= 4h reach {target:,.0f} {budget.MEASURES[cfg.ratio_of]}"
        )
    return _spread(found, cfg.search.candidates)


def flap_candidates(shape: Shape, cfg) -> list[Shape]:
    """The pinned shape, or (KV groups, MLP) pairs at the target with the hidden size kept (Table 6); biases added."""
    biased = shape.with_(attention_bias=True, mlp_bias=True)
    pinned = budget.pinned(cfg, shape)
    if pinned is not None:
        return [pinned.with_(attention_bias=True, mlp_bias=True)]
    quantum, (size, target) = cfg.search.quantum, budget.goal(cfg, shape)
    trials = (biased.with_(kv_heads=g, heads=g * shape.group) for g in range(1, shape.kv_heads + 1))
    found = at_budget(trials, target, quantum,
                      lambda s: s.ffn <= shape.ffn and abs(size(s) - target) <= 0.05 * size(shape), size)
    if not found:
        raise PrunectlError(
            f"prune.ratio: {cfg.ratio} is infeasible for flap on this parent: no number of KV groups (1..{shape.kv_heads}) "
            f"with an MLP width up to {shape.ffn} reaches {target:,.0f} {budget.MEASURES[cfg.ratio_of]} within 5%"
        )
    return _spread(found, cfg.search.candidates)


# ------------------------------------------------------------------------------------------ Minitron-width


def minitron_scores(model: LlamaForCausalLM, ids: torch.Tensor, micro: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Activation L2 norms: hidden channels from every RMSNorm output feeding attention and MLP (summed
    over layers), MLP channels from each layer's down_proj input. One pass over the unpruned model's decoder
    (the LM head's logits are not needed)."""
    import torch

    layers = model.model.layers
    stats = []

    def run() -> None:
        with torch.inference_mode():
            for x in batches(ids, micro):
                model.model(input_ids=x.to(next(model.parameters()).device))

    handles, per_layer = [], []
    from .calibration import InputStats

    for layer in layers:
        s = {"attn": InputStats(), "mlp": InputStats(), "down": InputStats()}
        handles += [
            layer.self_attn.q_proj.register_forward_pre_hook(lambda _m, a, s=s["attn"]: s.add(a[0].detach())),
            layer.mlp.gate_proj.register_forward_pre_hook(lambda _m, a, s=s["mlp"]: s.add(a[0].detach())),
            layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, s=s["down"]: s.add(a[0].detach())),
        ]
        per_layer.append(s)
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    hidden = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for s in per_layer:
        hidden += s["attn"].sumsq.cpu() + s["mlp"].sumsq.cpu()
        stats.append(s["down"].norm.cpu())
    return hidden.sqrt().float(), stats


def minitron_prune(model: LlamaForCausalLM, scores, target: Shape) -> LlamaForCausalLM:
    import torch

    hidden_scores, ffn_scores = scores
    hidden = torch.topk(hidden_scores, target.hidden).indices.sort().values
    ffn = [torch.topk(s, target.ffn).indices.sort().values for s in ffn_scores]
    return cut(model, hidden=hidden, ffn=ffn)


# ------------------------------------------------------------------------------------------ FLAP


class FlapConfig(Strict):
    statistics: Literal["parent", "sequential"] = Field(
        "parent", description="whose activations score every layer: the unpruned parent's (one pass, as FLAP's "
        "reference code does) or, for layer i, the outputs of layers < i already pruned to the candidate's shape")


# FLAP's reference code squares the attention channel scores before summing them per head; a KV group
# adds up its query heads, so its score is the sum of its channels' squared scores.
KV_GROUP_SCORE = "sum of squared channel scores"


@dataclass
class _OnDevice:
    def to(self, device) -> _OnDevice:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class FlapScores(_OnDevice):
    """What FLAP reads from one decoder layer's calibration inputs."""

    groups: torch.Tensor  # per KV group
    ffn: torch.Tensor  # per MLP channel
    o_mean: torch.Tensor  # mean input of o_proj, per channel (the bias compensation's baseline)
    down_mean: torch.Tensor  # mean input of down_proj


@dataclass
class FlapChoice(_OnDevice):
    """One layer cut to a target shape: the kept units and the biases that stand in for the removed ones."""

    groups: torch.Tensor
    ffn: torch.Tensor
    o_bias: torch.Tensor
    down_bias: torch.Tensor


def _fluctuation(stats, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 5 per input channel: the channel's variance times its weight column's squared norm."""
    return stats.variance.to(weight.device) * weight.float().square().sum(0)


def _score(layer, stats: dict, shape: Shape) -> FlapScores:
    o_in, down_in = stats["self_attn.o_proj"], stats["mlp.down_proj"]
    channels = _fluctuation(o_in, layer.self_attn.o_proj.weight)
    return FlapScores(groups=channels.square().view(shape.kv_heads, -1).sum(1),
                      ffn=_fluctuation(down_in, layer.mlp.down_proj.weight), o_mean=o_in.mean, down_mean=down_in.mean)


def _dropped(groups: torch.Tensor, ffn: torch.Tensor, shape: Shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the removed inputs of o_proj (the dropped groups' query-head channels) and of down_proj."""
    import torch

    width = shape.group * shape.head_dim
    kept_cols = (groups[:, None] * width + torch.arange(width, device=groups.device)).reshape(-1)
    drop_o = torch.ones(shape.heads * shape.head_dim, dtype=torch.bool, device=device)
    drop_o[kept_cols.to(device)] = False
    drop_f = torch.ones(shape.ffn, dtype=torch.bool, device=device)
    drop_f[ffn.to(device)] = False
    return drop_o, drop_f


def _choose(layer, scores: FlapScores, shape: Shape, target: Shape) -> FlapChoice:
    """The top-scoring units up to `target`, and FLAP's bias compensation: the removed inputs' calibration
    mean times their weight columns."""
    import torch

    groups = torch.topk(scores.groups, target.kv_heads).indices.sort().values
    ffn = torch.topk(scores.ffn, target.ffn).indices.sort().values
    w_o, w_down = layer.self_attn.o_proj.weight.float(), layer.mlp.down_proj.weight.float()
    drop_o, drop_f = _dropped(groups, ffn, shape, w_o.device)
    return FlapChoice(groups, ffn, o_bias=w_o[:, drop_o] @ scores.o_mean.to(w_o.device)[drop_o],
                      down_bias=w_down[:, drop_f] @ scores.down_mean.to(w_down.device)[drop_f])


def _as_cut(layer, choice: FlapChoice, shape: Shape):
    """A copy of one decoder layer that computes what its cut will: removed inputs of o_proj and down_proj
    zeroed, their compensation added to the biases. The parent's own layer stays as it was."""
    import copy

    import torch

    pruned = copy.deepcopy(layer)
    drop_o, drop_f = _dropped(choice.groups, choice.ffn, shape, layer.self_attn.o_proj.weight.device)
    with torch.no_grad():
        for lin, drop, b in ((pruned.self_attn.o_proj, drop_o, choice.o_bias), (pruned.mlp.down_proj, drop_f, choice.down_bias)):
            lin.weight[:, drop] = 0
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(b.to(lin.weight.dtype))
            else:
                lin.bias.add_(b.to(lin.bias.dtype))
    return pruned


def flap_scores(model: LlamaForCausalLM, walk: Layerwise) -> list[FlapScores]:
    """Every layer's scores from the unpruned parent's activations: one layer-wise pass (statistics: parent)."""
    shape = Shape.of(model)
    scores = []
    for layer in model.model.layers:
        layer.to(walk.device)
        # the parent's own outputs feed the next layer: one forward per layer collects and moves on
        stats = collect(layer, lambda: walk.forward(layer, update=True), moments=True)
        scores.append(_score(layer, stats, shape).to("cpu"))
        layer.to("cpu")
    return scores


def flap_cut(model: LlamaForCausalLM, choices: list[FlapChoice]) -> LlamaForCausalLM:
    """The parent cut to the chosen units, the compensation added to o_proj's and down_proj's biases;
    the parent is not changed."""
    state = dict(model.state_dict())  # the parent's tensors themselves; only the biases are new
    for i, c in enumerate(choices):
        for name, b in (("self_attn.o_proj", c.o_bias), ("mlp.down_proj", c.down_bias)):
            key, weight = f"model.layers.{i}.{name}.bias", state[f"model.layers.{i}.{name}.weight"]
            b = b.to(weight.device, weight.dtype)
            state[key] = b if key not in state else state[key] + b
    return cut(model, kv_groups=[c.groups.cpu() for c in choices], ffn=[c.ffn.cpu() for c in choices], biases=True,
               state=state)


def flap_from_scores(model: LlamaForCausalLM, scores: list[FlapScores], target: Shape) -> LlamaForCausalLM:
    """statistics: parent. One target's cut from the scores flap_scores() took once for every candidate."""
    shape = Shape.of(model)
    return flap_cut(model, [_choose(layer, s, shape, target) for layer, s in zip(model.model.layers, scores)])


def flap_sequential(model: LlamaForCausalLM, walk: Layerwise, target: Shape) -> LlamaForCausalLM:
    """statistics: sequential. Layer i is scored on the outputs of layers < i as pruned for `target`, so every
    target needs its own pass (a fresh `walk`); each layer's pruned stand-in is a copy of that layer alone."""
    shape = Shape.of(model)
    choices = []
    for layer in model.model.layers:
        layer.to(walk.device)
        stats = collect(layer, lambda: walk.forward(layer, update=False), moments=True)
        choice = _choose(layer, _score(layer, stats, shape), shape, target)
        walk.forward(_as_cut(layer, choice, shape), update=True)
        choices.append(choice.to("cpu"))
        layer.to("cpu")
    return flap_cut(model, choices)


def flap_prune(model: LlamaForCausalLM, ids: torch.Tensor, micro: int, device, target: Shape,
               statistics: str = "parent") -> LlamaForCausalLM:
    """FLAP to one target shape: fluctuation scores for KV groups (at o_proj's input) and MLP channels
    (at down_proj's input), the removed units' mean contribution folded into the biases. `model` is left as it was."""
    with Layerwise(model, ids, micro, device) as walk:
        if statistics == "sequential":
            return flap_sequential(model, walk, target)
        return flap_from_scores(model, flap_scores(model, walk), target)


def minitron_feasible(cfg, shape: Shape) -> list[Shape]:
    return minitron_candidates(shape, cfg)


def flap_feasible(cfg, shape: Shape) -> list[Shape]:
    return flap_candidates(shape, cfg)


def apply_minitron(ctx: Context) -> Pruned:
    """Minitron-width: activation importance once, then every candidate shape cut from it (Table 5). The cuts
    are made on the host, from the parent moved back there, and select() puts one candidate at a time on the
    device: device memory holds the parent or one candidate, never both."""

    candidates = minitron_candidates(ctx.shape, ctx.cfg)
    with ctx.meter.phase("score channels"):
        scores = minitron_scores(ctx.model, ctx.ids, ctx.micro)
    ctx.model.to("cpu")
    with ctx.meter.phase(f"search {len(candidates)} candidate(s)"):
        made = ((minitron_prune(ctx.model, scores, t), t.describe()) for t in candidates)
        return Pruned(select(made, ctx.ids, ctx.micro, ctx.device, ctx.report["candidates"]))


def apply_flap(ctx: Context) -> Pruned:
    """FLAP: fluctuation scores and bias compensation per candidate shape (Table 6). With the parent's
    statistics one pass scores every layer and each candidate is a cut of the parent; no copy of the parent."""
    statistics = ctx.cfg.flap.statistics
    ctx.report["flap"] = {"statistics": statistics, "kv_group_score": KV_GROUP_SCORE}
    candidates = flap_candidates(ctx.shape, ctx.cfg)
    if statistics == "parent":
        with ctx.meter.phase("score channels"), ctx.layerwise() as walk:
            scores = flap_scores(ctx.model, walk)
        make = lambda target: flap_from_scores(ctx.model, scores, target)  # noqa: E731
    else:
        def make(target: Shape) -> LlamaForCausalLM:
            with ctx.layerwise() as walk:  # each candidate's own pass, spilling past calibration.memory_gb
                return flap_sequential(ctx.model, walk, target)
    with ctx.meter.phase(f"search {len(candidates)} candidate(s)"):
        made = ((make(t), t.describe()) for t in candidates)
        return Pruned(select(made, ctx.ids, ctx.micro, ctx.device, ctx.report["candidates"]))

"""Width pruning: Minitron-width (eq. 4) and FLAP (eq. 5, with bias compensation), and their candidates.

Both keep the top-scoring units up to a target shape; the target is not unique for a parameter budget,
so candidates at the budget are enumerated (Tables 5 and 6) and each is pruned and scored by loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import PrunectlError
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


def _ffn_for(shape: Shape, target: float, quantum: int) -> int:
    """MLP width (a multiple of quantum) that brings `shape` closest to `target` parameters."""
    per_channel = shape.layers * (3 * shape.hidden + (2 if shape.mlp_bias else 0))
    rest = shape.with_(ffn=0).parameters()
    return max(quantum, quantum * round((target - rest) / per_channel / quantum))


def at_budget(trials, target: float, quantum: int, keep) -> list[Shape]:
    """Each trial shape with the MLP width that brings it closest to `target` parameters, if `keep` accepts it."""
    sized = (trial.with_(ffn=_ffn_for(trial, target, quantum)) for trial in trials)
    return [s for s in sized if keep(s)]


def minitron_candidates(shape: Shape, ratio: float, quantum: int, count: int) -> list[Shape]:
    """(hidden, MLP) pairs at the target with 2h <= MLP <= 4h, heads unchanged (Table 5)."""
    target = (1 - ratio) * shape.parameters()
    found = at_budget((shape.with_(hidden=h) for h in range(quantum, shape.hidden + 1, quantum)), target, quantum,
                      lambda s: 2 * s.hidden <= s.ffn <= 4 * s.hidden and s.ffn <= shape.ffn)
    if not found:
        raise PrunectlError(
            f"prune.ratio: {ratio} is infeasible for minitron-width on this parent: no hidden size (multiple of "
            f"{quantum}) and MLP size with 2h <= MLP <= 4h reach {target:,.0f} parameters"
        )
    return _spread(found, count)


def flap_candidates(shape: Shape, ratio: float, quantum: int, count: int) -> list[Shape]:
    """(KV groups, MLP) pairs at the target with the hidden size kept (Table 6); biases added."""
    target = (1 - ratio) * shape.parameters()
    biased = shape.with_(attention_bias=True, mlp_bias=True)
    trials = (biased.with_(kv_heads=g, heads=g * shape.group) for g in range(1, shape.kv_heads + 1))
    found = at_budget(trials, target, quantum,
                      lambda s: s.ffn <= shape.ffn and abs(s.parameters() - target) <= 0.05 * shape.parameters())
    if not found:
        raise PrunectlError(
            f"prune.ratio: {ratio} is infeasible for flap on this parent: no number of KV groups (1..{shape.kv_heads}) "
            f"with an MLP width up to {shape.ffn} reaches {target:,.0f} parameters within 5%"
        )
    return _spread(found, count)


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


def flap_prune(model: LlamaForCausalLM, ids: torch.Tensor, micro: int, device, target: Shape) -> LlamaForCausalLM:
    """Prunes `model` in place on the way (pass a copy to keep the parent). Layer by layer on the pruned model's own activations: fluctuation scores for KV groups (summed over
    the group's query-head channels at o_proj's input) and MLP channels (at down_proj's input); removed
    units' mean contribution is folded into the o_proj / down_proj biases."""
    import torch

    shape = Shape.of(model)
    d, g = shape.head_dim, shape.group
    walk = Layerwise(model, ids, micro, device)
    keep_groups, keep_ffn = [], []
    for i, layer in walk.each_layer():
        stats = collect(layer, lambda: walk.forward(layer, update=False), moments=True)
        o_in, down_in = stats["self_attn.o_proj"], stats["mlp.down_proj"]
        w_o, w_down = layer.self_attn.o_proj.weight.float(), layer.mlp.down_proj.weight.float()
        head_score = (o_in.variance.to(w_o.device) * w_o.square().sum(0)).view(shape.kv_heads, g * d).sum(1)
        ffn_score = down_in.variance.to(w_down.device) * w_down.square().sum(0)
        groups = torch.topk(head_score, target.kv_heads).indices.sort().values
        ffn = torch.topk(ffn_score, target.ffn).indices.sort().values
        # bias compensation: the removed units' expected input times their weight columns
        kept_cols = (groups[:, None] * (g * d) + torch.arange(g * d, device=groups.device)).reshape(-1)
        drop_o = torch.ones(shape.heads * d, dtype=torch.bool, device=w_o.device)
        drop_o[kept_cols] = False
        drop_f = torch.ones(shape.ffn, dtype=torch.bool, device=w_down.device)
        drop_f[ffn] = False
        b_o = w_o[:, drop_o] @ o_in.mean.to(w_o.device)[drop_o]
        b_f = w_down[:, drop_f] @ down_in.mean.to(w_down.device)[drop_f]
        # prune this layer in place before its outputs feed the next one
        with torch.no_grad():
            layer.self_attn.o_proj.weight[:, drop_o] = 0
            layer.mlp.down_proj.weight[:, drop_f] = 0
            for lin, b in ((layer.self_attn.o_proj, b_o), (layer.mlp.down_proj, b_f)):
                if lin.bias is None:
                    lin.bias = torch.nn.Parameter(b.to(lin.weight.dtype))
                else:
                    lin.bias.add_(b.to(lin.bias.dtype))
        keep_groups.append(groups.cpu())
        keep_ffn.append(ffn.cpu())
    # the Linears now carry their compensated biases; cut() copies them into the smaller dense model
    return cut(model, kv_groups=keep_groups, ffn=keep_ffn, biases=True)


def minitron_feasible(cfg, shape: Shape) -> None:
    minitron_candidates(shape, cfg.ratio, cfg.search.quantum, cfg.search.candidates)


def flap_feasible(cfg, shape: Shape) -> None:
    flap_candidates(shape, cfg.ratio, cfg.search.quantum, cfg.search.candidates)


def apply_minitron(ctx: Context) -> Pruned:
    """Minitron-width: activation importance once, then every candidate shape cut from it (Table 5). The cuts
    are made on the host, from the parent moved back there, and select() puts one candidate at a time on the
    device: device memory holds the parent or one candidate, never both."""

    candidates = minitron_candidates(ctx.shape, ctx.cfg.ratio, ctx.cfg.search.quantum, ctx.cfg.search.candidates)
    with ctx.meter.phase("score channels"):
        scores = minitron_scores(ctx.model, ctx.ids, ctx.micro)
    ctx.model.to("cpu")
    with ctx.meter.phase(f"search {len(candidates)} candidate(s)"):
        made = ((minitron_prune(ctx.model, scores, t), t.describe()) for t in candidates)
        return Pruned(select(made, ctx.ids, ctx.micro, ctx.device, ctx.report["candidates"]))


def apply_flap(ctx: Context) -> Pruned:
    """FLAP: fluctuation scores and bias compensation per candidate shape (Table 6)."""
    import copy


    candidates = flap_candidates(ctx.shape, ctx.cfg.ratio, ctx.cfg.search.quantum, ctx.cfg.search.candidates)
    with ctx.meter.phase(f"search {len(candidates)} candidate(s)"):
        made = ((flap_prune(copy.deepcopy(ctx.model).cpu(), ctx.ids, ctx.micro, ctx.device, t), t.describe())
                for t in candidates)
        return Pruned(select(made, ctx.ids, ctx.micro, ctx.device, ctx.report["candidates"]))

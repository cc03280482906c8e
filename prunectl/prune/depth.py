"""Depth pruning: Minitron-depth (eq. 3, a contiguous block by calibration loss) and ShortGPT (block influence)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import PrunectlError
from . import budget
from .context import Context, Pruned
from .calibration import batches
from .surgery import Shape, cut

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM



def kept_layers(shape: Shape, cfg) -> int:
    """The pinned layer count, or the one whose size on the ratio's basis comes closest to (1 - ratio) of the
    parent's (at least one)."""
    pinned = budget.pinned(cfg, shape)
    if pinned is not None:
        return pinned.layers
    ratio = cfg.ratio
    size, target = budget.goal(cfg, shape)
    if target < size(shape.with_(layers=0)):  # the embeddings alone, when the basis is total parameters
        floor = 1 - shape.with_(layers=1).parameters() / shape.parameters()
        raise PrunectlError(
            f"prune.ratio: {ratio} is infeasible for depth pruning: embeddings alone are "
            f"{shape.embedding() / shape.parameters():.1%} of the parent; one layer left removes {floor:.1%}"
        )
    kept = min(range(1, shape.layers + 1), key=lambda k: abs(size(shape.with_(layers=k)) - target))
    if kept == shape.layers:
        raise PrunectlError(f"prune.ratio: {ratio} removes less than one of {shape.layers} layers; raise it")
    return kept


def _tail_loss(model: LlamaForCausalLM, h: torch.Tensor, x: torch.Tensor, start: int, pos) -> torch.Tensor:
    """Summed next-token loss of hidden state `h` run through layers[start:] and the head (chunked logits)."""
    from ..loss import summed_next_token_loss
    from .calibration import LOSS_CHUNK_TOKENS

    for layer in model.model.layers[start:]:
        h = layer(h, attention_mask=None, position_ids=pos[0], position_embeddings=pos[1])
        h = h[0] if isinstance(h, tuple) else h
    return summed_next_token_loss(model.lm_head, model.model.norm(h), x, LOSS_CHUNK_TOKENS)


def block_losses(model: LlamaForCausalLM, ids: torch.Tensor, micro: int, block: int) -> list[float]:
    """Calibration loss with layers [i, i+block) replaced by identity, for every start i.

    One prefix pass per batch: the state entering layer i is reused for the candidate that skips
    [i, i+block), so the cost is one forward per candidate tail rather than per whole model.
    """
    import torch

    n_layers = model.config.num_hidden_layers
    starts = range(0, n_layers - block + 1)
    sums = [0.0 for _ in starts]
    count = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for x in batches(ids, micro):
            x = x.to(device)
            h = model.model.embed_tokens(x)
            positions = torch.arange(x.shape[1], device=device)[None]
            pos = (positions, model.model.rotary_emb(h, positions))
            for i in starts:
                sums[i] += float(_tail_loss(model, h, x, i + block, pos))
                out = model.model.layers[i](h, attention_mask=None, position_ids=positions, position_embeddings=pos[1])
                h = out[0] if isinstance(out, tuple) else out
            count += x.numel() - x.shape[0]
    return [s / count for s in sums]


def block_influence(model: LlamaForCausalLM, ids: torch.Tensor, micro: int) -> list[float]:
    """ShortGPT's BI_i = 1 - E_t cos(h_i,t, h_i+1,t): how much layer i changes its input."""
    import torch
    import torch.nn.functional as F

    n_layers = model.config.num_hidden_layers
    sums = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for x in batches(ids, micro):
            states = model.model(input_ids=x.to(device), output_hidden_states=True).hidden_states  # no logits
            # hidden_states[i] enters layer i; the last entry is after the final norm, so stop before it
            for i in range(n_layers - 1):
                sums[i] += (1 - F.cosine_similarity(states[i].float(), states[i + 1].float(), dim=-1)).sum().double().cpu()
            last = model.model.layers[-1]
            pos = torch.arange(x.shape[1], device=device)[None]
            out = last(states[n_layers - 1], attention_mask=None, position_ids=pos,
                       position_embeddings=model.model.rotary_emb(states[n_layers - 1], pos))
            out = out[0] if isinstance(out, tuple) else out
            sums[-1] += (1 - F.cosine_similarity(states[n_layers - 1].float(), out.float(), dim=-1)).sum().double().cpu()
            count += x.numel()
    return (sums / count).tolist()


def feasible(cfg, shape: Shape) -> list[Shape]:
    return [shape.with_(layers=kept_layers(shape, cfg))]


def apply_minitron(ctx: Context) -> Pruned:
    """Minitron-depth: remove the contiguous block whose removal costs the least calibration loss."""
    block = ctx.shape.layers - kept_layers(ctx.shape, ctx.cfg)
    with ctx.meter.phase("score layers"):
        losses = block_losses(ctx.model, ctx.ids, ctx.micro, block)
        start = min(range(len(losses)), key=losses.__getitem__)
        ctx.report["candidates"] = [{"remove": [i, i + block - 1], "calibration_loss": loss, "selected": i == start}
                                    for i, loss in enumerate(losses)]
    return _remove(ctx, list(range(start, start + block)))


def apply_shortgpt(ctx: Context) -> Pruned:
    """ShortGPT: remove the layers of lowest Block Influence, wherever they are."""
    block = ctx.shape.layers - kept_layers(ctx.shape, ctx.cfg)
    with ctx.meter.phase("score layers"):
        influence = block_influence(ctx.model, ctx.ids, ctx.micro)
        ctx.report["block_influence"] = influence
    return _remove(ctx, sorted(sorted(range(ctx.shape.layers), key=influence.__getitem__)[:block]))


def _remove(ctx: Context, removed: list[int]) -> Pruned:
    ctx.report["removed_layers"] = removed
    ctx.model.to("cpu")  # cut on the host: the kept layers' copies never sit on the device beside the parent
    with ctx.meter.phase("cut"):
        return Pruned(cut(ctx.model, layers=[i for i in range(ctx.shape.layers) if i not in removed]))

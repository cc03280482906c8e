"""Sparse methods: magnitude, Wanda (eq. 7) and SparseGPT (eq. 8), unstructured or N:M.

Every decoder Linear loses the same fraction of its weights; the shape stays and the zeros are recorded
as boolean keep-masks (True = weight kept) that retraining holds fixed.
"""

from __future__ import annotations

import re

from typing import TYPE_CHECKING

from pydantic import Field

from ..errors import PrunectlError
from ..schema import Strict
from .context import Context, Pruned

if TYPE_CHECKING:
    import torch

    from .surgery import Shape


class SparseGPTConfig(Strict):
    block_size: int = Field(128, ge=1, description="columns pruned and compensated together")
    dampening: float = Field(0.01, gt=0, description="added to the Hessian diagonal, as a fraction of its mean")


PATTERN = re.compile(r"(?:(keep|prune) (\d+) of (\d+)|(\d+):(\d+))")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; otherwise (weights kept, group size).

    prunectl's N:M keeps N of every M weights (NVIDIA's sparse tensor cores); the Wanda and SparseGPT code's
    flags count the weights pruned instead. The two readings agree only when N is half of M (2:4, 4:8), so any
    other N:M is refused unless written as `keep N of M` or `prune N of M`."""
    if pattern == "unstructured":
        return None
    found = PATTERN.fullmatch(pattern.strip())
    if not found:
        raise ValueError(f"'{pattern}' is not 'unstructured', N:M such as 2:4, or 'keep N of M' / 'prune N of M'")
    verb, n, m = (found[1], found[2], found[3]) if found[1] else (None, found[4], found[5])
    n, m = int(n), int(m)
    if not 0 < n < m:
        raise ValueError(f"'{pattern}': N of M needs 0 < N < M (e.g. 2:4)")
    if verb is None and 2 * n != m:
        raise ValueError(f"'{pattern}' reads as keep {n} of {m} (NVIDIA) or prune {n} of {m} (the Wanda and "
                         f"SparseGPT code); write 'keep {n} of {m}' or 'prune {n} of {m}'")
    return (m - n, m) if verb == "prune" else (n, m)


def describe_pattern(pattern: str) -> str:
    """The pattern with the convention it was read in: '2:4 (keep 2 of every 4)'."""
    nm = parse_pattern(pattern)
    return pattern if nm is None else f"{pattern} (keep {nm[0]} of every {nm[1]})"


def keep_top_per_row(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask with exactly round(ratio * cols) lowest-scoring weights removed from every row."""
    import torch

    cols = score.shape[1]
    drop = int(round(ratio * cols))
    mask = torch.ones_like(score, dtype=torch.bool)
    if drop:
        mask.scatter_(1, torch.topk(score, drop, dim=1, largest=False).indices, False)
    return mask


def keep_top_per_matrix(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask with exactly round(ratio * numel) lowest-scoring weights removed from the matrix."""
    import torch

    drop = int(round(ratio * score.numel()))
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if drop:
        mask[torch.topk(score.flatten(), drop, largest=False).indices] = False
    return mask.view_as(score)


def keep_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the n best of every m consecutive inputs of each row, in one vectorised top-k."""
    import torch

    rows, cols = score.shape
    if cols % m:
        raise PrunectlError(f"N:M sparsity {n}:{m} needs input widths divisible by {m}; a Linear has {cols}")
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, ratio: float, nm: tuple[int, int] | None) -> torch.Tensor:
    score = weight.abs()
    return keep_n_of_m(score, *nm) if nm else keep_top_per_matrix(score, ratio)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, ratio: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """|W_ij| * ||X_j||, compared within each output row."""
    score = weight.abs().float() * input_norm[None, :].float()  # fp32: a bf16 product would tie and misorder
    return keep_n_of_m(score, *nm) if nm else keep_top_per_row(score, ratio)


def sparsegpt_(weight: torch.Tensor, xtx: torch.Tensor, samples: int, ratio: float, nm: tuple[int, int] | None,
               cfg: SparseGPTConfig, name: str) -> torch.Tensor:
    """Prune `weight` in place by OBS reconstruction (eq. 8); returns the keep-mask.

    Columns are processed in blocks; within a block each pruned weight's error is pushed onto the
    not-yet-processed columns through the inverse Hessian's Cholesky factor. Unstructured masks are
    chosen per block by w^2 / [H^-1]_jj^2 with counts that add up to exactly ratio * numel per Linear.
    Everything runs in fp32 without TF32, whatever the weight's dtype.
    """
    from ..distributed import exact_fp32

    with exact_fp32():
        return _sparsegpt(weight, xtx, samples, ratio, nm, cfg, name)


def _sparsegpt(weight: torch.Tensor, xtx: torch.Tensor, samples: int, ratio: float, nm: tuple[int, int] | None,
               cfg: SparseGPTConfig, name: str) -> torch.Tensor:
    import torch

    w = weight.data.float().clone()  # the OBS updates run in fp32 whatever the model's dtype; cast back once at the end
    rows, cols = w.shape
    h = (2.0 / samples) * xtx.to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += cfg.dampening * torch.mean(torch.diag(h)) * torch.eye(cols, device=w.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise PrunectlError(
            f"sparsegpt: the Hessian of {name} is not positive definite with dampening {cfg.dampening}; "
            "raise prune.sparsegpt.dampening (e.g. 0.05) or calibration.samples"
        ) from None
    if nm and cfg.block_size % nm[1]:
        raise PrunectlError(f"prune.sparsegpt.block_size: {cfg.block_size} must be a multiple of M={nm[1]}")

    keep = torch.ones_like(w, dtype=torch.bool)
    dropped_so_far = 0
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm is None:
            # cumulative rounding: block counts add up to exactly round(ratio * rows * cols)
            target = int(round(ratio * rows * i2)) - dropped_so_far
            keep1 = keep_top_per_matrix(w1.square() / d[None, :].square(), target / w1.numel())
            dropped_so_far += target
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(count):
            col = w1[:, i]
            if nm is not None and i % nm[1] == 0:
                group = w1[:, i : i + nm[1]].square() / d[None, i : i + nm[1]].square()
                keep1[:, i : i + nm[1]] = keep_n_of_m(group, *nm)
            q = col * keep1[:, i]
            q1[:, i] = q
            e = (col - q) / d[i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = q1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    weight.data.copy_((w * keep).to(weight.dtype))
    return keep


def feasible(cfg, shape: Shape) -> list[Shape]:
    """N:M needs every Linear's input width divisible by M; unstructured sparsity fits any shape (kept as it is)."""
    nm = parse_pattern(cfg.pattern)
    if nm:
        widths = {"hidden": shape.hidden, "attention": shape.heads * shape.head_dim, "ffn": shape.ffn}
        bad = [f"{k} {v}" for k, v in widths.items() if v % nm[1]]
        if bad:
            raise PrunectlError(f"prune.pattern: {cfg.pattern} needs every Linear input width divisible by {nm[1]}; "
                                f"this parent has {', '.join(bad)}")
    return [shape]


def apply_magnitude(ctx: Context) -> Pruned:
    """|W| per matrix (or N:M), no data."""
    from . import calibration as calib

    nm, masks = parse_pattern(ctx.cfg.pattern), {}
    with ctx.meter.phase("prune"):
        for i, layer in enumerate(ctx.model.model.layers):
            for name in calib.LINEARS:
                lin = layer.get_submodule(name)
                keep = magnitude_mask(lin.weight.data, ctx.cfg.ratio, nm)
                lin.weight.data.mul_(keep)
                masks[f"model.layers.{i}.{name}.weight"] = keep.cpu()
    return Pruned(ctx.model, masks)


def apply_wanda(ctx: Context) -> Pruned:
    """|W| x ||X||, compared per output row (or N:M), layer by layer on the pruned model's activations."""

    def prune(lin, stats, name: str):
        keep = wanda_mask(lin.weight.data, stats.norm.to(lin.weight.device), ctx.cfg.ratio, parse_pattern(ctx.cfg.pattern))
        lin.weight.data.mul_(keep)
        return keep

    return _layerwise(ctx, prune, gram=False)


def apply_sparsegpt(ctx: Context) -> Pruned:
    """OBS-style pruning with weight reconstruction from X^T X, layer by layer."""

    def prune(lin, stats, name: str):
        return sparsegpt_(lin.weight, stats.xtx, stats.n, ctx.cfg.ratio, parse_pattern(ctx.cfg.pattern),
                          ctx.cfg.sparsegpt, name)

    return _layerwise(ctx, prune, gram=True)


def _layerwise(ctx: Context, prune, gram: bool) -> Pruned:
    from . import calibration as calib

    masks = {}
    with ctx.meter.phase("prune (sequential)"), ctx.layerwise() as walk:
        ctx.report["calibration_memory"] = walk.hidden.describe()
        for i, layer in walk.each_layer():
            stats = calib.collect(layer, lambda: walk.forward(layer, update=False), gram=gram)
            for name in calib.LINEARS:
                keep = prune(layer.get_submodule(name), stats[name], f"model.layers.{i}.{name}")
                masks[f"model.layers.{i}.{name}.weight"] = keep.cpu()
    return Pruned(ctx.model, masks)

"""The calibration engine: calibration batches, losses, and a layer-by-layer pass with shared statistics.

Sequential methods see each decoder layer alone: its inputs are the *pruned* previous layer's outputs,
only that layer sits on the accelerator, and Linears that read the same input (q/k/v, gate/up) share
one accumulation of statistics instead of one each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from ..errors import PrunectlError
from ..schema import Strict

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

    from ..data import TokenStream


class CalibrationConfig(Strict):
    data: str | None = Field(None, description="prepared data run; default: the prune recipe's data")
    range: str = Field("calibration", description="token range to draw from; never one that evaluation reads")
    samples: int = Field(128, ge=1)
    seq_len: int = Field(8192, ge=8)
    micro_batch: int = Field(8, ge=1, description="sequences per forward pass")
    seed: int = Field(0, ge=0)
    memory_gb: float | None = Field(
        None, gt=0, description="host memory for the layer-wise pass's hidden states (Wanda, SparseGPT); beyond it "
        "they spill to a file in the run directory. Default: half of what the job may still use once the parent "
        "is loaded (Slurm's launch.mem_gb for the node, or the machine's available memory outside Slurm)")


def sample(stream: TokenStream, cfg: CalibrationConfig, where: str) -> torch.Tensor:
    """`samples` disjoint windows of `seq_len` tokens, chosen by seed from the named range."""
    import torch

    r = stream.range(cfg.range)
    windows = len(r) // cfg.seq_len
    if windows < cfg.samples:
        raise PrunectlError(
            f"calibration.samples: {cfg.samples} sequences of {cfg.seq_len} tokens need "
            f"{cfg.samples * cfg.seq_len:,} tokens, but range '{cfg.range}' of {where} has {len(r):,}; "
            "lower calibration.samples or calibration.seq_len"
        )
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(windows)[: cfg.samples])
    rows = [stream.read(r.start + int(w) * cfg.seq_len, cfg.seq_len).astype(np.int64) for w in pick]
    return torch.from_numpy(np.stack(rows))


def batches(ids: torch.Tensor, micro: int) -> Iterator[torch.Tensor]:
    for i in range(0, ids.shape[0], micro):
        yield ids[i : i + micro]


LOSS_CHUNK_TOKENS = 2048  # tokens of fp32 logits at a time (training's default loss_chunk_tokens)


def lm_loss(model: LlamaForCausalLM, ids: torch.Tensor, micro: int) -> float:
    """Mean next-token loss (nats) over every predicted token of `ids`, without a [tokens x vocab] logits tensor."""
    import torch

    from ..loss import summed_next_token_loss

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for x in batches(ids, micro):
            x = x.to(device)
            hidden = model.model(input_ids=x).last_hidden_state
            total += float(summed_next_token_loss(model.lm_head, hidden, x, LOSS_CHUNK_TOKENS))
            count += x.numel() - x.shape[0]
    return total / count


# ------------------------------------------------------------------------------------------ statistics

# Linears grouped by the tensor they read: one hook and one accumulation per group.
SHARED_INPUTS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
LINEARS = tuple(name for group in SHARED_INPUTS.values() for name in group)


def select(candidates: Iterator[tuple[LlamaForCausalLM, dict]], ids: torch.Tensor, micro: int, device,
           rows: list[dict]) -> LlamaForCausalLM:
    """The candidate with the lowest calibration loss; each is scored on the device, one at a time, and
    described in `rows` (its own entries, its loss, and whether it was selected)."""
    import math

    best, best_loss, chosen = None, math.inf, None
    for model, row in candidates:
        model.to(device)
        loss = lm_loss(model, ids, micro)
        rows.append({**row, "calibration_loss": loss, "selected": False})
        if loss < best_loss:
            best, best_loss, chosen = model, loss, rows[-1]
        model.to("cpu")
    chosen["selected"] = True
    return best


def spread(load: Callable[[int], LlamaForCausalLM], count: int, ids: torch.Tensor, micro: int, device, rank: int,
           world: int) -> list[float]:
    """Calibration loss of `count` candidates scored on every rank at once: rank r loads (`load(k)`) and scores
    the candidates k with k % world == r, one at a time on its device, and every rank returns every loss
    (all-reduced). On one rank these are the numbers select() computes for the same models."""
    import torch

    losses = torch.zeros(count, dtype=torch.float64, device=device)
    for k in range(rank, count, world):
        model = load(k).to(device)
        losses[k] = lm_loss(model, ids, micro)
        del model
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(losses)  # each loss is nonzero on one rank only: the sum is exact
    return losses.tolist()


@dataclass
class InputStats:
    """Running statistics of one Linear input X (tokens x features), summed in float64.

    Only what the method reads is accumulated: squared norms always, column sums for FLAP's mean and
    variance (moments=True), X^T X for SparseGPT's Hessian (gram=True)."""

    gram: bool = False
    moments: bool = False
    n: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    xtx: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        import torch

        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self.gram:
            g = (x.T @ x).double()
            self.xtx = g if self.xtx is None else self.xtx.add_(g)
        else:
            sq = torch.linalg.vector_norm(x, dim=0).double().square()
            self.sumsq = sq if self.sumsq is None else self.sumsq.add_(sq)
        if self.moments:
            s = x.sum(0, dtype=torch.float64)
            self.sum = s if self.sum is None else self.sum.add_(s)
        self.n += x.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        """||X_:,j||_2 per feature (Wanda, Minitron)."""
        sumsq = self.sumsq if self.sumsq is not None else self.xtx.diagonal()
        return sumsq.sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / self.n).float()

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-feature variance (FLAP's fluctuation, eq. 5)."""
        return ((self.sumsq - self.sum.square() / self.n) / max(1, self.n - 1)).clamp_min(0).float()


def collect(layer: torch.nn.Module, run: Callable[[], None], gram: bool = False, moments: bool = False,
            shared: bool = True) -> dict[str, InputStats]:
    """Statistics of every decoder-layer Linear's input while `run()` pushes calibration data through.

    shared=True hooks one Linear per input group (the product path); shared=False hooks each Linear
    on its own, the straightforward way benchmarks/prune.py compares against.
    """
    groups = SHARED_INPUTS if shared else {name: (name,) for name in LINEARS}
    stats = {lead: InputStats(gram=gram, moments=moments) for lead in groups}
    handles = [
        layer.get_submodule(lead).register_forward_pre_hook(lambda _m, args, s=stats[lead]: s.add(args[0].detach()))
        for lead in groups
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {member: stats[lead] for lead, members in groups.items() for member in members}


@dataclass
class Layerwise:
    """Calibration activations walked through the decoder one layer at a time. The hidden states between layers
    stay in the model's dtype, in host memory up to `budget` bytes and beyond it in a file in `spill_dir`
    (activations.HiddenStates); use as a context manager so that file goes when the pass ends."""

    model: LlamaForCausalLM
    ids: torch.Tensor
    micro: int
    device: torch.device
    budget: float = float("inf")
    spill_dir: Path | None = None

    def __post_init__(self) -> None:
        import torch

        from .activations import HiddenStates

        embed = self.model.model.embed_tokens.to(self.device)
        shapes = [(len(x), x.shape[1], embed.embedding_dim) for x in batches(self.ids, self.micro)]
        self.hidden = HiddenStates(shapes, embed.weight.dtype, self.budget, self.spill_dir,
                                   pin=self.device.type == "cuda")
        positions = torch.arange(self.ids.shape[1], device=self.device)[None]
        with torch.inference_mode():
            for i, x in enumerate(batches(self.ids, self.micro)):
                h = embed(x.to(self.device))
                if i == 0:
                    self.position_embeddings = self.model.model.rotary_emb.to(self.device)(h[:1], positions)
                self.hidden.put(i, h)
        self._settle()
        embed.to("cpu")
        self.positions = positions

    def __enter__(self) -> Layerwise:
        return self

    def __exit__(self, *exc) -> None:
        self.hidden.close()

    def _settle(self) -> None:
        """Waits for the copies into pinned host memory, which run asynchronously to the device's work."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def forward(self, layer: torch.nn.Module, update: bool) -> None:
        """Push every calibration batch through `layer`; with update=True its outputs become the next inputs."""
        import torch

        with torch.inference_mode():
            for i in range(len(self.hidden)):
                # attention_mask=None: SDPA applies the causal mask itself
                out = layer(self.hidden.get(i, self.device), attention_mask=None, position_ids=self.positions,
                            position_embeddings=self.position_embeddings)
                out = out[0] if isinstance(out, tuple) else out
                if update:
                    self.hidden.put(i, out)
        if update:
            self._settle()

    def each_layer(self) -> Iterator[tuple[int, torch.nn.Module]]:
        """Yields (index, layer on the accelerator); after the caller prunes it, feeds its outputs onward."""
        for i, layer in enumerate(self.model.model.layers):
            layer.to(self.device)
            yield i, layer
            self.forward(layer, update=True)
            layer.to("cpu")

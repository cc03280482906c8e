"""The next-token loss without a [tokens x vocab] logits tensor, and the training root module that returns it.

At the paper's shapes (8192-token sequences, a 128,256-token vocabulary) HF's `labels=` path holds bf16
logits, an fp32 copy and a log-softmax of the whole micro-batch: about 10 GB per sequence. Here the LM
head and cross-entropy run over `chunk` tokens at a time, each chunk recomputed in backward, so one
chunk's logits exist at a time. The sum over chunks is the mean HF computes, to fp32 round-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def next_token_loss(lm, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of each token given the ones before it; `chunk` tokens of logits at a time (0: all)."""
    hidden = lm.model(input_ids=input_ids).last_hidden_state
    return summed_next_token_loss(lm.lm_head, hidden, input_ids, chunk, recompute=True) / (input_ids[:, 1:].numel())


def summed_next_token_loss(head, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int,
                           recompute: bool = False) -> torch.Tensor:
    """Summed cross-entropy of each next token from the final hidden states, `chunk` tokens of fp32 logits at a
    time (0: all). recompute=True recomputes each chunk's logits in backward (training); scoring needs no graph."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = input_ids[:, 1:].reshape(-1)
    n = y.numel()
    if not chunk or chunk >= n:
        return _summed(head, h, y)
    if recompute:
        return sum(checkpoint(_summed, head, h[i : i + chunk], y[i : i + chunk], use_reentrant=False)
                   for i in range(0, n, chunk))
    return sum(_summed(head, h[i : i + chunk], y[i : i + chunk]) for i in range(0, n, chunk))


def _summed(head, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def checkpoint_layers(lm, mode: str) -> None:
    """Activation checkpointing of the decoder layers: `full` recomputes every layer in backward, `selective`
    every second one (torchtitan's layer-selective checkpointing at frequency 2), `none` keeps them all."""
    if mode != "none":
        lm.config.use_cache = False  # a training forward keeps no KV cache (HF warns when checkpointing otherwise)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                           every_n_layers=2 if mode == "selective" else 1)


class CausalLM(nn.Module):
    """What DeepSpeed trains for pretraining and retraining: a LlamaForCausalLM (`lm`) whose forward returns
    the chunked next-token loss, so the head and loss run inside the engine's forward (ZeRO-3 gathers the
    head's weights there, and again for each chunk's recompute), or the logits when asked (distillation)."""

    def __init__(self, lm, chunk: int) -> None:
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids, logits: bool = False):
        return self.lm(input_ids=input_ids).logits if logits else next_token_loss(self.lm, input_ids, self.chunk)


PREFIX = "lm."


def language_model_state(state: dict) -> dict:
    """A CausalLM's state dict with the LlamaForCausalLM's own names (what final/ and the masks use)."""
    return {k.removeprefix(PREFIX): v for k, v in state.items()}

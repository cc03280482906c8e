"""Hard-concrete masks (Louizos et al. 2018) wrapped around a Llama, for Sheared LLaMA's mask learning."""

from __future__ import annotations

import math

import torch
from transformers import LlamaForCausalLM

from .surgery import Shape

AXES = ("layers", "kv_groups", "hidden", "ffn")  # what Sheared LLaMA masks, in the order of its constraints
# Hard concrete (Louizos et al. 2018): temperature and stretch interval, as in CoFi / Sheared LLaMA.
BETA, LEFT, RIGHT = 2.0 / 3.0, -0.1, 1.1


def l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0): the expected fraction of open units, differentiable in log_alpha."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


def sample(log_alpha: torch.Tensor, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """A stretched, clipped hard-concrete draw while training; its deterministic value otherwise."""
    if training:
        u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0, 1)


class MaskedLlama(torch.nn.Module):
    """A Llama whose layers, KV groups, hidden and MLP channels are gated by masks, plus the duals of eq. 6.

    forward() returns (LM loss, Lagrangian); the mask values are drawn once per forward.

    Under ZeRO-3 the log-alphas may be partitioned like any weight (every one of them when
    stage3_param_persistence_threshold is 0, the MLP masks of a large parent at the default): DeepSpeed
    gathers them only around forward and backward, so nothing outside the forward reads them from the
    module. The forward keeps `last_expected` for metrics, and the cut reads fit()'s consolidated state.
    """

    def __init__(self, model: LlamaForCausalLM, target: Shape, init_log_alpha: float, dual_lr: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        self.llama = model
        self.parent = p = Shape.of(model)
        self.target = target
        self.log_alpha = torch.nn.ParameterDict({
            "layers": torch.nn.Parameter(torch.full((p.layers,), init_log_alpha)),
            "kv_groups": torch.nn.Parameter(torch.full((p.layers, p.kv_heads), init_log_alpha)),
            "hidden": torch.nn.Parameter(torch.full((p.hidden,), init_log_alpha)),
            "ffn": torch.nn.Parameter(torch.full((p.layers, p.ffn), init_log_alpha)),
        })
        # The multipliers maximise the Lagrangian by plain gradient ascent, lambda += lr * gap and
        # phi += lr * gap^2, once per training forward: a step proportional to the violation settles
        # as the expected shape reaches the target (Adam's fixed-size steps overshoot on short budgets).
        # Buffers, so checkpoints carry them and a resumed run continues with the same pressure.
        self.dual_lr = dual_lr
        self.register_buffer("lambdas", torch.zeros(len(AXES)))
        self.register_buffer("phis", torch.zeros(len(AXES)))
        # Mask noise is a pure function of (seed, draw number); the counter is checkpointed with the rest.
        self.seed = seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self.register_buffer("goal", torch.tensor([target.layers / p.layers, target.kv_heads / p.kv_heads,
                                                   target.hidden / p.hidden, target.ffn / p.ffn]), persistent=False)
        self._z: dict[str, torch.Tensor] = {}
        self.last_expected: torch.Tensor | None = None  # expected() at the last forward, detached
        self._install()

    def _install(self) -> None:
        group_width = self.parent.group * self.parent.head_dim
        hidden = lambda _m, _a, out: out * self._z["hidden"].to(out.dtype)  # noqa: E731
        self.llama.model.embed_tokens.register_forward_hook(hidden)
        for i, layer in enumerate(self.llama.model.layers):
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda _m, a, i=i: (a[0] * self._z["kv_groups"][i].repeat_interleave(group_width).to(a[0].dtype),))
            layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: (a[0] * self._z["ffn"][i].to(a[0].dtype),))
            layer.self_attn.o_proj.register_forward_hook(hidden)
            layer.mlp.down_proj.register_forward_hook(hidden)
            layer.register_forward_hook(self._gate_layer(i), with_kwargs=True)

    def _gate_layer(self, i: int):
        """A closed layer passes its input through: h + z * (layer(h) - h)."""

        def hook(_m, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            o = out[0] if isinstance(out, tuple) else out
            gated = h + self._z["layers"][i].to(o.dtype) * (o - h)
            return (gated, *out[1:]) if isinstance(out, tuple) else gated

        return hook

    def expected(self) -> torch.Tensor:
        """Expected kept fraction along each axis (layers, KV groups, hidden, MLP channels)."""
        return torch.stack([l0(self.log_alpha[a]).mean() for a in AXES])

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        generator = None
        if self.training:
            generator = torch.Generator(device=self.lambdas.device)
            generator.manual_seed(self.seed * 1_000_003 + int(self.draws))
            self.draws += 1
        self._z = {a: sample(self.log_alpha[a], self.training, generator) for a in AXES}
        out = self.llama(input_ids=input_ids, labels=labels)
        expected = self.expected()
        self.last_expected = expected.detach()
        gap = expected - self.goal
        lagrangian = (self.lambdas.clone() * gap + self.phis.clone() * gap.square()).sum()
        if self.training:
            with torch.no_grad():
                self.lambdas += self.dual_lr * gap
                self.phis += self.dual_lr * gap.square()
        return out.loss, lagrangian

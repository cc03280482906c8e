"""Shapes and slicing: a Llama cut to a smaller dense Llama with the same shape in every layer.

Structured methods only decide *which* layers, hidden channels, KV groups and MLP channels survive;
this module turns that choice into a new LlamaForCausalLM whose weights are slices of the parent's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..model import Shape, allow_explicit_head_dim

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

__all__ = ["Shape", "cut"]  # Shape lives in model.py; the prune methods name it from here


def cut(
    model: LlamaForCausalLM,
    *,
    layers: list[int] | None = None,
    hidden: torch.Tensor | None = None,
    kv_groups: list[torch.Tensor] | None = None,
    ffn: list[torch.Tensor] | None = None,
    biases: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> LlamaForCausalLM:
    """A new dense model keeping the given layers, hidden channels, KV groups (per kept layer) and
    MLP channels (per kept layer); None keeps everything. biases=True gives every Linear a bias
    (zeros unless the parent's Linears already have one: FLAP's compensation in o_proj/down_proj).
    `state`: the weights to slice, when `model`'s own are not whole (a ZeRO-3 module's partitions);
    default model.state_dict(). The new model lives where those weights are."""
    import torch
    from transformers import LlamaForCausalLM

    shape = Shape.of(model)
    layers = list(range(shape.layers)) if layers is None else list(layers)
    state = model.state_dict() if state is None else state
    new_hidden = shape.hidden if hidden is None else int(hidden.numel())
    new_kv = shape.kv_heads if kv_groups is None else int(kv_groups[0].numel())
    new_ffn = shape.ffn if ffn is None else int(ffn[0].numel())
    if kv_groups is not None and any(g.numel() != new_kv for g in kv_groups):
        raise ValueError("every layer must keep the same number of KV groups")
    if ffn is not None and any(f.numel() != new_ffn for f in ffn):
        raise ValueError("every layer must keep the same number of MLP channels")
    add_bias = biases

    def cols(t: torch.Tensor) -> torch.Tensor:  # hidden is the input dimension
        return t if hidden is None else t.index_select(-1, hidden)

    def rows(t: torch.Tensor) -> torch.Tensor:  # hidden is the output dimension
        return t if hidden is None else t.index_select(0, hidden)

    embed = state["model.embed_tokens.weight"]

    def zeros(n: int) -> torch.Tensor:  # a new bias, in the weights' dtype (bf16 parents) and place
        return torch.zeros(n, dtype=embed.dtype, device=embed.device)

    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = cols(state["model.embed_tokens.weight"])
    out["model.norm.weight"] = rows(state["model.norm.weight"])
    if not shape.tied:
        out["lm_head.weight"] = cols(state["lm_head.weight"])
    d = shape.head_dim
    for new_i, old_i in enumerate(layers):
        src, dst = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        get = lambda name: state[src + name]  # noqa: E731
        out[dst + "input_layernorm.weight"] = rows(get("input_layernorm.weight"))
        out[dst + "post_attention_layernorm.weight"] = rows(get("post_attention_layernorm.weight"))
        # attention: KV groups carry their query heads with them, so GQA stays valid
        if kv_groups is None:
            q_idx = kv_idx = None
        else:
            groups = kv_groups[new_i]
            heads = (groups[:, None] * shape.group + torch.arange(shape.group)).reshape(-1)
            q_idx = (heads[:, None] * d + torch.arange(d)).reshape(-1)
            kv_idx = (groups[:, None] * d + torch.arange(d)).reshape(-1)
        for name, idx in (("q_proj", q_idx), ("k_proj", kv_idx), ("v_proj", kv_idx)):
            w = cols(get(f"self_attn.{name}.weight"))
            out[dst + f"self_attn.{name}.weight"] = w if idx is None else w.index_select(0, idx)
            if shape.attention_bias or add_bias:
                b = state.get(src + f"self_attn.{name}.bias", zeros(get(f"self_attn.{name}.weight").shape[0]))
                out[dst + f"self_attn.{name}.bias"] = b if idx is None else b.index_select(0, idx)
        w = rows(get("self_attn.o_proj.weight"))
        out[dst + "self_attn.o_proj.weight"] = w if q_idx is None else w.index_select(1, q_idx)
        if shape.attention_bias or add_bias:
            out[dst + "self_attn.o_proj.bias"] = rows(state.get(src + "self_attn.o_proj.bias", zeros(shape.hidden)))
        # MLP
        f_idx = None if ffn is None else ffn[new_i]
        for name in ("gate_proj", "up_proj"):
            w = cols(get(f"mlp.{name}.weight"))
            out[dst + f"mlp.{name}.weight"] = w if f_idx is None else w.index_select(0, f_idx)
            if shape.mlp_bias or add_bias:
                b = state.get(src + f"mlp.{name}.bias", zeros(shape.ffn))
                out[dst + f"mlp.{name}.bias"] = b if f_idx is None else b.index_select(0, f_idx)
        w = rows(get("mlp.down_proj.weight"))
        out[dst + "mlp.down_proj.weight"] = w if f_idx is None else w.index_select(1, f_idx)
        if shape.mlp_bias or add_bias:
            out[dst + "mlp.down_proj.bias"] = rows(state.get(src + "mlp.down_proj.bias", zeros(shape.hidden)))

    allow_explicit_head_dim()  # FLAP's and Sheared-LLaMA's head counts need not divide the hidden size
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(layers)
    config.hidden_size = new_hidden
    config.num_key_value_heads = new_kv
    config.num_attention_heads = new_kv * shape.group
    config.head_dim = d
    config.intermediate_size = new_ffn
    if add_bias:
        config.attention_bias = config.mlp_bias = True
    config._attn_implementation = model.config._attn_implementation
    # Build without random init: weights are assigned below; only the rotary buffer needs computing.
    with torch.device("meta"):
        small = LlamaForCausalLM(config)
    # slices made by index_select are already new tensors; copy only what still shares the parent's storage, so a
    # candidate exists once (at Llama-3.1-8B scale a second copy is gigabytes of host memory)
    parent_storage = {t.untyped_storage().data_ptr() for t in state.values()}
    small.load_state_dict({k: v.clone() if v.untyped_storage().data_ptr() in parent_storage else v.contiguous()
                           for k, v in out.items()}, strict=not shape.tied, assign=True)
    if shape.tied:
        small.lm_head.weight = small.model.embed_tokens.weight
    small.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return small.to(out["model.embed_tokens.weight"].device).eval()

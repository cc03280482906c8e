"""Llama models through transformers: build from a recipe, count, save as a loadable HF directory."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from .schema import Strict

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM


class ModelConfig(Strict):
    layers: int = Field(ge=1)
    hidden: int = Field(ge=8)
    heads: int = Field(ge=1)
    kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; default: heads (MHA)")
    head_dim: int | None = Field(None, ge=4, description="default: hidden // heads")
    ffn: int = Field(ge=1)
    vocab: int | None = Field(None, ge=16, description="default: the prepared tokenizer's size")
    rope_theta: float = Field(10_000.0, gt=0)
    max_position: int = Field(2048, ge=8)
    tie_embeddings: bool = False
    rms_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    attention: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        kv = self.kv_heads or self.heads
        if self.heads % kv:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={kv}")
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}; set head_dim")
        return self


def allow_explicit_head_dim() -> None:
    """Lets a LlamaConfig have a hidden size that is not a multiple of its attention heads when head_dim is
    given, as Llama's attention allows (q/k/v/o are sized heads x head_dim). transformers 5.x refuses it
    whatever head_dim says (huggingface/transformers#46082), which FLAP's and Sheared-LLaMA's shapes need:
    Table 1's FLAP keeps 20 heads of 128 in a 4096-wide model. A head_dim derived from the hidden size is
    still checked. Called at the start of every job (launch.Threaded) and where prunectl makes or reads a config."""
    from transformers import LlamaConfig

    validators = getattr(LlamaConfig, "__class_validators__", None)
    if not validators or any(v is _validate_llama_heads for v in validators):
        return
    LlamaConfig.__class_validators__ = [_validate_llama_heads if v.__name__ == "validate_architecture" else v
                                        for v in validators]


def _validate_llama_heads(config) -> None:
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_attention_heads ({config.num_attention_heads}) is not a multiple of "
                         f"num_key_value_heads ({config.num_key_value_heads})")
    derived = config.head_dim == config.hidden_size // config.num_attention_heads
    if derived and config.hidden_size % config.num_attention_heads:
        raise ValueError(f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                         f"heads ({config.num_attention_heads}); give head_dim")


def llama_config(cfg: ModelConfig, vocab_size: int, bos: int | None, eos: int | None, pad: int | None) -> LlamaConfig:
    from transformers import LlamaConfig

    allow_explicit_head_dim()

    return LlamaConfig(
        vocab_size=cfg.vocab or vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads or cfg.heads,
        head_dim=cfg.head_dim or cfg.hidden // cfg.heads,
        max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        attn_implementation=cfg.attention,
    )


def build(config: LlamaConfig, seed: int, zero3: dict[str, Any] | None = None) -> LlamaForCausalLM:
    """Random initialisation that depends on the seed alone. With `zero3` (a DeepSpeed config) the same
    weights are made straight into ZeRO-3 partitions (prunectl.zero3)."""
    import torch
    from transformers import LlamaForCausalLM

    from . import zero3 as partitions

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config) if zero3 is None else partitions.build(config, zero3)


def load(folder: Path, zero3: dict[str, Any] | None = None) -> LlamaForCausalLM:
    """A saved Llama in fp32 for training; with `zero3`, read straight into ZeRO-3 partitions."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import zero3 as partitions

    allow_explicit_head_dim()
    if zero3 is not None:
        return partitions.load(folder, zero3)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")


@dataclass(frozen=True)
class Shape:
    """A Llama macro-architecture, enough to count its parameters exactly."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def of(cls, model: LlamaForCausalLM | LlamaConfig) -> Shape:
        """The shape of a model, or of its config."""
        c = getattr(model, "config", model)
        return cls(
            layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            ffn=c.intermediate_size, vocab=c.vocab_size, tied=bool(c.tie_word_embeddings),
            attention_bias=bool(getattr(c, "attention_bias", False)), mlp_bias=bool(getattr(c, "mlp_bias", False)),
        )

    @classmethod
    def of_json(cls, config: dict[str, Any]) -> Shape:
        """The shape a Hugging Face config.json describes (KeyError when it is not a complete Llama config)."""
        heads = config["num_attention_heads"]
        return cls(
            layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads, ffn=config["intermediate_size"],
            vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings")),
            attention_bias=bool(config.get("attention_bias")), mlp_bias=bool(config.get("mlp_bias")),
        )

    @classmethod
    def of_model(cls, model: ModelConfig, vocab: int) -> Shape:
        """The shape a recipe's `model:` section builds, with the tokenizer's vocabulary unless it sets one."""
        return cls(layers=model.layers, hidden=model.hidden, heads=model.heads, kv_heads=model.kv_heads or model.heads,
                   head_dim=model.head_dim or model.hidden // model.heads, ffn=model.ffn, vocab=model.vocab or vocab,
                   tied=model.tie_embeddings)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def linear_weights(self) -> int:
        """One decoder layer's Linear weights: what a sparse mask covers."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.ffn

    def per_layer(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (2 * q + 2 * kv) + (q + 2 * kv + self.hidden if self.attention_bias else 0)
        mlp = 3 * self.hidden * self.ffn + (2 * self.ffn + self.hidden if self.mlp_bias else 0)
        return attention + mlp + 2 * self.hidden  # two RMSNorms

    def embedding(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def parameters(self) -> int:
        return self.embedding() + self.layers * self.per_layer() + self.hidden  # + final norm

    def describe(self) -> dict[str, int]:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads,
                "ffn": self.ffn, "parameters": self.parameters()}

    def with_(self, **changes) -> Shape:
        return replace(self, **changes)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total (tied weights once), embedding and non-zero parameter counts (ZeRO-3 partitions gathered one at a time)."""
    from .masks import MASK
    from .zero3 import full_shape, gathered

    seen: set[int] = set()
    total = embedding = nonzero = 0
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith(f".{MASK}"):  # ZeRO-3 holds a sparse mask as a frozen parameter
            continue
        seen.add(id(p))
        numel = math.prod(full_shape(p))
        total += numel
        with gathered([p]):
            nonzero += int((p != 0).sum())
        if "embed_tokens" in name or "lm_head" in name:
            embedding += numel
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "nonzero": nonzero}


def save(model: LlamaForCausalLM, state_dict: dict[str, Any] | None, tokenizer, out: Path) -> None:
    """config.json + model.safetensors + tokenizer, loadable by AutoModelForCausalLM.from_pretrained."""
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)


STORED_DTYPES = ("float32", "bfloat16", "float16")


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a Hugging Face directory's weights are saved in (config.json `dtype`, or `torch_dtype` from
    transformers < 5); float32 when it records none."""
    import torch

    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if name in STORED_DTYPES else torch.float32


def locate(root: Path, ref: str) -> tuple[Path, str]:
    """A model to read, and how a manifest records it: a complete run's final/ (name@vNNN), or a local
    Hugging Face directory given by explicit path (containing '/', or starting with '.' or '~'; recorded as
    its absolute path), as for the paper's variant pruned from Meta's checkpoint."""
    from . import store
    from .errors import PrunectlError

    if "/" in ref or ref.startswith((".", "~")):
        path = Path(ref).expanduser()
        check_hf_dir(path)
        return path, str(path.resolve())
    run = store.resolve(root, ref)
    if not (run.final / "config.json").exists():
        raise PrunectlError(f"{run.ref} has no final model (an LR sweep's prefix run keeps none)")
    return run.final, run.ref


def check_hf_dir(path: Path) -> None:
    """A Hugging Face Llama directory prunectl can load: a readable config, weights, a tokenizer."""
    from .errors import PrunectlError

    if not path.is_dir():
        raise PrunectlError(f"{path}: no such model directory; give a Hugging Face model directory or a run name@vNNN")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise PrunectlError(f"{path}: has no config.json; give a Hugging Face model directory") from None
    except (OSError, ValueError) as err:
        raise PrunectlError(f"{path / 'config.json'}: is not readable JSON ({type(err).__name__}); "
                            "re-download or re-save the model") from None
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise PrunectlError(f"{path / 'config.json'}: model_type is {kind!r}; prunectl prunes Llama models (model_type: llama)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise PrunectlError(f"{path}: has no weights (*.safetensors); save the model with save_pretrained")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise PrunectlError(f"{path}: has no tokenizer (tokenizer.json); save it beside the model with save_pretrained")


def forward_flops(model_dir: Path, seq_len: int = 2048, linear_density: float = 1.0) -> float:
    """FLOPs of one forward pass over `seq_len` tokens (2 per multiply-add), read from the saved shapes.

    Decoder linears count at `linear_density` (a sparse model's theoretical FLOPs, with the zeroed
    multiplications skipped); attention adds QK^T and AV per layer at its own (possibly pruned) width;
    the LM head runs dense. Embedding lookups are free."""
    from safetensors import safe_open

    config = json.loads((Path(model_dir) / "config.json").read_text())
    linear = attention = 0
    lm_head = config["hidden_size"] * config["vocab_size"]
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        if path.name == "masks.safetensors":
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                if ".layers." in name and name.endswith("proj.weight"):
                    linear += shape[0] * shape[1]
                    if name.endswith("q_proj.weight"):
                        attention += 4 * seq_len * seq_len * shape[0]  # QK^T and AV over all heads
                elif name == "lm_head.weight":
                    lm_head = shape[0] * shape[1]
    return 2.0 * seq_len * (linear * linear_density + lm_head) + attention

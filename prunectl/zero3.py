"""Llama models made straight into ZeRO-3 partitions, so that no rank ever holds the whole model.

`build` makes a model under `deepspeed.zero.Init`: each module is partitioned over the ranks as soon as its
constructor returns, so a rank holds its shards plus the one module being made. The weights are those of
the plain build for the same seed: construction draws the same random numbers, and Hugging Face's
initialisation, which each sub-model runs at the end of its constructor, runs module by module, gathered.

`load` reads a saved model into the partitions: rank 0 reads one module's tensors at a time from the
safetensors files (never the whole state dict, as `from_pretrained` under ZeRO-3 does) and DeepSpeed
scatters them on leaving the gather.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PrunectlError

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM


def partitioned(param: torch.Tensor) -> bool:
    """ZeRO-3 owns `param` (gathered or not)."""
    return hasattr(param, "ds_id")


def sliced(param: torch.Tensor) -> bool:
    """This rank holds only a ZeRO-3 slice of `param` right now (never on ZeRO 0-2)."""
    return partitioned(param) and param.data.numel() < param.ds_numel


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


@contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """The full tensors of `params` for the block (a no-op for parameters ZeRO-3 does not own); with
    `modifier_rank`, that rank's changes are scattered to every rank's partition on leaving."""
    if not any(partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@contextmanager
def _gathered_initialisation():
    """Hugging Face initialises each sub-model's weights at the end of its constructor, when zero.Init has
    already partitioned them: initialise module by module, gathered, instead (rank 0 draws and scatters).
    The random draws then come in the plain build's order, so the weights are the same."""
    from transformers import PreTrainedModel
    from transformers.integrations.deepspeed import initialize_weights_zero3

    plain = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = initialize_weights_zero3
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = plain


def _construct(config: LlamaConfig, ds_config: dict[str, Any], initialise: bool) -> LlamaForCausalLM:
    import deepspeed
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    with ExitStack() as stack:
        # a load overwrites every weight: no random draws at all then
        stack.enter_context(_gathered_initialisation() if initialise else no_init_weights())
        stack.enter_context(prevent_arange_dtype_change())  # RoPE's frequencies stay fp32 under a bf16 config
        stack.enter_context(deepspeed.zero.Init(config_dict_or_path=ds_config))
        return LlamaForCausalLM(config)


def build(config: LlamaConfig, ds_config: dict[str, Any]) -> LlamaForCausalLM:
    """A randomly initialised Llama in ZeRO-3 partitions, equal to LlamaForCausalLM(config) under the same
    random state (the caller seeds it)."""
    return _construct(config, ds_config, initialise=True)


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return dict.fromkeys(f.keys(), folder / "model.safetensors")


def load(folder: Path, ds_config: dict[str, Any]) -> LlamaForCausalLM:
    """A saved Llama (config.json and safetensors) read into ZeRO-3 partitions, one module at a time."""
    import torch
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    model = _construct(config, ds_config, initialise=False)
    model.tie_weights()  # skipped with the initialisation; a tied LM head is the embedding, saved once
    files = _tensor_files(folder)
    names = {n for n, _ in model.named_parameters()}  # a tied LM head appears once, as the embedding
    if missing := sorted(names - set(files)):
        raise PrunectlError(f"{folder}: the checkpoint lacks {len(missing)} of the model's tensors "
                            f"(e.g. {missing[0]}); it is not a complete Llama checkpoint")
    writer = dist.get_rank() == 0
    with ExitStack() as stack, torch.no_grad():
        readers = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(files.values())} if writer else {}
        seen: set[int] = set()
        for prefix, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(prefix=prefix, recurse=False) if id(p) not in seen]
            seen.update(id(p) for _, p in own)  # a tied LM head is the embedding, filled once
            if not own:
                continue
            with gathered([p for _, p in own], modifier_rank=0):
                if writer:
                    for name, p in own:
                        p.data.copy_(readers[files[name]].get_tensor(name))
    return model

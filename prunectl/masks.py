"""Sparse keep-masks (final/masks.safetensors): load, hold fixed through training, verify.

A masked weight stays exactly zero when it starts at zero and never receives a gradient: AdamW's
moments for it stay zero, so its update is 0 / (0 + eps) = 0, and decoupled weight decay scales
zero to zero. Masking the gradient before DeepSpeed accumulates it therefore holds the pattern in
the module and in ZeRO's fp32 master copy alike, whatever the optimizer state does.

ZeRO-1/2 keep every weight on every rank, and the mask beside it as a bool buffer. ZeRO-3 partitions the
weights, so the mask is a frozen parameter of the weight's module (`keep_mask`, 0/1 in the weight's dtype):
DeepSpeed partitions it like the weight and gathers both for the module's forward and backward, which is
when the gradient hook reads it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PrunectlError

if TYPE_CHECKING:
    import torch

FILE = "masks.safetensors"


def load(model_dir: Path) -> Mapping[str, torch.Tensor] | None:
    """Parameter name -> boolean keep-mask, or None for a dense model; each mask is read when it is used."""
    path = Path(model_dir) / FILE
    return Stored(path) if path.exists() else None


class Stored(Mapping):
    """Keep-masks read from their file one at a time: a rank never holds them all (model-sized at 8B)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self.names = list(f.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name).bool()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def save(masks: Mapping[str, torch.Tensor], folder: Path, metadata: dict[str, str] | None = None) -> None:
    """Keep-masks into folder/masks.safetensors; `metadata` says where they came from (a prune run's method).
    Masks read from a file (a retrain's, passed on) are copied as they are, metadata included."""
    from safetensors.torch import save_file

    if isinstance(masks, Stored) and metadata is None:
        shutil.copyfile(masks.path, Path(folder) / FILE)
        return
    save_file({k: v.contiguous() for k, v in masks.items()}, str(Path(folder) / FILE),
              metadata=metadata or {"kind": "keep-mask"})


MASK = "keep_mask"


def hold(model, masks: Mapping[str, torch.Tensor], partitioned: bool = False) -> None:
    """Zero the masked weights now and mask their gradients on every backward pass (`partitioned`: ZeRO-3).

    A model already in ZeRO-3 partitions (prunectl.zero3) has each weight gathered in turn and its mask
    partitioned as soon as it is made, so only one full mask and weight exist at a time."""
    import torch

    from .zero3 import full_shape, gathered, partitioned as in_partitions

    params = dict(model.named_parameters())
    for name in masks:
        keep, p = masks[name], params.get(name)
        if p is None or full_shape(p) != tuple(keep.shape):
            got = "missing" if p is None else f"shaped {full_shape(p)}"
            raise PrunectlError(f"masks: {name} {tuple(keep.shape)} does not fit the model ({got}); "
                                "the masks belong to another architecture")
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        with gathered([p], modifier_rank=0), torch.no_grad():
            p.masked_fill_(~keep, 0)
        if partitioned:
            mask = torch.nn.Parameter(keep.to(p.dtype), requires_grad=False)
            owner.register_parameter(MASK, mask)
            if in_partitions(p):
                p.convert_to_zero_parameters([mask])
        else:  # a non-persistent buffer follows the module to its device, and dtype casts leave bools alone
            owner.register_buffer(MASK, keep.clone(), persistent=False)
        p.register_hook(lambda grad, owner=owner: grad.masked_fill(getattr(owner, MASK) == 0, 0))


def without_masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without the ZeRO-3 mask parameters (final/ saves them as masks.safetensors instead)."""
    return {k: v for k, v in state.items() if not k.endswith(f".{MASK}")}


def check(state: dict[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, float | int]:
    """The sparsity a run ends with; a masked weight that moved is an error, never a silent densification.
    One pass: each mask is read once (from its file, for a retrain's masks)."""
    bad = kept = zeros = total = 0
    for name, keep in masks.items():
        w = state[name].cpu()
        bad += int((w[~keep] != 0).sum())
        kept += int(keep.sum())
        zeros += int((w == 0).sum())
        total += keep.numel()
    if bad:
        raise PrunectlError(f"{bad:,} masked weights are non-zero after training; the sparse pattern was not held")
    return {"mask_sparsity": round(1 - kept / total, 6), "masked_nonzero": 0,
            "masked_linears_zero_fraction": round(zeros / total, 6)}

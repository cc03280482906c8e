"""Knowledge distillation for retraining: a frozen teacher's soft targets mixed with next-token loss.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, where x_T = softmax(logits / T).
The T^2 keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al., 2015).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from .schema import Strict

if TYPE_CHECKING:
    import torch


class DistillConfig(Strict):
    teacher: str = Field("parent", description="'parent' (the pruned run's parent), a run name@version, or a Hugging Face model directory")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(2.0, gt=0)


def load_teacher(model_dir: Path, device) -> torch.nn.Module:
    """Frozen, in eval mode; bf16 on GPU (it only runs forward), fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return teacher.to(device).eval().requires_grad_(False)


def teacher_logits(teacher, x: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        logits = teacher(input_ids=x).logits
    return logits.float().clone()  # a normal tensor again, usable next to the student's autograd graph


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher/T) || softmax(student/T))."""
    import torch.nn.functional as F

    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def next_token_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())

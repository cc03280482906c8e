"""What retraining and scratch twins optimise: the Objectives they hand the one training loop (train.fit).

- Retrain starts from a complete run's final/ model, holds its sparse mask if it has one, and can
  distil from a frozen teacher (by default the pruned run's parent).
- A scratch twin builds the pruned architecture at random (`like: <prune run>`) and, for a sparse
  prune run, zeroes the pruned weights and holds that mask too (the paper's Appendix G setting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import masks as sparse_masks
from .train import Objective


class _Masked(Objective):
    """Holds a sparse mask (if any) from build to the saved model, and records the sparsity reached."""

    masks: dict | None = None
    zero_stage: int = 0

    def hold(self, model):
        if self.masks:
            sparse_masks.hold(model, self.masks, partitioned=self.zero_stage == 3)
        return model

    def root(self, built, cfg):
        self.zero_stage = cfg.zero_stage
        return super().root(self.hold(built), cfg)

    def final_state(self, state):
        return sparse_masks.without_masks(super().final_state(state))

    def finish(self, state: dict[str, Any], final: Path) -> dict[str, Any]:
        if not self.masks:
            return {}
        summary = sparse_masks.check(state, self.masks)
        sparse_masks.save(self.masks, final)
        return summary


class RetrainObjective(_Masked):
    def __init__(self, init_dir: Path, teacher_dir: Path | None = None, distill=None) -> None:
        from transformers import AutoTokenizer

        super().__init__()
        self.init_dir, self.teacher_dir, self.distill = Path(init_dir), teacher_dir, distill
        self.masks = sparse_masks.load(self.init_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.init_dir)
        self.teacher = None

    def build(self, tokenizer, vocab_size: int, seed: int, zero3=None):
        from . import model as models

        return models.load(self.init_dir, zero3)

    def loss(self, engine, x, step: int):
        if self.distill is None:
            return super().loss(engine, x, step)
        from . import distill

        if self.teacher is None:  # loaded once, on the rank's device, after DeepSpeed has placed the student
            self.teacher = distill.load_teacher(self.teacher_dir, x.device)
        logits = engine(x, logits=True)
        ce = distill.next_token_loss(logits, x)
        kd = distill.kd_loss(logits[:, :-1], distill.teacher_logits(self.teacher, x)[:, :-1], self.distill.temperature)
        alpha = self.distill.alpha
        return alpha * kd + (1 - alpha) * ce, {"loss": ce, "kd_loss": kd}


class ScratchTwinObjective(_Masked):
    """The pruned run's architecture at random initialisation, with its sparse mask held if it has one."""

    def __init__(self, like_dir: Path) -> None:
        super().__init__()
        self.like_dir = Path(like_dir)
        self.masks = sparse_masks.load(self.like_dir)

    def build(self, tokenizer, vocab_size: int, seed: int, zero3=None):
        from transformers import AutoConfig

        from . import model as models

        return models.build(AutoConfig.from_pretrained(self.like_dir), seed, zero3)

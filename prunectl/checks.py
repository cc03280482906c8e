"""Every stage's input checks, run before a run directory is written (or, for a study's later stages,
when the job starts and its inputs exist): one function per stage, each reporting every problem at once."""

from __future__ import annotations

from pathlib import Path


def check(stage: str, root: Path, recipe, res) -> dict[str, str]:
    """The stage's inputs as name@vNNN, or a PrunectlError listing every problem."""
    if stage == "prune":
        from .prune.stage import check as check_prune

        return check_prune(root, recipe, res)
    from .retrain import check_pretrain, check_retrain

    return {"pretrain": check_pretrain, "retrain": check_retrain}[stage](root, recipe, res)

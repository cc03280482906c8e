"""Retrain and scratch-twin recipes for every pruned toy run (shared by the retrain and Slurm tests)."""

from __future__ import annotations

import textwrap

import pytest

TRAIN = """
train:
  tokens: 32768
  data_ranges: [retrain]
  seq_len: 64
  global_batch: 16
  micro_batch: 16
  zero_stage: 2
  checkpoint_every: 0
  eval_every: 0
  eval_tokens: 16384
  log_every: 8
launch: {tasks_per_node: 1, cpus_per_task: 2, time_min: 15}
"""
RETRAIN = "stage: retrain\noptimizer: {lr: 1.0e-3, weight_decay: 0.1}\n" + TRAIN
TWIN = "stage: pretrain\ndata: test-data@latest\noptimizer: {lr: 3.0e-3, weight_decay: 0.1}\n" + TRAIN


@pytest.fixture(scope="session")
def study(pruned, workspace) -> dict:
    """Recipes for a retrain and a scratch twin of every pruned toy run."""
    recipes = workspace["recipes"]
    (recipes / "_retrain.yaml").write_text(textwrap.dedent(RETRAIN))
    (recipes / "_twin.yaml").write_text(textwrap.dedent(TWIN))
    for key in pruned["reports"]:
        (recipes / f"retrain-{key}.yaml").write_text(
            f"extends: _retrain.yaml\nname: test-retrain-{key}\ninit: test-prune-{key}@latest\n")
        (recipes / f"twin-{key}.yaml").write_text(
            f"extends: _twin.yaml\nname: test-twin-{key}\nlike: test-prune-{key}@latest\n")
    return workspace

"""The GPU benchmark runs end to end at tiny shapes on a CPU, so a session that has a GPU can trust it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_train_gpu_smoke_runs_every_checkpointing_mode():
    out = subprocess.run([sys.executable, "benchmarks/train_gpu.py", "--smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["none"], ["selective"], ["full"])]
    assert [r[0] for r in rows] == ["none", "selective", "full"] and all(float(r[2]) > 0 for r in rows)


@pytest.mark.slow
def test_prune_memory_smoke_spills_at_4x_and_prints_every_ratio(workspace):
    """Five prunes of a tiny bf16 parent, each in its own process (~2 min on 2 cores)."""
    out = subprocess.run([sys.executable, "benchmarks/prune_memory.py", "--smoke", "--runs-dir", str(workspace["runs"]),
                          "--data", "test-data@latest"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    wanda = [line.split() for line in out.stdout.splitlines() if line.startswith("wanda ")]
    assert [row[-3] for row in wanda] == ["False", "True", "False"]  # 1x fits the budget, 4x spills, 4x in RAM
    assert all(float(row[-1]) > 0 for row in wanda)
    assert "wanda: peak growth 4x spilled / 1x = " in out.stdout and "wanda: prune s 4x spilled / 4x in RAM" in out.stdout
    assert "minitron-width: peak growth 4x / 1x = " in out.stdout

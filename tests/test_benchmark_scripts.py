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

"""Shared fixtures: a prepared data run on real English text and a toy Llama recipe that trains in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

DATA_RECIPE = """
name: test-data
stage: data
data:
  sources:
    - {kind: text, package: shksprdata, path: "texts/*_gut.txt", exclude: ["*_gut_f.txt"]}
  tokenizer: {kind: bpe, vocab_size: 1024}
  ranges: {validation: 0.04, calibration: 0.03, retrain: 0.23, pretrain: 0.70}
  doc_chars: 4000
  seed: 0
  shard_tokens: 200000
"""

PARENT_RECIPE = """
name: test-parent
stage: pretrain
data: test-data@latest
model: {layers: 2, hidden: 64, heads: 4, kv_heads: 2, ffn: 160, max_position: 256}
optimizer: {lr: 3.0e-3}
train:
  tokens: 131072
  data_ranges: [pretrain]
  seq_len: 64
  global_batch: 16
  micro_batch: 8
  zero_stage: 2
  checkpoint_every: 0
  eval_every: 0
  eval_tokens: 16384
  log_every: 8
launch: {tasks_per_node: 1, cpus_per_task: 2, time_min: 15}
"""


def prunectl(*args: str, env: dict[str, str], check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "prunectl", *args], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout, **kw,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"prunectl {' '.join(args)} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def refused(env: dict[str, str], runs: Path, *args: str, written: str = "*/v*") -> str:
    """A command that must fail as a user mistake: exit 2, `error:` lines only, nothing new under runs/written."""
    before = sorted(runs.glob(written))
    out = prunectl(*args, env=env, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")
    assert sorted(runs.glob(written)) == before  # nothing written
    return out.stderr


def manifest(runs: Path, name: str, version: int = 1) -> dict:
    return json.loads((runs / name / f"v{version:03d}" / "manifest.json").read_text())


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict:
    """A recipes dir and a runs root holding a complete `test-data` run."""
    root = tmp_path_factory.mktemp("workspace")
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "data.yaml").write_text(textwrap.dedent(DATA_RECIPE))
    (recipes / "parent.yaml").write_text(textwrap.dedent(PARENT_RECIPE))
    runs = root / "runs"
    env = {**os.environ, "PRUNECTL_RUNS": str(runs), "PRUNECTL_RECIPES": str(recipes), "PYTHONUNBUFFERED": "1"}
    prunectl("data", "prepare", str(recipes / "data.yaml"), env=env)
    return {"root": root, "recipes": recipes, "runs": runs, "env": env}


@pytest.fixture()
def fresh_runs(workspace, tmp_path) -> dict:
    """A runs root of its own that still sees the prepared data (symlinked)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "test-data").symlink_to(workspace["runs"] / "test-data", target_is_directory=True)
    env = {**workspace["env"], "PRUNECTL_RUNS": str(runs)}
    return {**workspace, "runs": runs, "env": env}


from .prune_fixture import pruned  # noqa: E402,F401  (one session-wide instance for every test module)
from .retrain_fixture import study  # noqa: E402,F401

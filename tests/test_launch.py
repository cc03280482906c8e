"""Job states from squeue: one query serves a poll, and a controller that does not answer means unknown, not gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prunectl import launch, store

from .conftest import REPO


def fake_squeue(bin_dir, body: str):
    """An `squeue` first on PATH that logs each call to bin_dir/calls and then runs `body`."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho called >> {bin_dir / 'calls'}\n{body}\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def calls(bin_dir) -> int:
    return len((bin_dir / "calls").read_text().splitlines()) if (bin_dir / "calls").exists() else 0


@pytest.fixture(autouse=True)
def forget_squeue(monkeypatch):
    monkeypatch.setattr(launch, "_SQUEUE", {"at": -1.0, "states": {}, "error": None})


def test_one_listing_answers_every_job_of_a_poll(tmp_path, monkeypatch):
    env = fake_squeue(tmp_path / "bin", 'printf "12_0 RUNNING\\n12_1 PENDING\\n"')
    monkeypatch.setenv("PATH", env["PATH"])
    assert launch.slurm_state("12_0") == "RUNNING" and launch.slurm_state("12_1") == "PENDING"
    assert launch.slurm_state("13") is None  # Slurm has forgotten it
    assert calls(tmp_path / "bin") == 1


def test_an_unreachable_controller_is_unknown_not_gone(tmp_path, monkeypatch):
    env = fake_squeue(tmp_path / "bin", 'echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1')
    monkeypatch.setenv("PATH", env["PATH"])
    running = store.Manifest(name="x", version=1, stage="pretrain", status="running", executor="slurm", job_ids=["12"])
    for _ in range(3):
        with pytest.raises(launch.SlurmUnreachable, match="Unable to contact slurm controller"):
            launch.job_alive(running)
    assert calls(tmp_path / "bin") == 1  # the failure is remembered, not retried for every job

    # `status` shows the run as it stands with its Slurm state unknown, and says why once
    runs = tmp_path / "runs"
    run = store.allocate(runs, "x")
    run.write_manifest(running.model_copy(update={"version": run.version}))
    out = subprocess.run([sys.executable, "-m", "prunectl", "status"], cwd=REPO, capture_output=True, text=True,
                         env={**env, "PRUNECTL_RUNS": str(runs)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Unable to contact slurm controller" in out.stderr and "make slurm-up" in out.stderr
    out = subprocess.run([sys.executable, "-m", "prunectl", "status", "--json"], cwd=REPO, capture_output=True,
                         text=True, env={**env, "PRUNECTL_RUNS": str(runs)}, timeout=120)
    [row] = json.loads(out.stdout)
    assert (row["run"], row["status"], row["state"], row["slurm"]) == ("x@v001", "running", "running", "unknown")

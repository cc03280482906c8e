"""The promises a Makefile and a shared cluster rely on: exit codes, runs that never get stuck, one owner per
run directory, clean stops, shared file modes. Each test drives the CLI in a fresh process, as a user would."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunectl import store

from .conftest import REPO, manifest, prunectl

ONE_RUN = ["pretrain", "test-parent", "--executor", "local"]


def _crash_in_job(env: dict[str, str]) -> dict[str, str]:
    """A job that dies inside its process, before its stage starts (the login-node checks all pass)."""
    return {**env, "PRUNECTL_THREADS": "not-a-number"}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_failing_local_job_exits_1_with_one_line_and_stops_make(fresh_runs, tmp_path):
    runs, env = fresh_runs["runs"], _crash_in_job(fresh_runs["env"])
    out = prunectl(*ONE_RUN, env=env, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    [line] = _error_lines(out.stderr)
    assert line.startswith("error: test-parent@v001 failed: ") and "ValueError" in line and "log: " in line
    assert "Traceback" not in out.stderr
    m = manifest(runs, "test-parent")  # the job died before its stage started: the CLI marked it failed
    assert m["status"] == "failed" and m["note"].startswith("the job ended without finishing: ValueError")

    makefile = tmp_path / "Makefile"
    makefile.write_text(f"all:\n\t{sys.executable} -m prunectl {' '.join(ONE_RUN)} --new\n\ttouch {tmp_path}/after\n")
    made = subprocess.run(["make", "-f", str(makefile)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert made.returncode != 0 and not (tmp_path / "after").exists(), made.stdout + made.stderr


def test_the_debug_executor_reports_one_line_and_never_opens_pdb(fresh_runs):
    env = _crash_in_job(fresh_runs["env"])
    out = prunectl("pretrain", "test-parent", "--executor", "debug", env=env, check=False, stdin=subprocess.DEVNULL)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "(Pdb)" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert _error_lines(out.stderr)[-1].startswith("error: test-parent@v001 failed: ")
    assert manifest(fresh_runs["runs"], "test-parent")["status"] == "failed"


@pytest.mark.slow  # two pretrain jobs
def test_a_kill_in_the_publication_window_is_finished_on_rerun_and_a_damaged_final_is_redone(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    old_umask = os.umask(0o022)
    try:
        prunectl(*ONE_RUN, env=env)
    finally:
        os.umask(old_umask)
    run = store.Run(runs, "test-parent", 1)
    # every file of a run shares the mode open() gives under the umask: a colleague can read them all
    modes = {str(p.relative_to(run.dir)): oct(p.stat().st_mode & 0o777) for p in run.dir.rglob("*")
             if p.is_file() and not p.is_symlink() and "logs" not in p.parts}
    assert set(modes.values()) == {"0o644"}, modes
    metrics_before = (run.dir / "metrics.jsonl").read_text()
    summary = run.manifest().summary

    # killed after final/ was renamed into place, before the manifest said complete
    run.update(status="running", finished=None, note=None)
    out = prunectl(*ONE_RUN, env=env)
    assert "resuming test-parent@v001" in out.stdout and "complete test-parent@v001" in out.stdout
    m = run.manifest()
    assert m.status == "complete" and "completed on resubmission" in m.note and m.summary == summary
    assert (run.dir / "metrics.jsonl").read_text() == metrics_before  # verified, not retrained
    assert len(m.job_ids) == 2

    # a damaged final/ (truncated weights) and a half-written staging dir: cleaned and redone
    weights = run.final / "model.safetensors"
    reference = weights.read_bytes()
    weights.write_bytes(reference[: len(reference) // 2])
    (run.dir / "final.partial").mkdir()
    (run.dir / "final.partial" / "junk").write_text("half")
    run.update(status="running", finished=None, note=None)
    prunectl(*ONE_RUN, env=env)
    m = run.manifest()
    assert m.status == "complete" and not (m.note or "").startswith("completed on resubmission")
    assert store.verify_published(run.final) is None and weights.read_bytes() == reference  # same seed, same model
    assert not (run.dir / "final.partial").exists()


@pytest.mark.slow  # eight CLIs at once, then one pretrain job
def test_concurrent_resubmissions_never_write_into_one_directory(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    assert prunectl(*ONE_RUN, env=_crash_in_job(env), check=False).returncode == 1  # an interrupted v001
    procs = [subprocess.Popen([sys.executable, "-m", "prunectl", *ONE_RUN], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(8)]
    outs = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    winners = [o for o in outs if o[0] == 0]
    refused = [o for o in outs if o[0] == 2]
    assert len(winners) + len(refused) == 8, [o[0] for o in outs]
    resumed = [o for o in outs if "resuming test-parent@v001" in o[1]]
    assert len(resumed) == 1 and len(winners) == 1, [(o[0], o[2][-300:]) for o in outs]
    for code, _, err in refused:
        [line] = _error_lines(err)
        assert line.startswith("error: test-parent@v001: ") and ("resubmitting it right now" in line or "owned by job" in line)
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete" and len(m["job_ids"]) == 2  # the crashed job, then exactly one more
    assert [p.name for p in (runs / "test-parent").iterdir() if p.name.startswith("v")] == ["v001"]


def test_status_shows_the_owner_of_a_run_being_written(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    run = store.allocate(runs, "owned-run")
    run.write_manifest(store.Manifest(name="owned-run", version=1, stage="pretrain", status="running",
                                      executor="local", job_ids=["999999999"], pid=999999999))
    [row] = json.loads(prunectl("status", "owned-run", "--json", env=env).stdout)
    assert row["state"] == "running (lost)" and row["owner"] == ""
    with store.file_lock(run.dir / ".owner.lock", wait=False) as got:  # a live writer holds it
        assert got
        [row] = json.loads(prunectl("status", "owned-run", "--json", env=env).stdout)
    assert row["state"] == "running" and row["owner"].startswith("job 999999999")


def _start(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prunectl", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {metrics} after {timeout} s")


@pytest.mark.slow  # a pretrain job per signal
@pytest.mark.parametrize("how", ["SIGUSR2 to the CLI", "SIGTERM to the CLI", "Ctrl-C at the terminal"])
def test_a_signal_to_the_cli_stops_the_ranks_cleanly_with_a_checkpoint(fresh_runs, how):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    args = [*ONE_RUN, "train.tokens=1048576", "train.log_every=1", "train.checkpoint_every=0"]
    proc = _start(args, env, start_new_session=True)
    run_dir = runs / "test-parent" / "v001"
    _wait_for_step(run_dir, 3)
    pid = manifest(runs, "test-parent")["pid"]  # rank 0
    if how == "Ctrl-C at the terminal":
        os.killpg(proc.pid, signal.SIGINT)  # a terminal signals the whole foreground process group
    else:
        proc.send_signal(signal.SIGUSR2 if "USR2" in how else signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err and _error_lines(err)[-1].startswith("error: test-parent@v001 failed: stopped by SIGTERM")
    m = manifest(runs, "test-parent")
    step = int(m["note"].split(" at step ")[1].split(";")[0])
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert m["status"] == "failed" and latest["step"] == step  # a checkpoint at the step it stopped
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


@pytest.mark.slow  # one pretrain job
def test_disk_full_while_training_fails_the_run_in_one_line(fresh_runs):
    """A file-size limit makes every large write fail like a full disk (Python ignores SIGXFSZ: the write raises)."""
    runs, env = fresh_runs["runs"], fresh_runs["env"]

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = subprocess.run([sys.executable, "-m", "prunectl", *ONE_RUN], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600, preexec_fn=small_files)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    line = _error_lines(out.stderr)[-1]
    assert line.startswith("error: test-parent@v001 failed: ") and "File too large" in line, line
    m = manifest(runs, "test-parent")
    assert m["status"] == "failed" and "File too large" in m["note"]
    assert not (runs / "test-parent" / "v001" / "final").exists()


@pytest.mark.slow  # two short prefix runs
def test_a_diverging_lr_in_a_sweep_loses_instead_of_failing_the_sweep(fresh_runs):
    env = fresh_runs["env"]
    sweep = "sweep={lrs: [3.0e-3, 1.0e20], prefix_tokens: 32768}"
    out = prunectl("pretrain", "test-parent", sweep, "--sweep", "lr", "--executor", "local", env=env)
    assert "diverged" not in out.stderr
    prefix = [manifest(fresh_runs["runs"], "test-parent-lrsweep", v) for v in (1, 2)]
    diverged = [m for m in prefix if (m["note"] or "").startswith("diverged: train: the loss is nan")]
    assert all(m["status"] == "complete" for m in prefix) and len(diverged) == 1, [m["note"] for m in prefix]
    assert "0.003" in out.stdout  # the finite one wins


def test_a_second_job_in_an_owned_run_leaves_it_untouched(tmp_path):
    from prunectl import lifecycle

    run = store.allocate(tmp_path, "owned")
    run.write_manifest(store.Manifest(name="owned", version=1, stage="pretrain", status="running", pid=1))
    before = run.manifest_path.read_text()
    with store.file_lock(run.dir / lifecycle.OWNER_LOCK, wait=False) as got:  # the owning job
        assert got
        with pytest.raises(lifecycle.Owned):
            with lifecycle.running(run, "2"):
                raise AssertionError("a second writer ran")
    assert run.manifest_path.read_text() == before
    with lifecycle.running(run, "3"):  # the owner gone (even by kill -9: the kernel drops the lock)
        assert run.manifest().status == "running" and run.manifest().job_ids == ["3"]


def test_sigterm_to_data_prepare_fails_the_run_in_one_line(workspace, tmp_path):
    runs = tmp_path / "runs"
    env = {**workspace["env"], "PRUNECTL_RUNS": str(runs)}
    proc = _start(["data", "prepare", str(workspace["recipes"] / "data.yaml")], env)
    deadline = time.monotonic() + 120
    while not list(runs.glob("test-data/v001/manifest.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, out + err
    assert _error_lines(err) == ["error: stopped by SIGTERM"]
    m = manifest(runs, "test-data")
    assert m["status"] == "failed" and m["note"] == "Stopped: stopped by SIGTERM"

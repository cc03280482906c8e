"""Run directories: concurrent allocation, completeness, name@version resolution."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from prunectl import store
from prunectl.errors import PrunectlError


def _allocate(root, barrier, out):
    barrier.wait()  # all processes race for the next version at the same instant
    out.put(store.allocate(root, "racer").version)


def test_eight_processes_at_once_get_eight_distinct_versions(tmp_path):
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_allocate, args=(tmp_path, barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = sorted(out.get(timeout=5) for _ in procs)
    assert got == list(range(1, 9))
    assert sorted(p.name for p in (tmp_path / "racer").iterdir()) == [f"v{i:03d}" for i in range(1, 9)]


def _run(root, name, status):
    run = store.allocate(root, name)
    run.write_manifest(store.Manifest(name=name, version=run.version, stage="pretrain", status=status))
    return run


def test_latest_is_the_newest_complete_version(tmp_path):
    first = _run(tmp_path, "m", "complete")
    _run(tmp_path, "m", "complete")
    third = _run(tmp_path, "m", "failed")
    _run(tmp_path, "m", "running")
    store.allocate(tmp_path, "m")  # killed before it wrote a manifest
    assert store.resolve(tmp_path, "m@latest").version == 2
    assert store.resolve(tmp_path, "m").version == 2
    assert store.resolve(tmp_path, "m@v001") == first
    with pytest.raises(PrunectlError, match="m@v003: is failed, not complete"):
        store.resolve(tmp_path, third.ref)
    with pytest.raises(PrunectlError, match="no such version"):
        store.resolve(tmp_path, "m@v042")
    with pytest.raises(PrunectlError, match="no runs named 'other'"):
        store.resolve(tmp_path, "other@latest")


def test_a_run_killed_before_completion_never_looks_complete(tmp_path):
    run = _run(tmp_path, "k", "running")
    (run.dir / "final.partial").mkdir()
    (run.dir / "final.partial" / "model.safetensors").write_bytes(b"half")
    assert not run.is_complete()
    with pytest.raises(PrunectlError, match="no complete version"):
        store.resolve(tmp_path, "k@latest")


def test_manifest_write_is_atomic(tmp_path):
    run = _run(tmp_path, "a", "pending")
    run.update(status="running", note="x")
    assert run.manifest().status == "running"
    assert [p.name for p in run.dir.iterdir() if not p.name.endswith(".lock")] == ["manifest.json"]  # no temporary file left

"""Data at scale: ranges independent of the split into tasks, resumable tasks, the tokenize array on Slurm."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunectl import data, store, submission
from prunectl.recipe import resolve

from .conftest import REPO, manifest, prunectl

WORDS = ("the quick brown fox jumps over a lazy dog while seven ravens watch from an old oak near the river "
         "and a cold wind moves the grass").split()


def _corpus(folder: Path, files: int = 5, docs: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines = [json.dumps({"text": " ".join(WORDS[(f * 7 + i * 3 + j * j) % len(WORDS)] for j in range(20 + i % 30))})
                 for i in range(docs)]
        (folder / f"part-{f:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _recipe(tmp_path: Path, corpus: Path, extra: str = "") -> Path:
    path = tmp_path / "scale.yaml"
    path.write_text(f"name: scale\nstage: data\ndata:\n  sources: [{{kind: jsonl, path: '{corpus}/*.jsonl'{extra}}}]\n"
                    "  tokenizer: {vocab_size: 300}\n  doc_chars: 100\n"
                    "  choice_task: {items: 20, context_words: 8, ending_words: 4}\n")
    return path


def _tree(folder: Path) -> dict[str, bytes]:
    """The token files and the parts of data.json that say what they hold."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "tokens").rglob("*.bin"))}
    return {**files, "data.json": (folder / "data.json").read_bytes(),
            "tasks": (folder / "tasks" / "continuation.jsonl").read_bytes()}


def test_ranges_do_not_depend_on_the_split_into_tasks(tmp_path):
    config = resolve(str(_recipe(tmp_path, _corpus(tmp_path / "corpus")))).data
    one = tmp_path / "one"
    data.prepare(config, one)
    three = tmp_path / "three"
    data.write_tokenizer(config, three)
    for task in (2, 0, 1):  # any order, any number of tasks
        data.tokenize_task(config, three, task, 3)
    data.finalize(config, three)
    assert _tree(one) == _tree(three)

    meta = json.loads((one / "data.json").read_text())
    assert meta["schema_version"] == 2 and meta["units"] == 5 and meta["documents"] == 200
    for name, r in meta["ranges"].items():
        assert r["end"] - r["start"] == sum(f["tokens"] for f in r["files"]) > 0
        assert [f["file"] for f in r["files"]] == sorted(f["file"] for f in r["files"])  # unit order
        assert all((one / f["file"]).stat().st_size == f["tokens"] * 2 for f in r["files"])  # uint16
    # a document's range is a function of its text alone: the in-memory dealing agrees with the files
    docs = data.read_documents(config)
    dealt = data.deal_ranges(docs, config.ranges, config.seed)
    assert {n: len(d) for n, d in dealt.items()} == {n: r["docs"] for n, r in meta["ranges"].items()}
    stream = data.TokenStream(one)
    val = stream.range("validation")
    assert stream.read(val.start, len(val)).tolist() == [
        t for ids in data.encode(data.load_tokenizer(one), dealt["validation"]) for t in ids.tolist()]


def test_max_docs_is_split_evenly_over_a_sources_units(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    config = resolve(str(_recipe(tmp_path, corpus, ", max_docs: 12"))).data
    assert [u.max_docs for u in data.units(config)] == [3, 3, 2, 2, 2]
    assert len(data.read_documents(config)) == 12


def test_saved_dataset_units_are_row_blocks(tmp_path, monkeypatch):
    import datasets

    rows = [{"text": f"document {i} " + " ".join(WORDS[: 5 + i % 9])} for i in range(50)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setattr(data, "HF_BLOCK_ROWS", 16)
    config = data.DataConfig(sources=[data.SourceConfig(kind="hf", dataset=str(tmp_path / "saved"))])
    assert [u.where for u in data.units(config)] == [("rows", 0, 16), ("rows", 16, 32), ("rows", 32, 48), ("rows", 48, 50)]
    assert data.read_documents(config) == [r["text"] for r in rows]


def test_a_streamed_dataset_has_a_unit_per_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "data").mkdir()
    for f in range(3):  # a local dataset of three files: three streaming shards
        (tmp_path / "data" / f"train-{f:05d}.jsonl").write_text(
            "".join(json.dumps({"text": f"file {f} document {i}"}) + "\n" for i in range(4)))
    config = data.DataConfig(sources=[data.SourceConfig(kind="hf", dataset=str(tmp_path), max_docs=7)])
    found = data.units(config)
    assert [(u.where, u.max_docs) for u in found] == [(("shard", 0, 3), 3), (("shard", 1, 3), 2), (("shard", 2, 3), 2)]
    assert sorted(data.read_documents(config)) == sorted(
        [f"file 0 document {i}" for i in range(3)] + [f"file {f} document {i}" for f in (1, 2) for i in range(2)])


def test_a_failed_task_is_resumed_without_redoing_its_finished_units(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "corpus")
    recipe = resolve(str(_recipe(tmp_path, corpus)), ["data.workers=2"])
    runs = tmp_path / "runs"
    monkeypatch.setenv(data.STOP_ENV, "1")  # every task raises after its first unit, as if killed
    run, _ = submission.submit_data(runs, recipe, "debug", None, False, lambda line: None)
    m = manifest(runs, "scale")
    assert m["status"] == "failed" and data.STOP_ENV in m["note"]
    done = {p.name: p.stat().st_mtime_ns for p in (run.dir / "units").iterdir()}
    assert sorted(done) == ["000000.json", "000001.json"]

    monkeypatch.delenv(data.STOP_ENV)
    lines: list[str] = []
    again, _ = submission.submit_data(runs, recipe, "debug", None, False, lines.append)
    assert again.dir == run.dir and lines[0] == "resuming scale@v001: its finished units are kept"
    assert manifest(runs, "scale")["status"] == "complete"
    assert {p.name: p.stat().st_mtime_ns for p in (run.dir / "units").iterdir() if p.name in done} == done
    reference = tmp_path / "reference"
    data.prepare(recipe.data, reference)
    assert _tree(run.dir) == _tree(reference)
    assert data.TokenStream(run.dir).meta.total_tokens == store.Run.at(run.dir).manifest().summary["tokens"]


@pytest.mark.slow
def test_a_prepare_whose_task_is_killed_midway_completes_on_rerun(tmp_path):
    """The CLI as a user runs it: an array of 2 local tasks; one task's process is SIGKILLed after its first unit
    (as by the OOM killer). The run fails in one line; the rerun, with another worker count, resumes the same
    version, keeps the finished units and gives the same bytes as an uninterrupted prepare."""
    corpus = _corpus(tmp_path / "corpus", files=8, docs=15000)  # about a second a unit
    recipe = _recipe(tmp_path, corpus)
    runs = tmp_path / "runs"
    env = {**os.environ, "PRUNECTL_RUNS": str(runs), "PYTHONUNBUFFERED": "1"}
    cli = subprocess.Popen([sys.executable, "-m", "prunectl", "data", "prepare", str(recipe), "data.workers=2"],
                           env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    units = runs / "scale" / "v001" / "units"
    deadline = time.monotonic() + 120
    while not any(units.glob("*.json")) and time.monotonic() < deadline:  # a unit is done: the tasks are running
        time.sleep(0.05)
    pattern = f"submitit.core._submit {runs / 'scale' / 'v001' / 'logs'}"
    workers = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert workers, "the tokenize tasks ended before one could be killed"
    os.kill(int(workers[0]), signal.SIGKILL)
    out, err = cli.communicate(timeout=300)
    assert cli.returncode == 1 and err.startswith("error: scale@v001 failed: the job ended without finishing"), err
    assert "the same command resumes it, keeping the finished units" in err and len(err.splitlines()) == 1
    m = manifest(runs, "scale")
    assert m["status"] == "failed"
    kept = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    assert 0 < len(kept) < 8

    again = prunectl("data", "prepare", str(recipe), "data.workers=3", env=env)
    assert "resuming scale@v001" in again.stdout and manifest(runs, "scale")["status"] == "complete"
    assert not (runs / "scale" / "v002").exists()
    assert {p.name: p.stat().st_mtime_ns for p in units.iterdir() if p.name in kept} == kept  # not redone
    reference = tmp_path / "reference"
    data.prepare(resolve(str(recipe)).data, reference)
    assert _tree(runs / "scale" / "v001") == _tree(reference)
    again = prunectl("data", "prepare", str(recipe), "data.workers=1", env=env)  # complete: reused at any worker count
    assert "already holds this exact recipe" in again.stdout


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


@pytest.mark.slurm
@pytest.mark.slow
def test_two_tokenize_tasks_run_as_one_slurm_array(tmp_path):
    if not _cluster_up():
        if os.environ.get("PRUNECTL_REQUIRE_SLURM") == "1":
            raise RuntimeError("the local Slurm cluster is not up: run `bash slurm/local-cluster.sh up`")
        pytest.skip("no local Slurm cluster (bash slurm/local-cluster.sh up)")
    recipe = _recipe(tmp_path, _corpus(tmp_path / "corpus"))
    env = {**os.environ, "PRUNECTL_RUNS": str(tmp_path / "runs")}
    args = ("data", "prepare", str(recipe), "data.workers=2", "--executor", "slurm", "--profile", "local", "--wait")
    out = prunectl(*args, env={**env, data.STOP_ENV: "1"}, check=False)  # both tasks fail after their first unit
    assert out.returncode == 1 and manifest(tmp_path / "runs", "scale")["status"] == "failed"
    finalize = manifest(tmp_path / "runs", "scale")["job_ids"][-1]
    squeue = subprocess.run(["squeue", "-h", "-j", finalize], capture_output=True, text=True)
    assert finalize not in squeue.stdout  # cancelled with its failed dependency, not pending for ever

    out = prunectl(*args, env=env)
    assert "resuming scale@v001" in out.stdout
    m = manifest(tmp_path / "runs", "scale")
    assert m["status"] == "complete" and m["executor"] == "slurm"
    tokenizer, *tasks, finalize = m["job_ids"][-4:]
    array = tasks[0].split("_")[0]
    assert tokenizer.isdigit() and finalize.isdigit() and tasks == [f"{array}_0", f"{array}_1"]
    reference = tmp_path / "reference"
    data.prepare(resolve(str(recipe)).data, reference)
    assert _tree(tmp_path / "runs" / "scale" / "v001") == _tree(reference)


def test_a_data_run_of_the_previous_layout_still_reads(tmp_path):
    """Schema 1: `shards` of tokens/00000.bin, 00001.bin... holding the ranges one after another."""
    import numpy as np

    (tmp_path / "tokens").mkdir()
    np.arange(0, 100, dtype=np.uint16).tofile(tmp_path / "tokens" / "00000.bin")
    np.arange(100, 120, dtype=np.uint16).tofile(tmp_path / "tokens" / "00001.bin")
    (tmp_path / "data.json").write_text(json.dumps({
        "dtype": "uint16", "shard_tokens": 100, "shards": [100, 20], "total_tokens": 120,
        "ranges": {"validation": {"start": 0, "end": 20, "docs": 2, "chars": 90},
                   "pretrain": {"start": 20, "end": 120, "docs": 9, "chars": 400}},
        "tokenizer": {"kind": "bpe", "vocab_size": 1024}, "documents": 11, "unigram_entropy_nats": 5.5, "seed": 0}))
    stream = data.TokenStream(tmp_path)
    assert stream.meta.schema_version == 1 and stream.range("pretrain") == data.TokenRange("pretrain", 20, 120)
    assert stream.read(95, 10).tolist() == list(range(95, 105))  # across the shard boundary


def test_a_data_runs_identity_leaves_out_how_its_work_is_split(tmp_path):
    from prunectl.recipe import dump, identity

    path = _recipe(tmp_path, tmp_path)
    one = dump(resolve(str(path)))
    assert identity(dump(resolve(str(path), ["data.workers=64", "launch.cpus_per_task=16"]))) == identity(one)
    assert identity(dump(resolve(str(path), ["data.seed=1"]))) != identity(one)  # what it makes still counts

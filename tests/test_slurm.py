"""Real jobs on the local Slurm cluster (slurm/local-cluster.sh up): multi-rank ZeRO, a job array, a requeue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from .conftest import manifest, prunectl


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


if not _cluster_up():
    if os.environ.get("PRUNECTL_REQUIRE_SLURM") == "1":
        raise RuntimeError("the local Slurm cluster is not up: run `bash slurm/local-cluster.sh up`")
    pytest.skip("no local Slurm cluster (bash slurm/local-cluster.sh up)", allow_module_level=True)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # real jobs, minutes each
SLURM = ["--executor", "slurm", "--profile", "local"]


def test_two_rank_zero2_pretrain_through_slurm(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    out = prunectl("pretrain", "test-parent", "launch.tasks_per_node=2", "launch.cpus_per_task=1",
                   "train.tokens=65536", *SLURM, "--wait", env=env)
    assert "submitted test-parent@v001 as job" in out.stdout
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete" and m["executor"] == "slurm"
    assert m["summary"]["world_size"] == 2 and m["data"]["tokens"] == 65536
    assert m["job_ids"][0].isdigit()
    assert m["summary"]["final_val_loss"] < m["summary"]["unigram_entropy_nats"]
    assert (runs / "test-parent" / "v001" / "final" / "model.safetensors").exists()
    assert len(list((runs / "test-parent" / "v001" / "logs").rglob("*_log.out"))) == 2  # one log per rank


def test_job_array_gives_one_run_per_value(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    prunectl("pretrain", "test-parent", "train.tokens=16384", "--array", "train.seed=0,1", *SLURM, "--wait", env=env)
    first, second = manifest(runs, "test-parent", 1), manifest(runs, "test-parent", 2)
    assert first["status"] == second["status"] == "complete"
    array_id = first["job_ids"][0].split("_")[0]
    assert {first["job_ids"][0], second["job_ids"][0]} == {f"{array_id}_0", f"{array_id}_1"}
    seeds = {json.loads(json.dumps(m["data"]))["seed"] for m in (first, second)}
    assert seeds == {0, 1}
    rows = json.loads(prunectl("status", "test-parent", "--json", env=env).stdout)
    assert [(r["run"], r["status"]) for r in rows] == [("test-parent@v001", "complete"), ("test-parent@v002", "complete")]


def test_preemption_signal_saves_requeues_and_finishes(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    prunectl("pretrain", "test-parent", "train.tokens=196608", "train.checkpoint_every=1000", *SLURM, env=env)
    run_dir = runs / "test-parent" / "v001"
    job_id = manifest(runs, "test-parent")["job_ids"][0]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    assert metrics.exists(), "training never started"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what Slurm sends before preemption
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and manifest(runs, "test-parent")["status"] != "complete":
        time.sleep(1)
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete", m
    assert m["resumed_from"] and 0 < m["resumed_from"][0] < m["summary"]["steps"]  # saved on the signal, not at a periodic checkpoint
    assert m["job_ids"] == [job_id]  # the same job, requeued
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # no step logged twice across the requeue


def test_prune_through_slurm_and_a_ratio_sweep_as_one_array(pruned, workspace):
    runs, env = workspace["runs"], workspace["env"]
    prunectl("prune", "test-prune-wanda", "--new", *SLURM, "--wait", env=env)
    m = manifest(runs, "test-prune-wanda", 2)
    assert m["status"] == "complete" and m["executor"] == "slurm" and m["job_ids"][0].isdigit()
    report = json.loads((runs / "test-prune-wanda" / "v002" / "report.json").read_text())
    assert report["achieved_ratio"] == pytest.approx(0.5) and (runs / "test-prune-wanda" / "v002" / "final" /
                                                              "masks.safetensors").exists()

    out = prunectl("prune", "test-prune-depth", "--array", "prune.ratio=0.25,0.5", *SLURM, "--wait", env=env)
    assert out.stdout.count("submitted test-prune-depth@") == 2
    layers = []
    for version in (2, 3):
        m = manifest(runs, "test-prune-depth", version)
        assert m["status"] == "complete" and "_" in m["job_ids"][0]  # array task ids: <job>_<index>
        layers.append(m["summary"]["architecture"]["after"]["layers"])
    assert layers[0] > layers[1]  # the smaller ratio keeps more layers


def test_distilled_sparse_retrain_through_slurm_survives_preemption(study):
    runs, env = study["runs"], study["env"]
    (study["recipes"] / "retrain-kd-slurm.yaml").write_text(
        "extends: _retrain.yaml\nname: test-retrain-kd-slurm\ninit: test-prune-sparsegpt-24@latest\n"
        "distill: {alpha: 0.5, temperature: 2.0}\ntrain: {tokens: 131072, checkpoint_every: 1000}\n")
    prunectl("retrain", "test-retrain-kd-slurm", *SLURM, env=env)
    run_dir = runs / "test-retrain-kd-slurm" / "v001"
    job_id = manifest(runs, "test-retrain-kd-slurm")["job_ids"][0]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    assert metrics.exists(), "training never started"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and manifest(runs, "test-retrain-kd-slurm")["status"] != "complete":
        time.sleep(1)
    m = manifest(runs, "test-retrain-kd-slurm")
    assert m["status"] == "complete" and m["executor"] == "slurm" and m["job_ids"] == [job_id], m
    assert m["resumed_from"] and 0 < m["resumed_from"][0] < m["summary"]["steps"]
    assert m["inputs"]["teacher"] == "test-prune-parent@v001" and m["summary"]["masked_nonzero"] == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert all("kd_loss" in r for r in logged)  # both loss terms recorded
    assert [r["step"] for r in logged] == sorted({r["step"] for r in logged})


def test_lr_sweep_goes_out_as_one_job_array_and_the_winner_is_recorded(study):
    runs, env = study["runs"], study["env"]
    (study["recipes"] / "retrain-swept.yaml").write_text(
        "extends: _retrain.yaml\nname: test-retrain-swept\ninit: test-prune-depth@latest\n"
        "sweep: {lrs: [1.0e-4, 3.0e-3], prefix_tokens: 8192, parallelism: 2}\n")
    out = prunectl("retrain", "test-retrain-swept", "--sweep", "lr", *SLURM, "--wait", env=env)
    prefix = [manifest(runs, "test-retrain-swept-lrsweep", v) for v in (1, 2)]
    assert all(m["status"] == "complete" and m["data"]["tokens"] == 8192 for m in prefix)
    array_id = prefix[0]["job_ids"][0].split("_")[0]
    assert [m["job_ids"][0] for m in prefix] == [f"{array_id}_0", f"{array_id}_1"]  # one real job array
    losses = {m["summary"]["final_train_loss"]: v for v, m in zip((1e-4, 3e-3), prefix)}
    best = losses[min(losses)]
    assert "chosen" in out.stdout

    out = prunectl("retrain", "test-retrain-swept", *SLURM, "--wait", env=env)
    assert f"peak LR {best:g}" in out.stdout
    m = manifest(runs, "test-retrain-swept")
    assert m["status"] == "complete" and m["lr_sweep"]["chosen_lr"] == best
    assert set(m["lr_sweep"]["runs"].values()) == {"test-retrain-swept-lrsweep@v001", "test-retrain-swept-lrsweep@v002"}
    import yaml

    assert yaml.safe_load((runs / "test-retrain-swept" / "v001" / "recipe.yaml").read_text())["optimizer"]["lr"] == best
    rows = {r["run"]: r for r in json.loads(prunectl("status", "test-retrain-swept", "--json", env=env).stdout)}
    assert rows["test-retrain-swept@v001"]["lr"] == f"{best:g} (by sweep)" and "test-retrain-swept-lrsweep@v002" in rows


def test_eval_of_several_runs_goes_out_as_one_slurm_array(pruned, workspace):
    import textwrap

    from .test_eval import EVAL

    runs, env = workspace["runs"], workspace["env"]
    (workspace["recipes"] / "eval.yaml").write_text(textwrap.dedent(EVAL))
    out = prunectl("eval", "test-eval", "eval.batch_size=4", "--array", "run=test-prune-parent@latest,test-prune-flap@latest",
                   *SLURM, "--wait", env=env)
    ids = [line.split(" as job ")[1].split()[0] for line in out.stdout.splitlines() if " as job " in line]
    assert len(ids) == 2 and ids[0].endswith("_0") and ids[1].endswith("_1")  # one real job array
    for name in ("test-prune-parent", "test-prune-flap"):
        found = [json.loads(p.read_text()) for p in (runs / name / "v001" / "eval").glob("*.json")]
        mine = [r for r in found if r["config"]["batch_size"] == 4]
        assert len(mine) == 1 and mine[0]["zero_shot"]["tasks"]["test-data-continuation"]["n"] > 0
        assert mine[0]["heldout"]["tokens"] > 0


STUDY_FILES = {
    # prepared by the study itself: a tokenizer job, an array of 2 tokenize tasks, a finalize job
    "data.yaml": "extends: {recipes}/data.yaml\nname: st-data\ndata: {{workers: 2}}\nlaunch: {{cpus_per_task: 1, time_min: 15}}\n",
    "parent.yaml": "extends: {recipes}/parent.yaml\nname: st-parent\ndata: st-data@latest\ntrain: {{tokens: 32768}}\n"
                   "launch: {{cpus_per_task: 1}}\n"
                   "model: {{layers: 4, hidden: 64, heads: 4, kv_heads: 2, ffn: 192, max_position: 256, tie_embeddings: true}}\n",
    "_prune.yaml": "stage: prune\nparent: st-parent@latest\n"
                   "calibration: {{range: calibration, samples: 16, seq_len: 64, micro_batch: 16}}\n"
                   "heldout: {{range: validation, tokens: 8192, seq_len: 64}}\nlaunch: {{cpus_per_task: 1, time_min: 15}}\n",
    "prune-depth.yaml": "extends: _prune.yaml\nname: st-depth\nprune: {{method: minitron-depth, ratio: 0.5}}\n",
    "prune-wanda.yaml": "extends: _prune.yaml\nname: st-wanda\nprune: {{method: wanda, ratio: 0.5}}\n",
    # infeasible on this parent (embeddings are most of it): found when its job starts, and only its branch fails
    "prune-depth-90.yaml": "extends: _prune.yaml\nname: st-depth-90\nprune: {{method: minitron-depth, ratio: 0.9}}\n",
    "retrain-depth-90.yaml": "extends: retrain-depth.yaml\nname: st-depth-90-r\ninit: st-depth-90@latest\n",
    "_train.yaml": "train: {{tokens: 16384, data_ranges: [retrain], seq_len: 64, global_batch: 16, micro_batch: 16, "
                   "zero_stage: 2, checkpoint_every: 0, eval_every: 0, eval_tokens: 4096, log_every: 8}}\n"
                   "launch: {{cpus_per_task: 1, time_min: 15}}\n",
    "retrain-depth.yaml": "extends: _train.yaml\nstage: retrain\nname: st-depth-r\ninit: st-depth@latest\noptimizer: {{lr: 1.0e-3}}\n",
    "retrain-wanda.yaml": "extends: _train.yaml\nstage: retrain\nname: st-wanda-r\ninit: st-wanda@latest\noptimizer: {{lr: 1.0e-3}}\n",
    "twin-depth.yaml": "extends: _train.yaml\nstage: pretrain\nname: st-depth-s\ndata: st-data@latest\nlike: st-depth@latest\n",
    "twin-wanda.yaml": "extends: _train.yaml\nstage: pretrain\nname: st-wanda-s\ndata: st-data@latest\nlike: st-wanda@latest\n",
    "eval.yaml": "name: st-eval\nstage: eval\nrun: st-parent@latest\n"
                 "eval: {{heldout: {{range: validation, tokens: 8192, seq_len: 64}}, batch_size: 16}}\n"
                 "launch: {{cpus_per_task: 1, time_min: 15}}\n",
    "study.yaml": "name: st\nstage: study\ndata: [data.yaml]\nparent: parent.yaml\neval: eval.yaml\nmethods:\n"
                  "  - {{label: depth, prune: prune-depth.yaml, retrain: [retrain-depth.yaml], scratch: [twin-depth.yaml]}}\n"
                  "  - {{label: wanda, prune: prune-wanda.yaml, retrain: [retrain-wanda.yaml], scratch: [twin-wanda.yaml]}}\n"
                  "  - {{label: depth-90, prune: prune-depth-90.yaml, retrain: [retrain-depth-90.yaml]}}\n"
                  "launch: {{cpus_per_task: 1, time_min: 15}}\n",
}


def test_a_study_goes_out_at_once_chained_by_dependencies_and_completes(fresh_runs, tmp_path):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    for name, text in STUDY_FILES.items():
        (tmp_path / name).write_text(text.format(recipes=fresh_runs["recipes"]))
    study = str(tmp_path / "study.yaml")
    out = prunectl("study", study, *SLURM, env=env, timeout=120)  # returns once everything is queued
    jobs = {tuple(line.split()[1:3]): line for line in out.stdout.splitlines() if line.startswith("submitted ")}
    assert len(jobs) == 17  # the data, parent, 3 prunes, 3 retrains, 2 twins, 6 evals, the compare
    tokenize = next(line for line in out.stdout.splitlines() if line.startswith("data st-data@v001 tokenize: job "))
    assert tokenize.count("_") == 2  # one real array of two tasks, queued behind the tokenizer job
    finalize = jobs[("data", "st-data@v001")].split(" as job ")[1].split()[0]
    assert jobs[("parent", "st-parent@v001")].endswith(f"(after jobs {finalize})")  # the parent waits for the data
    parent_job = jobs[("parent", "st-parent@v001")].split(" as job ")[1].split()[0]
    assert f"(after jobs {parent_job})" in jobs[("prune", "st-depth@v001")]  # the prune array waits for the parent
    assert "after jobs" in jobs[("retrain", "st-depth-r@v001")] and "after jobs" in jobs[("compare", "st-compare@v001")]

    deadline = time.monotonic() + 540
    while time.monotonic() < deadline and manifest(runs, "st-compare")["status"] in ("pending", "running"):
        time.sleep(3)
    compare = manifest(runs, "st-compare")
    assert compare["status"] == "complete", compare
    assert compare["summary"]["finding_1"] == {"depth": True, "wanda": True}
    assert "infeasible for depth pruning" in manifest(runs, "st-depth-90")["note"]
    assert manifest(runs, "st-depth-90-r")["note"].startswith("init: st-depth-90@v001: is failed")
    assert compare["summary"]["left_out"] == ["depth-90: st-depth-90-r@v001: is failed, not complete; use a complete "
                                              "version or @latest"]
    for name in ("st-depth-r", "st-depth-s", "st-wanda-r", "st-wanda-s"):
        assert manifest(runs, name)["executor"] == "slurm" and manifest(runs, name)["data"]["tokens"] == 16384
    assert manifest(runs, "st-wanda-r")["inputs"]["init"] == "st-wanda@v001"  # pinned, then checked at job start
    assert (runs / "st-compare" / "v001" / "model_sizes.png").exists()

    nodes = json.loads(prunectl("status", "st", "--json", env=env).stdout)["nodes"]
    states = [n["state"].split()[0] for n in nodes]
    assert (states.count("complete"), states.count("failed")) == (14, 3), nodes
    assert manifest(runs, "st-data")["executor"] == "slurm" and len(manifest(runs, "st-data")["job_ids"]) == 4
    assert next(n for n in nodes if n["label"] == "eval of st-wanda-s@v001")["state"] == "complete"

    (tmp_path / "study.yaml").write_text(STUDY_FILES["study.yaml"].format().replace(
        "  - {label: depth-90, prune: prune-depth-90.yaml, retrain: [retrain-depth-90.yaml]}\n", ""))
    again = prunectl("study", study, *SLURM, "--wait", env=env, timeout=300)  # only the compare runs again
    assert "reusing 8 complete run(s) of these exact recipes and 5 stored eval result(s)" in again.stdout
    assert [line.split()[2] for line in again.stdout.splitlines() if line.startswith("submitted ")] == ["st-compare@v002"]
    assert "eval of st-wanda-s@v001" in again.stdout and "tables and figures in" in again.stdout
    assert "Finding 1: the pruned initialisation beats its scratch twin" in again.stdout

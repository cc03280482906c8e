"""study: the graph a submission would queue (dry run, on any machine) and the mistakes it refuses up front."""

from __future__ import annotations

import json
import os

import pytest

from .conftest import REPO, manifest, prunectl, refused


def test_paper_study_dry_run_prints_the_whole_graph_and_every_batch_script(tmp_path):
    env = {**os.environ, "PRUNECTL_RUNS": str(tmp_path / "runs")}
    args = ("study", "recipes/paper/study.yaml", "--executor", "slurm", "--dry-run")
    plan = json.loads(prunectl(*args, "--json", env=env, timeout=300).stdout)
    groups = [n["group"] for n in plan["nodes"] if n["state"] == "planned"]
    assert len(groups) == len(plan["nodes"])  # nothing exists yet: every node is planned
    # parent; 8 methods at 50% + the 6 ratio-ablation prunes; 8 x (5 R_N + 5 S_N + S_total) + 6 x (R50 + S50)
    assert groups.count("parent") == 1 and groups.count("prune") == 14
    assert groups.count("retrain") == 8 * 5 + 6 and groups.count("scratch") == 8 * 6 + 6
    assert groups.count("sweep") == 5 * (groups.count("retrain") + groups.count("scratch"))  # one prefix run per peak LR
    assert groups.count("eval") == 1 + groups.count("retrain") + groups.count("scratch") and groups.count("compare") == 1
    scripts = [a["batch_script"] for a in plan["arrays"]]
    assert len(scripts) >= 7 and all(s.startswith("#!/bin/bash") for s in scripts)  # sheared-llama's prune: its own
    assert sorted(k for a in plan["arrays"] for k in a["nodes"]) == sorted(n["key"] for n in plan["nodes"])
    parent_title = next(a["title"] for a in plan["arrays"] if a["title"].startswith("parent"))
    assert parent_title.endswith("GiB per GPU of 80") and "memory at most ~" in parent_title  # the preflight's estimate
    assert any("#SBATCH --dependency='afterany:<job ids of data/paper-c4-calibration, data/paper-data, "
               "parent/paper-parent>'" in s for s in scripts)  # a prune array waits for its parent and its data
    assert all("#SBATCH --gpus-per-node=8" in s for s, a in zip(scripts, plan["arrays"]) if a["title"].startswith("parent"))
    data = [n for n in plan["nodes"] if n["group"] == "data"]  # prepared by the study's own jobs, first
    assert [n["ref"] for n in data] == ["paper-data@vNNN", "paper-c4-calibration@vNNN", "paper-wikitext103-calibration@vNNN"]
    parent = next(n for n in plan["nodes"] if n["group"] == "parent")
    assert parent["deps"] == ["data/paper-data"] and "data=paper-data@vNNN" in parent["overrides"]
    tokenize = next(s for s, a in zip(scripts, plan["arrays"]) if a["nodes"] == ["data/paper-data"])
    assert "#SBATCH --array=0-255%64" in tokenize and "#SBATCH --partition=cpu" in tokenize
    assert "#SBATCH --dependency='afterok:<job id of its tokenizer job>'" in tokenize
    assert any("#SBATCH --dependency='afterany:<job ids of data/paper-data>'" in s for s in scripts)  # the parent
    node = next(n for n in plan["nodes"] if n["ref"] == "paper-wanda-50-r50b@vNNN")
    assert node["source"] == "recipes/paper/retrain/wanda-50-r50b.yaml" and "init=paper-wanda-50@vNNN" in node["overrides"]
    out = prunectl(*args, env=env, timeout=300).stdout  # the same plan for a person: the graph and every script
    assert out.count("#!/bin/bash") == len(scripts) and "an array of 256 tokenize tasks" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_study_mistakes_are_one_line_each_before_anything_is_written(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "PRUNECTL_RUNS": str(runs)}
    bad = tmp_path / "study.yaml"
    bad.write_text(f"name: s\nstage: study\nparent: {REPO}/recipes/tiny/parent.yaml\neval: {REPO}/recipes/tiny/eval.yaml\n"
                   f"methods:\n  - {{label: D, prune: {REPO}/recipes/tiny/retrain/wanda-50.yaml, "
                   f"retrain: [{REPO}/recipes/tiny/retrain/wanda-50.yaml]}}\n")
    err = refused(env, runs, "study", str(bad), "--dry-run")
    assert "is a retrain recipe; the study's prune entries are prune recipes" in err
    bad.write_text("name: s\nstage: study\nparent: nope.yaml\neval: eval.yaml\nmethods: []\n")
    err = refused(env, runs, "study", str(bad))
    assert err.strip().splitlines() == ["error: methods: List should have at least 1 item after validation, not 0 (got [])"]
    bad.write_text("name: s\nstage: study\nparent: nope.yaml\neval: eval.yaml\nmethods:\n"
                   "  - {label: D, prune: p.yaml, retrain: [r.yaml]}\n")
    assert refused(env, runs, "study", str(bad)).strip() == "error: nope.yaml: no such recipe file"
    err = refused(env, runs, "study", "recipes/tiny/parent.yaml")
    assert "is a pretrain recipe; `study` takes a recipe with stage: study" in err


def test_tiny_studies_plan_on_a_fresh_runs_root(tmp_path):
    env = {**os.environ, "PRUNECTL_RUNS": str(tmp_path / "runs")}
    demo = json.loads(prunectl("study", "recipes/tiny/demo.yaml", "--dry-run", "--json", env=env).stdout)["nodes"]
    assert [n["state"] for n in demo] == ["planned"] * (1 + 1 + 5 * 3 + 11 + 1)  # data; parent; 3 per method; 11 evals; compare
    twin = next(n for n in demo if n["ref"] == "demo-wanda-50-scratch@vNNN")
    assert twin["source"] == "recipes/tiny/demo/scratch-wanda-50.yaml" and "like=demo-wanda-50@vNNN" in twin["overrides"]
    assert twin["deps"] == ["data/tiny-data", "prune/demo-wanda-50"]
    full = prunectl("study", "recipes/tiny/study.yaml", "--dry-run", "--executor", "slurm", env=env).stdout
    assert "tiny-minitron-depth-50-scratch-total@vNNN" in full and "#SBATCH --dependency=" in full


LOCAL_STUDY = {
    "data.yaml": "extends: {recipes}/data.yaml\nname: ls-data\ndata: {{workers: 2}}\nlaunch: {{cpus_per_task: 1}}\n",
    "parent.yaml": "extends: {recipes}/parent.yaml\nname: ls-parent\ndata: ls-data@latest\ntrain: {{tokens: 16384}}\n"
                   "launch: {{cpus_per_task: 1}}\n",
    "prune.yaml": "stage: prune\nname: ls-wanda\nparent: ls-parent@latest\nprune: {{method: wanda, ratio: 0.5}}\n"
                  "calibration: {{range: calibration, samples: 16, seq_len: 64, micro_batch: 16}}\n"
                  "heldout: {{range: validation, tokens: 8192, seq_len: 64}}\nlaunch: {{cpus_per_task: 1}}\n",
    "_train.yaml": "train: {{tokens: 8192, data_ranges: [retrain], seq_len: 64, global_batch: 16, micro_batch: 16, "
                   "zero_stage: 2, checkpoint_every: 0, eval_every: 0, eval_tokens: 4096, log_every: 8}}\n"
                   "optimizer: {{lr: 1.0e-3}}\nlaunch: {{cpus_per_task: 1}}\n",
    "retrain.yaml": "extends: _train.yaml\nstage: retrain\nname: ls-wanda-r\ninit: ls-wanda@latest\n",
    "twin.yaml": "extends: _train.yaml\nstage: pretrain\nname: ls-wanda-s\ndata: ls-data@latest\nlike: ls-wanda@latest\n",
    "eval.yaml": "name: ls-eval\nstage: eval\nrun: ls-parent@latest\n"
                 "eval: {{heldout: {{range: validation, tokens: 8192, seq_len: 64}}, batch_size: 16}}\n",
    "study.yaml": "name: ls\nstage: study\ndata: [data.yaml]\nparent: parent.yaml\neval: eval.yaml\nmethods:\n"
                  "  - {{label: wanda, prune: prune.yaml, retrain: [retrain.yaml], scratch: [twin.yaml]}}\n",
}


@pytest.mark.slow
def test_a_local_study_prepares_its_data_as_its_first_node(workspace, tmp_path):
    runs = tmp_path / "runs"
    env = {**workspace["env"], "PRUNECTL_RUNS": str(runs)}
    for name, text in LOCAL_STUDY.items():
        (tmp_path / name).write_text(text.format(recipes=workspace["recipes"]))
    out = prunectl("study", str(tmp_path / "study.yaml"), env=env, timeout=900).stdout
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("submitted "))
    assert lines[first].startswith("submitted data ls-data@v001 as job ")  # before any stage that reads it
    assert any(line.startswith("data ls-data@v001 tokenize: job ") and line.count(",") == 1 for line in lines)
    data = manifest(runs, "ls-data")
    assert data["status"] == "complete" and len(data["job_ids"]) == 4  # tokenizer, 2 tokenize tasks, finalize
    for name in ("ls-parent", "ls-wanda-s"):
        assert manifest(runs, name)["inputs"]["data"] == "ls-data@v001"
    assert manifest(runs, "ls-compare")["status"] == "complete"

    data_recipe = tmp_path / "data.yaml"
    data_recipe.write_text(data_recipe.read_text().replace("workers: 2", "workers: 1"))
    again = prunectl("study", str(tmp_path / "study.yaml"), env=env, timeout=600).stdout
    assert "reusing 5 complete run(s)" in again  # the data too, at another worker count: nothing is tokenized again
    assert [line.split()[2] for line in again.splitlines() if line.startswith("submitted ")] == ["ls-compare@v002"]

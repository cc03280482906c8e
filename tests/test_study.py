"""study: the graph a submission would queue (dry run, on any machine) and the mistakes it refuses up front."""

from __future__ import annotations

import json
import os

from .conftest import REPO, prunectl, refused


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
    assert any("#SBATCH --dependency='afterany:<job ids of parent/paper-parent>'" in s for s in scripts)
    assert all("#SBATCH --gpus-per-node=8" in s for s, a in zip(scripts, plan["arrays"]) if a["title"].startswith("parent"))
    assert plan["data"][0]["recipe"] == "recipes/paper/data.yaml"
    node = next(n for n in plan["nodes"] if n["ref"] == "paper-wanda-50-r50b@vNNN")
    assert node["source"] == "recipes/paper/retrain/wanda-50-r50b.yaml" and "init=paper-wanda-50@vNNN" in node["overrides"]
    out = prunectl(*args, env=env, timeout=300).stdout  # the same plan for a person: the graph and every script
    assert out.count("#!/bin/bash") == len(scripts) and "prunectl data prepare recipes/paper/data.yaml" in out
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
    assert [n["state"] for n in demo] == ["planned"] * (1 + 5 * 3 + 11 + 1)  # parent; 3 per method; 11 evals; compare
    twin = next(n for n in demo if n["ref"] == "demo-wanda-50-scratch@vNNN")
    assert twin["source"] == "recipes/tiny/demo/scratch-wanda-50.yaml" and "like=demo-wanda-50@vNNN" in twin["overrides"]
    assert twin["deps"] == ["prune/demo-wanda-50"]
    full = prunectl("study", "recipes/tiny/study.yaml", "--dry-run", "--executor", "slurm", env=env).stdout
    assert "tiny-minitron-depth-50-scratch-total@vNNN" in full and "#SBATCH --dependency=" in full

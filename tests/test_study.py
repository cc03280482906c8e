"""study: the graph a submission would queue (dry run, on any machine) and the mistakes it refuses up front."""

from __future__ import annotations

import os

from .conftest import REPO, prunectl, refused


def test_paper_study_dry_run_prints_the_whole_graph_and_every_batch_script(tmp_path):
    env = {**os.environ, "PRUNECTL_RUNS": str(tmp_path / "runs")}
    out = prunectl("study", "recipes/paper/study.yaml", "--executor", "slurm", "--dry-run", env=env, timeout=300).stdout
    lines = out.splitlines()
    rows = [line.split()[:2] for line in lines if line.startswith(" ") and "@vNNN" in line and "planned" in line]
    groups = [group for group, _ in rows]
    # parent; 8 methods at 50% + the 6 ratio-ablation prunes; 8 x (5 R_N + 5 S_N + S_total) + 6 x (R50 + S50)
    assert groups.count("parent") == 1 and groups.count("prune") == 14
    assert groups.count("retrain") == 8 * 5 + 6 and groups.count("scratch") == 8 * 6 + 6
    assert groups.count("sweep") == 5 * (groups.count("retrain") + groups.count("scratch"))  # one prefix run per peak LR
    assert groups.count("eval") == 1 + groups.count("retrain") + groups.count("scratch") and groups.count("compare") == 1
    scripts = out.count("#!/bin/bash")
    assert scripts >= 7  # one per job array (sheared-llama's prune needs its own resources)
    assert "#SBATCH --dependency='afterany:<job ids of parent/paper-parent>'" in out
    assert "#SBATCH --gpus-per-node=8" in out and "prunectl data prepare recipes/paper/data.yaml" in out
    assert "paper-wanda-50-r50b@vNNN  recipes/paper/retrain/wanda-50-r50b.yaml init=paper-wanda-50@vNNN" in out
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
    demo = prunectl("study", "recipes/tiny/demo.yaml", "--dry-run", env=env).stdout
    assert demo.count("planned") == 1 + 5 * 3 + 11 + 1  # parent; prune, retrain, twin per method; 11 evals; compare
    assert "demo-wanda-50-scratch@vNNN  recipes/tiny/demo/scratch-wanda-50.yaml like=demo-wanda-50@vNNN" in demo
    full = prunectl("study", "recipes/tiny/study.yaml", "--dry-run", "--executor", "slurm", env=env).stdout
    assert "tiny-minitron-depth-50-scratch-total@vNNN" in full and "#SBATCH --dependency=" in full

"""Token budgets are checked before anything is submitted: a run (or a study) that would read more tokens than its
ranges hold is refused in one line, unless the recipe allows repeating the data."""

from __future__ import annotations

import json
import shutil

import pytest

from prunectl.train import TrainConfig

from .conftest import REPO, prunectl, refused


def test_reads_fill_the_ranges_in_order_and_count_epochs():
    cfg = TrainConfig(tokens=64 * 100, seq_len=64, global_batch=4, micro_batch=4, data_ranges=["a", "b"])
    assert cfg.reads({"a": 64 * 60 + 10, "b": 64 * 1000}) == ({"a": 64 * 60, "b": 64 * 40}, 100 / 1060)
    read, epochs = cfg.reads({"a": 64 * 30, "b": 64 * 20})
    assert read == {"a": 64 * 30, "b": 64 * 20} and epochs == 2.0
    assert "holds 3,200 (2.00 epochs)" in cfg.budget_problem("r@v001", "d@v001", {"a": 64 * 30, "b": 64 * 20})
    capped = TrainConfig(tokens=64 * 100, seq_len=64, global_batch=4, micro_batch=4, data_ranges=["a"],
                         range_tokens={"a": 64 * 50})
    assert capped.reads({"a": 64 * 1000})[1] == 2.0  # range_tokens caps what a range offers
    assert TrainConfig(tokens=64 * 100, seq_len=64, global_batch=4, micro_batch=4, data_ranges=["a"],
                       allow_epochs=True).budget_problem("r", "d", {"a": 64}) is None


def test_a_budget_larger_than_its_range_is_refused_before_anything_is_submitted(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    # test-data's pretrain range holds about 1.5M tokens
    err = refused(env, runs, "pretrain", "test-parent", "train.tokens=4194304")
    [line] = err.splitlines()
    assert line.startswith("error: train.tokens: test-parent trains on 4,194,304 tokens but range pretrain of "
                           "test-data@v001 holds ") and "epochs); prepare more data" in line, line
    assert "train.allow_epochs=true" in line
    err = refused(env, runs, "pretrain", "test-parent", "train.tokens=4194304",
                  "sweep={lrs: [1.0e-3, 3.0e-3], prefix_tokens: 16384}", "--sweep", "lr")
    assert "train.tokens: test-parent" in err  # a sweep is checked against the budget of the run it chooses for
    out = prunectl("pretrain", "test-parent", "train.tokens=4194304", "train.allow_epochs=true", "--dry-run", env=env)
    assert "allow_epochs: true" in out.stdout and not list(runs.glob("test-parent/v*"))
    assert "memory: about " in out.stdout and " per rank" in out.stdout  # the preflight's estimate, on a CPU


def test_the_paper_study_dry_run_shows_budgets_and_refuses_too_few_documents(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PRUNECTL_RUNS": str(tmp_path / "runs")}
    out = prunectl("study", "recipes/paper/study.yaml", "--executor", "slurm", "--dry-run", "--json", env=env)
    rows = {r["range"]: r for r in json.loads(out.stdout)["budgets"]}
    assert rows["pretrain"]["estimated"] and rows["pretrain"]["holds"] == 210_000_000_000
    assert rows["pretrain"]["by"] == "paper-parent@vNNN" and 199e9 < rows["pretrain"]["reads"] <= 200e9
    assert rows["retrain"]["by"].startswith("paper-minitron-depth-50-r500b") and rows["retrain"]["reads"] > 499e9

    paper = tmp_path / "paper"
    shutil.copytree(REPO / "recipes" / "paper", paper)
    data = paper / "data.yaml"
    data.write_text(data.read_text().replace("max_docs: 600000000", "max_docs: 400000000"))
    err = refused(env, tmp_path / "runs", "study", str(paper / "study.yaml"), "--executor", "slurm", "--dry-run",
                  written="**/*")
    [line] = err.splitlines()
    assert line.startswith("error: train.tokens: paper-parent@vNNN trains on 200,000,000,000 tokens but range "
                           "pretrain of paper-data@vNNN holds about 140,000,000,000"), line
    assert "more runs of this study" in line


@pytest.mark.slow
def test_a_study_whose_retrains_cannot_fit_their_gpus_is_refused_before_any_queue(tmp_path):
    """The memory preflight covers every training job of a study, also those whose input (a prune) is not made
    yet: bounded by the largest shape the prune can make, with its mask."""
    env = {"PATH": "/usr/bin:/bin", "PRUNECTL_RUNS": str(tmp_path / "runs")}
    paper = tmp_path / "paper"
    shutil.copytree(REPO / "recipes" / "paper", paper)
    budget = paper / "_retrain-budget.yaml"
    budget.write_text(budget.read_text().replace("zero_stage: 3", "zero_stage: 2")
                      .replace("activation_checkpointing: selective", "activation_checkpointing: none"))
    err = refused(env, tmp_path / "runs", "study", str(paper / "study.yaml"), "--executor", "slurm", "--dry-run",
                  written="**/*")
    lines = err.splitlines()
    wanda = next(line for line in lines if line.startswith("error: memory: paper-wanda-50-r10b needs about "))
    assert "per GPU, over the 90% of 80 GiB" in wanda and wanda.endswith(
        "try train.zero_stage=3 train.activation_checkpointing=selective")
    assert not any("paper-parent" in line for line in lines)  # the parent's own recipe still fits

"""Recipes: every shipped one resolves; extends and overrides; every mistake is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os

import pytest

from prunectl import recipe as recipes
from prunectl.errors import PrunectlError

from .conftest import REPO, prunectl


@pytest.mark.parametrize("path", [p for p in sorted((REPO / "recipes").rglob("*.yaml")) if not p.name.startswith("_")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_resolves(path, monkeypatch):
    r = recipes.resolve(str(path))
    # by its name (`prunectl pretrain tiny-parent`) a user gets this very file: no other recipe has the name
    monkeypatch.setenv(recipes.RECIPES_ENV, str(REPO / "recipes"))
    assert recipes.find_recipe(r.name).resolve() == path.resolve()
    # the resolved dump is itself a valid recipe: what a run stores is what it ran
    assert recipes._RECIPE.validate_python(__import__("yaml").safe_load(recipes.dump(r))) == r


def test_extends_and_typed_overrides():
    r = recipes.resolve(str(REPO / "recipes/tiny/parent-2rank.yaml"), ["train.tokens=2e6", "optimizer.lr=1e-3", "model.tie_embeddings=true"])
    assert r.name == "tiny-parent-2rank"
    assert r.launch.tasks_per_node == 2 and r.train.micro_batch == 8  # from the child
    assert r.model.layers == 12  # from _train.yaml, two levels up
    assert r.train.tokens == 2_000_000 and r.optimizer.lr == 1e-3 and r.model.tie_embeddings is True


def test_paper_defaults_match_the_paper():
    r = recipes.resolve(str(REPO / "recipes/paper/parent.yaml"))
    assert (r.model.layers, r.model.hidden, r.model.heads, r.model.kv_heads, r.model.ffn) == (32, 4096, 32, 8, 14336)
    assert r.optimizer.betas == (0.9, 0.95) and r.optimizer.eps == 1e-8 and r.optimizer.weight_decay == 0.01
    assert r.optimizer.warmup_ratio == 0.05 and r.optimizer.min_lr_ratio == 0.1 and r.optimizer.grad_clip == 1.0
    assert r.train.seq_len == 8192 and r.train.global_batch == 512 and r.train.tokens == 200_000_000_000


def test_all_problems_reported_together():
    with pytest.raises(PrunectlError) as info:
        recipes.resolve(str(REPO / "recipes/tiny/parent.yaml"), ["train.tokns=5", "train.zero_stage=7", "model.heads=abc"])
    lines = info.value.problems
    assert "train.tokns: unknown key; did you mean 'tokens'?" in lines
    assert any(line.startswith("train.zero_stage: ") and "less than or equal to 3" in line for line in lines)
    assert any(line.startswith("model.heads: ") and "integer" in line for line in lines)


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(PrunectlError, match="cycle"):
        recipes.resolve(str(tmp_path / "a.yaml"))


BAD_INPUTS = [
    (["pretrain", "recipes/tiny/parent.yaml", "train.tokns=5"], "train.tokns: unknown key; did you mean 'tokens'?"),
    (["pretrain", "recipes/tiny/parent.yaml", "train.tokens=lots"], "train.tokens: Input should be a valid integer"),
    (["pretrain", "recipes/tiny/parent.yaml", "train.zero_stage=4"], "train.zero_stage: Input should be less than or equal to 3"),
    (["pretrain", "recipes/tiny/parent.yaml", "train.global_batch=10"], "global_batch=10 must be a multiple of micro_batch=16"),
    (["pretrain", "recipes/tiny/parent.yaml", "tokens"], "tokens: an override is key.path=value"),
    (["pretrain", "recipes/tiny/parent.yaml"], "data: tiny-data@latest: no runs named 'tiny-data'"),
    (["pretrain", "recipes/tiny/parent.yaml", "--executor", "cloud"], "--executor: 'cloud' is not one of slurm, local, debug"),
    (["pretrain", "recipes/tiny/data.yaml"], "is a data recipe"),
    (["pretrain", "recipes/tiny/nope.yaml"], "recipes/tiny/nope.yaml: no such recipe file"),
    (["pretrain", "tiny-parnt"], "did you mean 'tiny-parent'?"),
    (["pretrain", "recipes/tiny/parent.yaml", "launch.profile=mars"], "launch.profile: no Slurm profile 'mars'"),
    (["prune", "recipes/tiny/prune/flap-50.yaml", "prune.flap.statistics=pruned"],
     "prune.flap.statistics: Input should be 'parent' or 'sequential'"),
    (["data", "prepare", "recipes/tiny/data.yaml", "data.ranges.validation=1.5"], "range shares must be in (0, 1]"),
    (["data", "prepare", "recipes/tiny/data.yaml", "data.sources=[{kind: text, path: /nonexistent/*.txt}]"],
     "data.sources: no files match /nonexistent/*.txt"),
]


@pytest.mark.parametrize("args,expected", BAD_INPUTS, ids=[" ".join(a[2:]) or a[1] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, expected):
    runs = tmp_path / "runs"
    env = {**os.environ, "PRUNECTL_RUNS": str(runs), "PRUNECTL_RECIPES": str(REPO / "recipes")}
    out = prunectl(*args, env=env, check=False)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert all(line.startswith("error: ") for line in out.stderr.strip().splitlines()), out.stderr
    assert not runs.exists() or not any(runs.rglob("manifest.json")), "a bad input wrote a run"


def test_recipes_ls_and_show(tmp_path):
    env = {**os.environ, "PRUNECTL_RECIPES": str(REPO / "recipes")}
    listing = {r["name"]: r for r in json.loads(prunectl("recipes", "ls", "--json", env=env).stdout)}
    assert (listing["tiny-parent"]["stage"], listing["tiny-parent"]["file"]) == ("pretrain", str(REPO / "recipes/tiny/parent.yaml"))
    assert listing["tiny-data"]["stage"] == "data" and listing["paper-parent"]["stage"] == "pretrain"
    assert "invalid" not in {r["stage"] for r in listing.values()}  # every shipped recipe resolves
    assert "tiny-parent" in prunectl("recipes", "ls", env=env).stdout  # the same listing, as a table
    shown = prunectl("recipes", "show", "tiny-parent", "--resolved", "train.tokens=777216", env=env).stdout
    assert "tokens: 777216" in shown and "layers: 12" in shown and "extends" not in shown


def test_train_deepspeed_is_merged_over_the_generated_config_and_checked():
    from prunectl.train import OptimizerConfig, TrainConfig, deepspeed_config

    extra = {"zero_optimization": {"stage3_param_persistence_threshold": 0, "offload_optimizer": {"device": "cpu"}},
             "communication_data_type": "fp32"}
    cfg = TrainConfig(tokens=8192, seq_len=64, global_batch=16, micro_batch=8, zero_stage=3, deepspeed=extra)
    ds = deepspeed_config(cfg, OptimizerConfig(), 2, False)
    assert ds["zero_optimization"] == {"stage": 3, **extra["zero_optimization"]}
    assert ds["communication_data_type"] == "fp32" and ds["gradient_accumulation_steps"] == 1
    for bad, says in [({"optimizer": {}}, "set by prunectl from optimizer"),
                      ({"zero_optimization": {"stage": 2}}, "set that instead"),
                      ({"zero_optimization": {"mics_shard_size": 8}}, "not a key of DeepSpeed"),
                      ({"zero_optimization": {"reduce_bucket_size": "big"}}, "valid integer"),
                      ({"steps_per_print": 1}, "not a key prunectl passes to DeepSpeed")]:
        with pytest.raises(ValueError, match=says):
            TrainConfig(tokens=8192, seq_len=64, global_batch=16, micro_batch=8, deepspeed=bad)

"""Retrain (P-R_N) and scratch twins (S_N) on the session's pruned toy runs, through the CLI as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, manifest, prunectl, refused

pytestmark = pytest.mark.slow  # every test reads the `study` fixture (on `pruned`) and trains through jobs


def _masked_weights_are_zero(run_dir) -> tuple[bool, float]:
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    masks = load_file(str(run_dir / "final" / "masks.safetensors"))
    held = all(not weights[name][~keep.bool()].any() for name, keep in masks.items())
    kept = sum(int(k.sum()) for k in masks.values()) / sum(k.numel() for k in masks.values())
    return held, kept


# one of each kind of initialisation: layers removed, widths cut (with bias compensation), sparse (unstructured, 2:4)
@pytest.mark.parametrize("key", ["depth", "flap", "wanda", "sparsegpt-24"])
def test_retrain_and_its_scratch_twin_are_token_matched_and_retrain_wins(study, key):
    runs, env = study["runs"], study["env"]
    prunectl("retrain", f"test-retrain-{key}", env=env)
    prunectl("pretrain", f"test-twin-{key}", env=env)
    r, s = manifest(runs, f"test-retrain-{key}"), manifest(runs, f"test-twin-{key}")
    assert r["status"] == s["status"] == "complete"
    assert r["inputs"]["init"] == s["inputs"]["like"] == f"test-prune-{key}@v001"
    # identical data: the same prepared run, ranges, token intervals and count (checked from the manifests)
    assert r["data"] == s["data"] and r["data"]["tokens"] == 32768 == r["summary"]["tokens"]
    assert [iv["range"] for iv in r["data"]["intervals"]] == ["retrain"]
    # the same architecture, and the pruned initialisation wins at equal tokens (the paper's Finding 1)
    assert r["summary"]["parameters"]["total"] == s["summary"]["parameters"]["total"]
    assert r["summary"]["final_val_loss"] < s["summary"]["final_val_loss"]
    if key in ("wanda", "sparsegpt-24"):
        for run in (r, s):
            held, kept = _masked_weights_are_zero(runs / run["name"] / "v001")
            assert held and kept == pytest.approx(0.5)
            assert run["summary"]["masked_nonzero"] == 0 and run["summary"]["mask_sparsity"] == pytest.approx(0.5)


# ZeRO-3 on 2 ranks with a persistence threshold of 0: every weight and mask is partitioned for real.
ZERO3 = ("launch.tasks_per_node=2", "launch.cpus_per_task=1", "train.micro_batch=8",
         "train.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}")


@pytest.mark.parametrize("key,zero,stage", [("magnitude", 1, "retrain"), ("sparsegpt", 1, "retrain"),
                                            ("wanda-24", 1, "pretrain"), ("wanda", 3, "retrain"),
                                            ("sparsegpt-24", 3, "pretrain")])
def test_sparse_masks_hold_exactly_at_every_zero_stage(study, key, zero, stage):
    runs, env = study["runs"], study["env"]
    name = f"test-retrain-{key}" if stage == "retrain" else f"test-twin-{key}"
    prunectl(stage, name, f"train.zero_stage={zero}", "train.tokens=16384", *(ZERO3 if zero == 3 else ()), "--new",
             env=env)
    version = max(int(p.name[1:]) for p in (runs / name).iterdir() if p.name.startswith("v"))
    held, kept = _masked_weights_are_zero(runs / name / f"v{version:03d}")
    assert held and kept == pytest.approx(0.5)
    m = json.loads((runs / name / f"v{version:03d}" / "manifest.json").read_text())
    assert m["summary"]["masked_nonzero"] == 0 and m["summary"]["world_size"] == (2 if zero == 3 else 1)
    weights = load_file(str(runs / name / f"v{version:03d}" / "final" / "model.safetensors"))
    assert not any(k.endswith("keep_mask") for k in weights)  # the masks live in masks.safetensors only
    init = load_file(str(runs / f"test-prune-{key}" / "v001" / "final" / "model.safetensors"))
    after = load_file(str(runs / name / f"v{version:03d}" / "final" / "model.safetensors"))
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(init[w], after[w])  # it trained


def _kill_after_checkpoint(args, env, latest, step: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "prunectl", *args], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= step):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "no checkpoint before the kill"


def test_distilled_sparse_retrain_resumes_bit_exact_after_sigkill(study, tmp_path):
    """Masks and a teacher both in play: the resumed run ends on exactly the weights of an uninterrupted one."""
    runs, env = study["runs"], study["env"]
    (study["recipes"] / "retrain-kd.yaml").write_text(
        "extends: _retrain.yaml\nname: test-retrain-kd\ninit: test-prune-wanda@latest\n"
        "distill: {alpha: 0.5, temperature: 2.0}\ntrain: {tokens: 65536, checkpoint_every: 16}\n")
    ref_env = {**env, "PRUNECTL_RUNS": str(tmp_path / "ref")}
    (tmp_path / "ref").mkdir()
    for name in ("test-data", "test-prune-parent", "test-prune-wanda"):
        (tmp_path / "ref" / name).symlink_to(runs / name, target_is_directory=True)
    prunectl("retrain", "test-retrain-kd", env=ref_env)

    run_dir = runs / "test-retrain-kd" / "v001"
    _kill_after_checkpoint(["retrain", "test-retrain-kd"], env, run_dir / "checkpoints" / "latest.json", 16)
    assert manifest(runs, "test-retrain-kd")["status"] != "complete" and not (run_dir / "final").exists()
    out = prunectl("retrain", "test-retrain-kd", env=env)
    assert "resuming test-retrain-kd@v001" in out.stdout
    m = manifest(runs, "test-retrain-kd")
    assert m["status"] == "complete" and m["resumed_from"][0] >= 16
    assert m["inputs"] == {"init": "test-prune-wanda@v001", "data": "test-data@v001", "teacher": "test-prune-parent@v001"}
    ref = load_file(str(tmp_path / "ref" / "test-retrain-kd" / "v001" / "final" / "model.safetensors"))
    got = load_file(str(run_dir / "final" / "model.safetensors"))
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]  # training logs (held-out records carry val_loss)
    assert logged and all("kd_loss" in r for r in logged)  # both terms of the loss, every log
    # the teacher is the dense parent, not the masked student itself: the distillation term never vanishes
    assert all(r["kd_loss"] > 0 for r in logged), logged
    assert _masked_weights_are_zero(run_dir)[0]


def test_bad_retrain_and_twin_inputs_are_one_clear_error_each(study, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    runs, env = study["runs"], study["env"]
    err = refused(env, runs, "pretrain", "test-twin-depth", "like=test-prune-parent@latest")
    assert "is a pretrain run" in err and "prune run" in err
    err = refused(env, runs, "retrain", "test-retrain-depth", "train.data_ranges=[pretrain]")
    assert "shares" in err and "test-prune-parent@v001 was pretrained on" in err
    err = refused(env, runs, "pretrain", "test-twin-depth", "train.data_ranges=[pretrain]")
    assert "shares" in err and "pretrain" in err
    other = tmp_path / "other-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    AutoTokenizer.from_pretrained(runs / "test-data" / "v001" / "tokenizer").save_pretrained(other)
    err = refused(env, runs, "retrain", "test-retrain-depth", f"distill.teacher={other}")
    assert "vocabulary (512 entries) differs from the student's (1,024)" in err
    err = refused(env, runs, "retrain", "test-retrain-depth", "init=test-prune-nothing@latest")
    assert err.startswith("error: init: test-prune-nothing@latest: no runs named")
    err = refused(env, runs, "retrain", "test-retrain-depth", "--sweep", "lr")
    assert "has no sweep section" in err
    err = refused(env, runs, "retrain", "test-retrain-depth", "sweep={lrs: [1.0e-3, 3.0e-3], prefix_tokens: 8192}")
    assert "no complete prefix run for lr 0.001, 0.003" in err and "--sweep lr" in err

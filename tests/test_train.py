"""Training end to end through the CLI: loadable models, loss below the unigram bar, exact resume, ZeRO stages."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from prunectl.train import OptimizerConfig, lr_factor

from .conftest import REPO, manifest, prunectl


def test_lr_schedule_is_warmup_then_cosine_to_ten_percent():
    opt = OptimizerConfig()
    f = [lr_factor(s, 1000, opt) for s in range(1000)]
    assert f[0] == pytest.approx(1 / 50) and f[49] == pytest.approx(1.0)  # 5% linear warmup
    assert max(f) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[50:], f[51:]))  # then only decays
    assert f[-1] == pytest.approx(0.1, abs=1e-4)  # to 10% of the peak


def load_in_fresh_process(final) -> dict:
    code = (
        "import json, sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(final)!r}); t = AutoTokenizer.from_pretrained({str(final)!r})\n"
        "ids = t('To be, or not to be', return_tensors='pt')['input_ids']\n"
        "print(json.dumps({'params': sum(p.numel() for p in m.parameters()), 'layers': m.config.num_hidden_layers,"
        " 'first': int(ids[0, 0]), 'bos': t.bos_token_id, 'loss': float(m(ids, labels=ids).loss)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a 128-step pretrain job
def test_pretrain_local_trains_below_unigram_entropy_and_loads(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    out = prunectl("pretrain", "test-parent", "--executor", "local", env=env)
    assert "complete test-parent@v001" in out.stdout
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete" and m["inputs"] == {"data": "test-data@v001"}
    # the exact tokens consumed: 131072 = 128 steps x 16 sequences x 64 tokens, a prefix of the pretrain range
    data_meta = json.loads((runs / "test-data" / "v001" / "data.json").read_text())
    start = data_meta["ranges"]["pretrain"]["start"]
    assert m["data"]["tokens"] == 131072 == m["summary"]["tokens"]
    assert m["data"]["intervals"] == [{"range": "pretrain", "start": start, "end": start + 131072}]
    assert m["summary"]["final_val_loss"] < m["summary"]["unigram_entropy_nats"] - 0.3
    records = [json.loads(line) for line in (runs / "test-parent" / "v001" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert {"tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train_records[0])
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 1.0
    loaded = load_in_fresh_process(runs / "test-parent" / "v001" / "final")
    assert loaded["params"] == m["summary"]["parameters"]["total"]
    assert loaded["layers"] == 2 and loaded["first"] == loaded["bos"]
    assert loaded["loss"] < m["summary"]["unigram_entropy_nats"]

    [row] = [r for r in json.loads(prunectl("status", "--json", env=env).stdout) if r["run"] == "test-parent@v001"]
    assert (row["stage"], row["status"], row["tokens"]) == ("pretrain", "complete", 131072)


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow  # three pretrain jobs
def test_sigkill_then_rerun_resumes_to_the_same_weights(fresh_runs, tmp_path):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    args = ["pretrain", "test-parent", "train.tokens=262144", "train.checkpoint_every=16", "--executor", "local"]
    # reference: uninterrupted, in a runs root of its own
    ref_runs = tmp_path / "ref"
    ref_runs.mkdir()
    (ref_runs / "test-data").symlink_to(runs / "test-data", target_is_directory=True)
    prunectl(*args, env={**env, "PRUNECTL_RUNS": str(ref_runs)})

    proc = subprocess.Popen([sys.executable, "-m", "prunectl", *args], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = runs / "test-parent" / "v001" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= 32):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and every rank, mid-training
    proc.wait()
    assert latest.exists(), "no checkpoint before the kill"
    killed = manifest(runs, "test-parent")
    assert killed["status"] != "complete" and not (runs / "test-parent" / "v001" / "final").exists()
    [row] = json.loads(prunectl("status", "test-parent", "--json", env=env).stdout)
    assert row["state"] in ("running (lost)", "pending (lost)"), row  # nothing runs it: status says so

    out = prunectl(*args, env=env)
    assert "resuming test-parent@v001" in out.stdout
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete" and m["resumed_from"] and m["resumed_from"][0] >= 32
    assert len(m["job_ids"]) == 2
    ref, resumed = _weights(ref_runs / "test-parent" / "v001"), _weights(runs / "test-parent" / "v001")
    assert ref.keys() == resumed.keys()
    # Same data, step, optimizer and LR state: bit-identical, not merely close.
    differing = [k for k in ref if not torch.equal(ref[k], resumed[k])]
    assert not differing, f"weights differ after resume: {differing[:3]}"
    assert _losses(runs / "test-parent" / "v001") == _losses(ref_runs / "test-parent" / "v001")


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow  # a pretrain job per ZeRO stage
@pytest.mark.parametrize("stage", [1, 3])
def test_other_zero_stages_train_and_save(fresh_runs, stage):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    prunectl("pretrain", "test-parent", f"train.zero_stage={stage}", "train.tokens=32768", "--executor", "local", env=env)
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete"
    loaded = load_in_fresh_process(runs / "test-parent" / "v001" / "final")
    assert loaded["params"] == m["summary"]["parameters"]["total"]
    assert math.isfinite(loaded["loss"]) and loaded["loss"] < 6.5


@pytest.mark.slow  # a two-rank pretrain job
def test_two_ranks_zero2_on_the_local_executor(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    prunectl("pretrain", "test-parent", "launch.tasks_per_node=2", "launch.cpus_per_task=1", "train.tokens=32768",
             "--executor", "local", env=env)
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete" and m["summary"]["world_size"] == 2
    assert m["data"]["tokens"] == 32768
    logs = sorted(p.name for p in (runs / "test-parent" / "v001" / "logs").glob("*_log.out"))
    assert len(logs) == 2  # one log per rank


def test_dry_run_prints_script_and_writes_nothing(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    out = prunectl("pretrain", "test-parent", "--executor", "slurm", "--profile", "local", "--dry-run", env=env)
    assert "#SBATCH --partition=debug" in out.stdout and "#SBATCH --signal=USR2@90" in out.stdout
    assert "tokens: 131072" in out.stdout
    assert not (runs / "test-parent").exists()

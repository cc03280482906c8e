"""Eval: perplexity that agrees with lm-eval, lm-eval zero-shot on the built-in task, results stored per version."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from .conftest import manifest, prunectl, refused

EVAL_FILES = "*/v*/eval/*.json"  # what an eval writes
EVAL = """
name: test-eval
stage: eval
run: test-prune-parent@latest
eval:
  heldout: {range: validation, tokens: 16384, seq_len: 64}
  perplexity:
    - {name: validation, data: test-data@latest, range: validation, seq_len: 64, sequences: 128}
  zero_shot: {tasks: [test-data-continuation], batch_size: 16, limit: 200}
  batch_size: 16
launch: {tasks_per_node: 1, cpus_per_task: 2, time_min: 15}
"""


def test_perplexity_agrees_with_lm_eval_rolling_loglikelihood(workspace, tmp_path, monkeypatch):
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunectl.evaluate import perplexity
    from prunectl.evaluate.perplexity import score_windows, text_windows

    tokenizer = AutoTokenizer.from_pretrained(workspace["runs"] / "test-data" / "v001" / "tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    words = ("to be or not to be that is the question whether tis nobler in the mind to suffer " * 40).split()
    texts = [" ".join(words[:n]) for n in (5, 30, 47, 200, 333)]  # shorter than, about, and many windows
    lm = HFLM(pretrained=str(tmp_path / "model"), device="cpu", batch_size=4, dtype="float32", max_length=32,
              add_bos_token=False)
    reference = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in texts], disable_tqdm=True)
    model.eval()

    def ours() -> list[float]:
        return [score_windows(model, text_windows(tokenizer, [t], 32, None), 3, torch.device("cpu")).log_likelihood
                for t in texts]

    monkeypatch.setattr(perplexity, "_HEAD_SLICE", 7 * config.vocab_size)  # the head runs on 7 positions at a time
    assert np.allclose(ours(), reference, rtol=1e-4, atol=0), (ours(), reference)
    monkeypatch.setattr(model.config, "model_type", "not-llama")  # the plain path: full logits, then gather
    assert np.allclose(ours(), reference, rtol=1e-4, atol=0), (ours(), reference)


@pytest.fixture(scope="module")
def evaluated(study, workspace) -> dict:
    """One eval array over a pretrain, a structured and a sparse prune, and a sparse retrain."""
    recipes, runs, env = workspace["recipes"], workspace["runs"], workspace["env"]
    (recipes / "eval.yaml").write_text(textwrap.dedent(EVAL))
    prunectl("retrain", "test-retrain-sparsegpt", "--new", env=env)
    targets = ["test-prune-parent@latest", "test-prune-depth@latest", "test-prune-wanda@latest", "test-retrain-sparsegpt@latest"]
    out = prunectl("eval", "test-eval", "--array", "run=" + ",".join(targets), env=env, timeout=1800)
    results = {}
    for name in ("test-prune-parent", "test-prune-depth", "test-prune-wanda", "test-retrain-sparsegpt"):
        version = max(p.name for p in (runs / name).glob("v*"))
        files = sorted((runs / name / version / "eval").glob("*.json"))
        assert len(files) == 1, name
        results[name] = (files[0], json.loads(files[0].read_text()))
    return {"out": out.stdout, "results": results, **workspace}


@pytest.mark.slow  # `evaluated`: the session's pruned runs, a retrain and an eval array
def test_eval_every_run_kind_and_store_with_the_version(evaluated):
    runs = evaluated["runs"]
    for name, (path, res) in evaluated["results"].items():
        assert res["run"].startswith(f"{name}@v") and path.parent == runs / name / res["run"].split("@")[1] / "eval"
        task = res["zero_shot"]["tasks"]["test-data-continuation"]
        assert task["n"] > 0 and task["version"] == 1.0 and res["zero_shot"]["lm_eval_version"]
        assert task["acc_stderr"] == pytest.approx((task["acc"] * (1 - task["acc"]) / task["n"]) ** 0.5)
        assert res["perplexity"]["validation"]["tokens"] > 0 and res["perplexity"]["validation"]["range"] == "validation"
    parent = evaluated["results"]["test-prune-parent"][1]
    # held-out loss is the training loop's own measure, recomputed from the stored model
    assert parent["heldout"]["loss"] == pytest.approx(manifest(runs, "test-prune-parent")["summary"]["final_val_loss"], rel=1e-3)
    # a trained model clearly beats chance (1 in 4) on the continuation task
    assert parent["zero_shot"]["tasks"]["test-data-continuation"]["acc"] > 0.5
    sparse = evaluated["results"]["test-prune-wanda"][1]
    assert sparse["parameters"]["nonzero"] < 0.8 * sparse["parameters"]["total"]  # evaluated as saved: still sparse


@pytest.mark.slow  # a pretrain job and an eval job
def test_untrained_model_is_near_chance(fresh_runs, workspace):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    (workspace["recipes"] / "eval.yaml").write_text(textwrap.dedent(EVAL))
    prunectl("pretrain", "test-parent", "train.tokens=1024", "train.eval_tokens=1024", env=env)  # one step: untrained
    prunectl("eval", "test-eval", "run=test-parent@latest", "eval.perplexity=[]", "eval.heldout=null", env=env)
    res = json.loads(next((runs / "test-parent" / "v001" / "eval").glob("*.json")).read_text())
    acc = res["zero_shot"]["tasks"]["test-data-continuation"]["acc"]
    assert 0.1 < acc < 0.4


@pytest.mark.slow  # `evaluated`: the session's pruned runs, a retrain and an eval array
def test_a_second_identical_eval_is_a_no_op_and_force_recomputes(evaluated):
    env = evaluated["env"]
    path, before = evaluated["results"]["test-prune-depth"]
    mtime = path.stat().st_mtime_ns
    out = prunectl("eval", "test-eval", "run=test-prune-depth@latest", env=env)
    assert "already has this eval" in out.stdout and path.stat().st_mtime_ns == mtime
    prunectl("eval", "test-eval", "run=test-prune-depth@latest", "--force", env=env)
    after = json.loads(path.read_text())
    assert path.stat().st_mtime_ns != mtime and after["finished"] > before["finished"]  # computed again, not copied
    assert after["heldout"]["loss"] == pytest.approx(before["heldout"]["loss"], rel=1e-6)  # deterministic


@pytest.mark.slow  # `evaluated`: the session's pruned runs, a retrain and an eval array
def test_bad_eval_inputs_are_one_clear_error(evaluated, tmp_path):
    runs, env = evaluated["runs"], evaluated["env"]
    err = refused(env, runs, "eval", "test-eval", "run=test-nothing@latest", written=EVAL_FILES)
    assert err.startswith("error: run: test-nothing@latest: no runs named")
    err = refused(env, runs, "eval", "test-eval", "eval.zero_shot.tasks=[hellaswagg]", written=EVAL_FILES)
    assert "'hellaswagg' is not an lm-eval task; did you mean 'hellaswag'?" in err
    empty_cache = {**env, "HF_HOME": str(tmp_path / "empty-hf-home")}
    err = refused(empty_cache, runs, "eval", "test-eval", "eval.zero_shot.tasks=[piqa]", written=EVAL_FILES)
    assert "dataset baber/piqa is not in the local Hugging Face cache" in err and "--prefetch" in err
    err = refused(env, runs, "eval", "test-eval", "eval.perplexity=[{name: leak, data: test-data@latest, range: pretrain}]", written=EVAL_FILES)
    assert "trained or calibrated on 'pretrain'" in err

"""Pruning at the parent's dtype with bounded host memory: hidden states spilled to the run directory give
the same result as kept in memory, calibration losses without full logits, bf16 parents saved as bf16."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prunectl.prune import calibration as calib
from prunectl.prune.activations import SPILL_DIR
from prunectl.prune.config import PruneConfig
from prunectl.prune.context import Context
from prunectl.prune.meter import Meter
from prunectl.prune.surgery import Shape

from .conftest import manifest, prunectl
from .test_prune_units import _ids, _model

CPU = torch.device("cpu")


def _apply(model, ids, method: str, workdir, memory_gb):
    cfg = PruneConfig(method=method, ratio=0.5)
    ctx = Context(model, ids, cfg, 3, CPU, Shape.of(model), Meter(CPU), {"candidates": []}, workdir, memory_gb)
    return cfg.spec.apply(ctx), ctx.report


def test_spilled_hidden_states_prune_exactly_as_in_memory_ones(tmp_path):
    """Wanda end to end; SparseGPT reads the same hidden states (X^T X equal: the test below)."""
    x, method = _ids(n=8), "wanda"  # batches of 3, 3 and 2: uneven offsets in the spill file
    kept, kept_report = _apply(_model(), x, method, tmp_path, 1.0)
    spilled, spilled_report = _apply(_model(), x, method, tmp_path, 1e-6)
    assert not kept_report["calibration_memory"]["spilled"] and spilled_report["calibration_memory"]["spilled"]
    assert not (tmp_path / SPILL_DIR).exists()  # removed when the pass ended
    assert kept.masks.keys() == spilled.masks.keys()
    assert all(torch.equal(kept.masks[k], spilled.masks[k]) for k in kept.masks)
    state = spilled.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in kept.model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layerwise_statistics_are_identical_spilled_or_not(tmp_path, dtype):
    x = _ids(n=7)

    def walk(budget: float):
        m = _model().to(dtype)
        stats = []
        with calib.Layerwise(m, x, 3, CPU, budget, tmp_path / SPILL_DIR) as w:
            assert w.hidden.spilled == (budget < 1) and w.hidden.dtype == dtype
            for _, layer in w.each_layer():
                stats.append(calib.collect(layer, lambda: w.forward(layer, update=False), gram=True))
            return stats, list(w.hidden)

    (mem_stats, mem_out), (disk_stats, disk_out) = walk(float("inf")), walk(0.0)
    for a, b in zip(mem_stats, disk_stats):
        assert all(torch.equal(a[name].xtx, b[name].xtx) and a[name].n == b[name].n for name in calib.LINEARS)
    assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(mem_out, disk_out))
    assert not (tmp_path / SPILL_DIR).exists()


def test_chunked_calibration_loss_equals_the_hf_labels_loss(monkeypatch):
    m, x = _model(), _ids(n=8)
    total = count = 0.0
    with torch.no_grad():
        for b in calib.batches(x, 3):
            n = b.numel() - b.shape[0]
            total, count = total + float(m(input_ids=b, labels=b).loss) * n, count + n
    monkeypatch.setattr(calib, "LOSS_CHUNK_TOKENS", 7)  # several chunks per batch, the last one short
    assert calib.lm_loss(m, x, 3) == pytest.approx(total / count, rel=1e-6)


def test_the_stored_dtype_is_read_from_config_json(tmp_path):
    from prunectl.model import stored_dtype

    for key, value, expected in (("dtype", "bfloat16", torch.bfloat16), ("torch_dtype", "float16", torch.float16),
                                 ("other", "x", torch.float32)):
        (tmp_path / "config.json").write_text(json.dumps({key: value}))
        assert stored_dtype(tmp_path) == expected


BF16_RECIPE = """
name: test-prune-bf16-{method}
stage: prune
parent: {parent}
data: test-data@latest
calibration: {{range: calibration, samples: 16, seq_len: 64, micro_batch: 4, memory_gb: 1.0e-6}}
heldout: {{range: validation, tokens: 4096, seq_len: 64}}
prune: {{method: {method}, ratio: 0.5, search: {{candidates: 2}}}}
launch: {{tasks_per_node: 1, cpus_per_task: 2, time_min: 15}}
"""


@pytest.mark.slow
def test_a_bf16_parent_is_pruned_and_saved_in_bf16(fresh_runs):
    """Two prune jobs (~15 s each): Wanda with its hidden states spilled, Minitron-width's host-side cuts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    runs, env, recipes = fresh_runs["runs"], fresh_runs["env"], fresh_runs["recipes"]
    parent = runs.parent / "parent-bf16"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).to(torch.bfloat16).save_pretrained(parent)
    AutoTokenizer.from_pretrained(runs / "test-data" / "v001" / "tokenizer").save_pretrained(parent)
    for method in ("wanda", "minitron-width"):
        name = f"test-prune-bf16-{method}"
        (recipes / f"{name}.yaml").write_text(BF16_RECIPE.format(parent=parent, method=method))
        prunectl("prune", name, "--executor", "local", env=env, timeout=600)
        run = runs / name / "v001"
        assert manifest(runs, name)["status"] == "complete"
        report = json.loads((run / "report.json").read_text())
        assert report["dtype"] == "bfloat16"
        assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"
        assert not (run / SPILL_DIR).exists()
        if method == "wanda":
            assert report["calibration_memory"]["spilled"] and report["calibration_memory"]["dtype"] == "bfloat16"
        code = ("import torch; from transformers import AutoModelForCausalLM\n"
                f"m = AutoModelForCausalLM.from_pretrained({str(run / 'final')!r})\n"
                "x = torch.arange(32)[None]; loss = float(m(x, labels=x).loss)\n"
                "print({str(p.dtype) for p in m.parameters()} == {'torch.bfloat16'} and loss == loss)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "True", (method, out.stdout, out.stderr)


def test_a_cut_shares_no_storage_with_its_parent():
    from prunectl.prune.surgery import cut

    m = _model()
    parent = {t.untyped_storage().data_ptr() for t in m.state_dict().values()}
    for small in (cut(m, hidden=torch.arange(0, 64, 2), ffn=[torch.arange(64)] * 3), cut(m, layers=[0, 2])):
        assert not parent & {t.untyped_storage().data_ptr() for t in small.state_dict().values()}
        small(_ids())  # and it runs

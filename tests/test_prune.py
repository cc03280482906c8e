"""`prunectl prune` end to end on a small parent trained inside the test session."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime

import pytest

from .conftest import manifest, prunectl

pytestmark = pytest.mark.slow  # every test reads the `pruned` fixture: a parent trained, then eleven prune jobs


def test_every_method_leaves_a_complete_run_that_loads_with_the_reported_size(pruned, workspace):
    for key, report in pruned["reports"].items():
        assert pruned["loaded"][key]["total"] == report["parameters"]["after"]["total"], key
        # the phases account for the job: from loading the parent to saving the result, in real seconds that fit
        # inside the run's own lifetime (created -> finished, whole seconds in the manifest)
        phases = report["phases"]
        assert phases[0]["phase"] == "load" and phases[-1]["phase"] == "save", (key, phases)
        m = manifest(workspace["runs"], f"test-prune-{key}")
        lifetime = (datetime.fromisoformat(m["finished"]) - datetime.fromisoformat(m["created"])).total_seconds()
        assert 0 < sum(p["seconds"] for p in phases) <= lifetime + 1, (key, phases, lifetime)
        assert all(p["peak_memory_mb"] > 0 for p in phases), key
        assert report["calibration_loss"]["after"] is not None or key.startswith("magnitude")
    depth = pruned["reports"]["depth"]
    assert pruned["loaded"]["depth"]["layers"] == depth["architecture"]["after"]["layers"] < 4
    assert depth["calibration"]["range"] == "calibration" and depth["calibration"]["tokens"] == 128 * 64


def test_sparse_outputs_have_exactly_the_requested_sparsity(pruned):
    loaded = pruned["loaded"]
    for key in ("wanda", "sparsegpt", "magnitude", "wanda-24", "sparsegpt-24", "magnitude-24"):
        assert loaded[key]["zeros_match_masks"], key
        assert pruned["reports"][key]["achieved_ratio"] == pytest.approx(0.5, abs=1e-9), key
    assert loaded["wanda"]["row_sparsity"] == [0.5]  # every row of every Linear
    assert loaded["sparsegpt"]["layer_sparsity"] == [0.5]  # every Linear
    for key in ("wanda-24", "sparsegpt-24", "magnitude-24"):
        assert loaded[key]["max_nonzero_per_4"] <= 2, key


def test_quality_ordering_after_pruning(pruned):
    ppl = {key: r["heldout"]["perplexity_after"] for key, r in pruned["reports"].items()}
    assert ppl["sparsegpt"] < ppl["magnitude"]
    # At this toy scale RMSNorm leaves input-feature norms nearly uniform, so Wanda's |W| x ||X|| ranks weights
    # almost as magnitude does (within 0.1% on this parent since ranges are hash-assigned): it must not be worse
    # beyond that; SparseGPT, which uses the whole calibration Hessian, must be strictly better.
    assert ppl["wanda"] < ppl["magnitude"] * 1.01
    assert ppl["sparsegpt"] < ppl["sparsegpt-24"]
    assert ppl["wanda"] < ppl["wanda-24"]


def test_architecture_search_picks_the_best_candidate_it_tried(pruned):
    for key in ("width", "flap", "depth", "sheared"):
        candidates = pruned["reports"][key]["candidates"]
        assert len(candidates) >= 2, key
        chosen = [c for c in candidates if c["selected"]]
        assert len(chosen) == 1 and chosen[0]["calibration_loss"] == min(c["calibration_loss"] for c in candidates)
    after = pruned["reports"]["width"]["architecture"]["after"]
    assert 2 * after["hidden"] <= after["ffn"] <= 4 * after["hidden"]
    assert pruned["reports"]["flap"]["architecture"]["after"]["hidden"] == 64
    sheared = pruned["reports"]["sheared"]
    assert all(c["mask_tokens"] == 16384 for c in sheared["candidates"])  # the budget, exactly
    assert sheared["achieved_ratio"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("override, message", [
    ("prune.method=obs", "prune.method"),
    ("prune.ratio=1.5", "prune.ratio"),
    ("prune.ratio=0.99", "infeasible"),
    ("parent=nobody@latest", "parent: nobody@latest"),
    ("calibration.samples=100000", "calibration.samples"),
    ("calibration.range=validation", "calibration"),
    ("prune.pattern=3:8", "pattern"),
])
def test_bad_prune_recipes_fail_in_one_line_and_write_nothing(pruned, workspace, override, message):
    runs, env = workspace["runs"], workspace["env"]
    before = sorted(p.name for p in runs.iterdir())
    out = prunectl("prune", "test-prune-depth", override, "--executor", "local", env=env, check=False)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr
    assert sorted(p.name for p in runs.iterdir()) == before
    assert not (runs / "test-prune-depth" / "v002").exists()


SHEARED_ZERO3 = """
name: test-sheared-zero3
stage: prune
parent: {parent}
data: test-data@latest
calibration: {{range: calibration, samples: 16, seq_len: 64, micro_batch: 8}}
heldout: {{range: validation, tokens: 4096, seq_len: 64}}
prune:
  method: sheared-llama
  ratio: 0.5
  sheared:
    targets: [{{layers: 1, hidden: 48, heads: 2, ffn: 96}}, {{hidden: 40, heads: 2, ffn: 64}}]
    mask_lr: 0.3
    train: {{tokens: 4096, data_ranges: [retrain], seq_len: 64, global_batch: 16, micro_batch: 8, zero_stage: 3,
            checkpoint_every: 0, eval_every: 0, eval_tokens: 2048, log_every: 2,
            deepspeed: {{zero_optimization: {{stage3_param_persistence_threshold: 0}}}}}}
launch: {{tasks_per_node: 2, cpus_per_task: 1, time_min: 15}}
"""


def test_sheared_llama_under_zero3_on_two_ranks_cuts_a_model_of_the_target_shape(fresh_runs):
    """Every weight and every mask partitioned (persistence threshold 0): masks still learn, the cut reads the
    consolidated weights, the two candidates are scored one per rank, and final/ loads with the chosen shape."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunectl.prune.hardconcrete import l0

    runs, env, recipes = fresh_runs["runs"], fresh_runs["env"], fresh_runs["recipes"]
    parent = runs.parent / "parent"  # a Hugging Face directory: no pretraining job needed for shapes
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(parent)
    AutoTokenizer.from_pretrained(runs / "test-data" / "v001" / "tokenizer").save_pretrained(parent)
    (recipes / "sheared-zero3.yaml").write_text(SHEARED_ZERO3.format(parent=parent))

    prunectl("prune", "test-sheared-zero3", "--executor", "local", env=env, timeout=900)
    run = runs / "test-sheared-zero3" / "v001"
    m = manifest(runs, "test-sheared-zero3")
    assert m["status"] == "complete"
    start = float(l0(torch.tensor(3.0)))  # init_log_alpha's expected fraction
    for k in range(2):
        summary = json.loads((run / "sheared" / f"candidate{k}" / "dense" / "masks_summary.json").read_text())
        # ZeRO-3 really partitioned the masks and the weights (this rank held a slice of each at the end) ...
        assert summary["partitioned"]["masks"] == ["layers", "kv_groups", "hidden", "ffn"]
        assert summary["partitioned"]["weights"] == summary["partitioned"]["of_weights"] > 0
        # ... and the masks learned through it: the Lagrangian pulled every width axis below where it started
        assert all(summary["expected"][f"expected_{a}"] < start - 1e-3 for a in ("kv_groups", "hidden", "ffn"))
    logs = {p.name.split("_")[1]: p.read_text() for p in (run / "logs").glob("*_log.out")}
    assert "scoring candidate0 on rank 0" in logs["0"] and "scoring candidate1 on rank 1" in logs["1"]
    report = json.loads((run / "report.json").read_text())
    chosen = [c for c in report["candidates"] if c["selected"]]
    assert len(chosen) == 1 and chosen[0]["calibration_loss"] == min(c["calibration_loss"] for c in report["candidates"])
    shape = {key: chosen[0][key] for key in ("layers", "hidden", "heads", "ffn")}
    assert shape in ({"layers": 1, "hidden": 48, "heads": 2, "ffn": 96}, {"layers": 2, "hidden": 40, "heads": 2, "ffn": 64})

    code = (
        "import json, sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(run / 'final')!r})\n"
        "c = m.config; x = torch.arange(32)[None]\n"
        "print(json.dumps({'layers': c.num_hidden_layers, 'hidden': c.hidden_size, 'heads': c.num_attention_heads,"
        " 'ffn': c.intermediate_size, 'loss': float(m(x, labels=x).loss)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert {key: loaded[key] for key in shape} == shape
    assert math.isfinite(loaded["loss"])
    assert report["architecture"]["after"]["parameters"] == report["parameters"]["after"]["total"]

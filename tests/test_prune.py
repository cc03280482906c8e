"""`prunectl prune` end to end on a small parent trained inside the test session."""

from __future__ import annotations

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

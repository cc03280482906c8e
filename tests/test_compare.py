"""compare: the tables' numbers and signs, stderr marking, token matching (refused, or flagged on request), outputs.

The runs here are small fixtures: manifests and eval results written as the stages write them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from prunectl import compare as cmp
from prunectl import plots
from prunectl.errors import PrunectlError
from prunectl.evaluate.config import EvalConfig

from .conftest import prunectl, refused

EVAL = EvalConfig()
PARENT_USE = [("pretrain", 1000, 5000)]
RETRAIN_USE = [("retrain", 100, 600)]


def make_run(root: Path, name: str, stage: str, inputs=None, use=None, summary=None, results=None) -> str:
    run = root / name / "v001"
    run.mkdir(parents=True)
    data = None
    if use is not None:
        tokens = sum(b - a for _, a, b in use)
        data = {"data": "d@v001", "ranges": sorted({r for r, _, _ in use}), "seq_len": 10, "sequences": tokens // 10,
                "tokens": tokens, "budget_tokens": tokens, "epochs": 1.0, "seed": 0,
                "intervals": [{"range": r, "start": a, "end": b} for r, a, b in use]}
    manifest = {"name": name, "version": 1, "stage": stage, "status": "complete", "inputs": inputs or {},
                "data": data, "summary": summary or {}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    if results is not None:
        (run / "eval").mkdir()
        (run / "eval" / f"{EVAL.key()}.json").write_text(json.dumps(results))
    return f"{name}@v001"


def results(loss: float, ppl: float, acc: float, n: int = 400, params: int = 1000) -> dict:
    se = (acc * (1 - acc) / n) ** 0.5
    return {"heldout": {"loss": loss}, "perplexity": {"wiki": {"perplexity": ppl}},
            "zero_shot": {"tasks": {"cont": {"n": n, "metric": "acc", "value": acc, "acc": acc, "acc_stderr": se}}},
            "parameters": {"total": params, "nonzero": params}}


def method(root: Path, tag: str, retrain: tuple, scratch: tuple, scratch_use=RETRAIN_USE, total=None, total_use=None):
    """A prune run of a shared parent, its P-R_N run and S_N twin (and optionally S_total)."""
    if not (root / "parent").exists():
        make_run(root, "parent", "pretrain", use=PARENT_USE, results=results(4.0, 60.0, 0.9, params=2000))
    prune = make_run(root, f"{tag}-prune", "prune", {"parent": "parent@v001"},
                     summary={"method": tag.split("-")[0], "target_ratio": 0.5})
    spec = {"label": tag, "retrain": [make_run(root, f"{tag}-r", "retrain", {"init": prune}, RETRAIN_USE, results=results(*retrain))],
            "scratch": [make_run(root, f"{tag}-s", "pretrain", {"like": prune}, scratch_use, results=results(*scratch))]}
    if total:
        spec["total"] = make_run(root, f"{tag}-t", "pretrain", {"like": prune}, total_use, results=results(*total))
    return cmp.MethodRuns.model_validate(spec)


def test_tables_signs_and_stderr(tmp_path: Path):
    root = tmp_path / "runs"
    depth = method(root, "depth-50", (4.5, 90.0, 0.80), (5.5, 250.0, 0.70),
                   total=(4.4, 85.0, 0.79), total_use=PARENT_USE + RETRAIN_USE)
    wanda = method(root, "wanda-50", (4.4, 80.0, 0.81), (5.2, 200.0, 0.805))
    c = cmp.build(root, cmp.CompareConfig(methods=[depth, wanda]), EVAL)

    assert c.metrics == ["loss", "ppl:wiki", "acc:cont", "avg"] and c.perplexity == "wiki"
    assert cmp.finding_1(c) == {"depth-50": True, "wanda-50": True}
    summary = cmp.summary_table(c)
    row = {col: cell.value for col, cell in zip(summary.columns, summary.rows[0])}
    assert row["held-out loss S_N"] == 5.5 and row["held-out loss P-R_N"] == 4.5 and row["held-out loss S_total"] == 4.4
    assert row["avg acc % P-R_N"] == pytest.approx(80.0) and row["N"] == "500"
    # Table 16 rows: S_N, P-R_N, delta S_N, S_total, delta S_total; positive = the pruned model is better
    per = cmp.per_benchmark_table(c)
    rows = {(r[0].value, r[1].value): {col: cell for col, cell in zip(per.columns, r)} for r in per.rows}
    d = rows[("depth-50", "delta S_N")]
    assert d["held-out loss"].value == pytest.approx(1.0) and d["ppl wiki"].value == pytest.approx(160.0)
    assert d["cont"].value == pytest.approx(10.0) and not d["cont"].within_stderr
    assert rows[("depth-50", "delta S_total")]["held-out loss"].value == pytest.approx(-0.1)
    # 0.81 against 0.805 on 400 items: well inside sqrt(se1^2 + se2^2) ~ 2.8 points
    close = rows[("wanda-50", "delta S_N")]["cont"]
    assert close.within_stderr and close.text().endswith("~")
    assert ("wanda-50", "S_total") not in rows

    out = tmp_path / "out"
    written = {p.name for p in cmp.write(c, out) + plots.plot_all(c, out)}
    assert {"tables.md", "summary.csv", "per_benchmark.csv", "tables.tex", "compare.json",
            "model_sizes.png", "total_budget.png"} <= written
    data = json.loads((out / "compare.json").read_text())
    assert data["finding_1"] == {"depth-50": True, "wanda-50": True}
    assert data["methods"][0]["budgets"][0]["token_matched"] is True
    assert "| wanda-50 | delta S_N |" in (out / "tables.md").read_text()
    assert (out / "model_sizes.png").read_bytes()[:4] == b"\x89PNG"


def test_budgets_and_ratios_tables(tmp_path: Path):
    root = tmp_path / "runs"
    make_run(root, "parent", "pretrain", use=PARENT_USE, results=results(4.0, 60.0, 0.9))
    specs = []
    for ratio, gap in ((0.5, 1.0), (0.75, 0.2)):
        prune = make_run(root, f"depth-{ratio}", "prune", {"parent": "parent@v001"},
                         summary={"method": "minitron-depth", "target_ratio": ratio})
        specs.append(cmp.MethodRuns(label=f"D {ratio}", retrain=[
            make_run(root, f"r-{ratio}", "retrain", {"init": prune}, RETRAIN_USE, results=results(5.0, 100, 0.8))],
            scratch=[make_run(root, f"s-{ratio}", "pretrain", {"like": prune}, RETRAIN_USE,
                              results=results(5.0 + gap, 150, 0.7))]))
    longer = [("retrain", 100, 1100)]
    prune = "depth-0.5@v001"
    specs[0].retrain.append(make_run(root, "r-long", "retrain", {"init": prune}, longer, results=results(4.6, 90, 0.82)))
    specs[0].scratch.append(make_run(root, "s-long", "pretrain", {"like": prune}, longer, results=results(5.1, 140, 0.75)))
    c = cmp.build(root, cmp.CompareConfig(methods=specs), EVAL)
    budgets = cmp.budget_table(c)
    assert [(r[1].value, r[2].value) for r in budgets.rows] == [("S_N", "500"), ("P-R_N", "500"), ("delta S_N", ""),
                                                               ("S_N", "1k"), ("P-R_N", "1k"), ("delta S_N", "")]
    assert "token_budgets.png" in {p.name for p in plots.plot_all(c, tmp_path / "out")}  # Figure 3 needs two budgets
    ratios = cmp.ratio_table(c)
    assert [r[1].value for r in ratios.rows] == ["50.0%", "75.0%"]
    deltas = [r[ratios.columns.index("held-out loss delta")].value for r in ratios.rows]
    assert deltas == pytest.approx([1.0, 0.2])  # the advantage shrinks as the ratio grows


def test_not_token_matched_is_refused_or_flagged(tmp_path: Path):
    root = tmp_path / "runs"
    spec = method(root, "width-50", (4.5, 90.0, 0.8), (5.0, 150.0, 0.7), scratch_use=[("retrain", 100, 400)])
    with pytest.raises(PrunectlError) as err:
        cmp.build(root, cmp.CompareConfig(methods=[spec]), EVAL)
    (line,) = err.value.problems
    assert "width-50-s@v001 (S_N) consumed 300 tokens (retrain [100, 400))" in line
    assert "width-50-r@v001 (P-R_N) consumed 500 tokens (retrain [100, 600))" in line
    assert "--allow-mismatch" in line
    c = cmp.build(root, cmp.CompareConfig(methods=[spec]), EVAL, allow_mismatch=True)
    assert c.methods[0].pairs[0].matched is False and len(c.problems) == 1
    assert "NOT token-matched" in cmp.summary_table(c).rows[0][0].value


def test_total_twin_must_cover_parent_and_retrain(tmp_path: Path):
    root = tmp_path / "runs"
    spec = method(root, "flap-50", (4.5, 90.0, 0.8), (5.0, 150.0, 0.7), total=(4.4, 80.0, 0.8),
                  total_use=[("pretrain", 1000, 4000), *RETRAIN_USE])
    with pytest.raises(PrunectlError) as err:
        cmp.build(root, cmp.CompareConfig(methods=[spec]), EVAL)
    assert "flap-50-t@v001 (S_total) consumed 3,500 tokens" in err.value.problems[0]
    assert "parent@v001 pretrained on 4,000 tokens plus flap-50-r@v001's 500" in err.value.problems[0]


def test_cli_refuses_mismatch_in_one_line_and_writes_nothing(tmp_path: Path):
    root = tmp_path / "runs"
    spec = method(root, "wanda-50", (4.5, 90.0, 0.8), (5.0, 150.0, 0.7), scratch_use=[("retrain", 200, 700)])
    recipe = tmp_path / "cmp.yaml"
    recipe.write_text(yaml.safe_dump({"name": "cmp", "stage": "compare", "eval": EVAL.model_dump(mode="json"),
                                      "compare": {"methods": [spec.model_dump()]}}))
    env = dict(os.environ)
    out = refused(env, root, "compare", str(recipe), "--runs-dir", str(root))
    assert "not token-matched: wanda-50: wanda-50-s@v001 (S_N) consumed 500 tokens (retrain [200, 700))" in out
    assert not (root / "cmp").exists()
    done = prunectl("compare", str(recipe), "--runs-dir", str(root), "--allow-mismatch", env=env)
    # the written result says which pair is not token-matched, for whoever reads it later
    assert json.loads((root / "cmp" / "v001" / "compare.json").read_text())["methods"][0]["budgets"][0]["token_matched"] is False
    assert "not token-matched: wanda-50" in done.stderr and (root / "cmp" / "v001" / "tables.md").exists()
    assert "NOT token-matched" in (root / "cmp" / "v001" / "tables.md").read_text()
    manifest = json.loads((root / "cmp" / "v001" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["not_token_matched"]

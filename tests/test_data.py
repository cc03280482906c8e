"""Data: disjoint ranges of whole documents, exact recorded consumption, deterministic order, local sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from prunectl import data
from prunectl.errors import PrunectlError


def test_ranges_are_disjoint_and_tile_the_stream(workspace):
    folder = workspace["runs"] / "test-data" / "v001"
    meta = json.loads((folder / "data.json").read_text())
    spans = sorted((r["start"], r["end"]) for r in meta["ranges"].values())
    files = [f for r in meta["ranges"].values() for f in r["files"]]
    assert spans[0][0] == 0 and spans[-1][1] == meta["total_tokens"] == sum(f["tokens"] for f in files)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    assert all(r["end"] - r["start"] == sum(f["tokens"] for f in r["files"]) for r in meta["ranges"].values())
    assert len(files) > len(meta["ranges"])  # a file per range and unit: reads cross file boundaries
    # the model has to beat a unigram model: the bar is recorded with the data
    assert 4.0 < meta["unigram_entropy_nats"] < np.log(meta["tokenizer"]["vocab_size"])


def test_validation_text_never_appears_in_pretrain(workspace):
    """Whole documents are dealt to ranges, so a validation passage is not in the training range."""
    stream = data.TokenStream(workspace["runs"] / "test-data" / "v001")
    val, pre = stream.range("validation"), stream.range("pretrain")
    val_tokens = stream.read(val.start, len(val))
    pre_tokens = stream.read(pre.start, len(pre)).tobytes()
    probe = val_tokens[100:132].tobytes()
    assert probe not in pre_tokens


def test_stream_read_matches_tokenizer(workspace):
    folder = workspace["runs"] / "test-data" / "v001"
    stream = data.TokenStream(folder)
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    first = stream.read(0, 50)
    assert first[0] == tok.bos_token_id
    text = tok.decode(first[1:20])
    assert tok(text)["input_ids"][0] == tok.bos_token_id  # tokenizer(text) starts with BOS, like training docs


def test_plan_is_deterministic_exact_and_a_prefix():
    ranges = [data.TokenRange("pretrain", 1000, 1000 + 64 * 10), data.TokenRange("retrain", 5000, 5000 + 64 * 6 + 7)]
    plan = data.SequencePlan(ranges, 64, 12, seed=3)
    again = data.SequencePlan(ranges, 64, 12, seed=3)
    assert np.array_equal(plan.starts(0, 12), again.starts(0, 12))
    assert np.array_equal(plan.starts(4, 5), again.starts(0, 12)[4:9])  # resume mid-run: same sequences
    assert sorted(plan.starts(0, 12)) == [1000 + 64 * i for i in range(10)] + [5000, 5064]
    assert plan.intervals() == [data.TokenRange("pretrain", 1000, 1640), data.TokenRange("retrain", 5000, 5128)]
    assert not np.array_equal(plan.starts(0, 12), data.SequencePlan(ranges, 64, 12, seed=4).starts(0, 12))


def test_plan_over_budget_runs_whole_epochs():
    plan = data.SequencePlan([data.TokenRange("r", 0, 64 * 4)], 64, 10, seed=0)
    starts = plan.starts(0, 10)
    assert sorted(starts[:4]) == sorted(starts[4:8]) == [0, 64, 128, 192]
    assert plan.epochs == 2.5 and plan.intervals() == [data.TokenRange("r", 0, 256)]
    with pytest.raises(IndexError):
        plan.starts(8, 3)


def test_jsonl_grouping_parquet_and_saved_hf_dataset(tmp_path):
    import datasets

    rows = [{"book": b, "chapter": c, "text": f"{b} {c} verse {v}"} for b in "AB" for c in (1, 2) for v in range(3)]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grouped = data.read_documents(data.DataConfig(
        sources=[data.SourceConfig(kind="jsonl", path=str(tmp_path / "x.jsonl"), group_by=["book", "chapter"])]))
    assert grouped == [f"{b} {c} verse 0\n{b} {c} verse 1\n{b} {c} verse 2" for b in "AB" for c in (1, 2)]

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    from_parquet = data.read_documents(data.DataConfig(sources=[data.SourceConfig(kind="parquet", path=str(tmp_path / "x.parquet"))]))
    from_hf = data.read_documents(data.DataConfig(sources=[data.SourceConfig(kind="hf", dataset=str(tmp_path / "saved"))]))
    assert from_parquet == from_hf == [r["text"] for r in rows]


def test_missing_hub_dataset_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # `datasets` and `huggingface_hub` read these once, at import: an earlier test in this process may have imported
    # them, and then the lookup would go to the network (23 s of retries on a machine without one) instead of failing
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PrunectlError, match="not in the local cache"):
        data.read_documents(data.DataConfig(sources=[data.SourceConfig(kind="hf", dataset="someone/absent-corpus")]))


def test_too_little_text_for_a_range():
    with pytest.raises(PrunectlError, match="got no document"):
        data.deal_ranges(["only one document"], {"validation": 0.1, "retrain": 0.1, "pretrain": 0.8}, 0)


def test_preparing_the_same_recipe_again_is_a_no_op(workspace):
    from .conftest import prunectl

    out = prunectl("data", "prepare", str(workspace["recipes"] / "data.yaml"), env=workspace["env"])
    assert "test-data@v001 already holds this exact recipe" in out.stdout
    assert not (workspace["runs"] / "test-data" / "v002").exists()


def test_an_hf_source_streams_and_max_docs_stops_reading(tmp_path, monkeypatch):
    import datasets

    from prunectl.data import DataConfig, SourceConfig, read_documents

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "train-00000.jsonl", "w") as handle:
        for i in range(1000):
            handle.write(json.dumps({"text": f"document {i} " * 30}) + "\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loaded.append(k) or real(*a, **k))
    config = DataConfig(sources=[SourceConfig(kind="hf", dataset=str(tmp_path), max_docs=7)], doc_chars=100_000)
    docs = read_documents(config)
    assert len(docs) == 7 and docs[0].startswith("document 0 ") and loaded[0]["streaming"] is True

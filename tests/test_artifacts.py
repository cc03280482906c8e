"""Typed files between stages: versioned, read as written before versions existed, refused from the future."""

from __future__ import annotations

import json
import os

import pytest

from prunectl.artifacts import DataMeta, EvalResults, PruneReport, StudyGraph
from prunectl.errors import PrunectlError

from .conftest import prunectl

DATA = {"dtype": "uint16", "shard_tokens": 100, "shards": [100, 20], "total_tokens": 120,
        "ranges": {"validation": {"start": 0, "end": 20, "docs": 2, "chars": 90},
                   "pretrain": {"start": 20, "end": 120, "docs": 9, "chars": 400}},
        "tokenizer": {"kind": "bpe", "vocab_size": 1024, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        "documents": 11, "unigram_entropy_nats": 5.5, "seed": 0}


def test_a_file_written_before_versions_reads_as_version_1(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(DATA))  # exactly what the previous prunectl wrote
    meta = DataMeta.read(tmp_path)
    assert meta.schema_version == 1
    assert meta.ranges["pretrain"].tokens == 100 and meta.tokenizer.vocab_size == 1024
    assert meta.summary().ranges == {"validation": [0, 20], "pretrain": [20, 120]}


def test_written_files_carry_their_version_and_keep_unknown_keys(tmp_path):
    meta = DataMeta.model_validate({**DATA, "added_by_a_newer_minor": 7})
    meta.write(tmp_path)
    raw = json.loads((tmp_path / "data.json").read_text())
    assert raw["schema_version"] == DataMeta.SCHEMA and raw["added_by_a_newer_minor"] == 7
    assert DataMeta.read(tmp_path).model_dump(exclude={"schema_version"}) == meta.model_dump(exclude={"schema_version"})


@pytest.mark.parametrize("cls", [DataMeta, PruneReport, EvalResults, StudyGraph])
def test_a_newer_schema_is_refused_in_one_line(tmp_path, cls):
    path = tmp_path / (cls.FILE or "results.json")
    path.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(PrunectlError) as err:
        cls.read(path)
    assert err.value.problems == [f"{path}: schema version 99 is newer than this prunectl reads ({cls.SCHEMA}); upgrade prunectl"]


def test_a_damaged_file_is_one_clear_error(tmp_path):
    (tmp_path / "data.json").write_text("{not json")
    with pytest.raises(PrunectlError, match="not valid JSON"):
        DataMeta.read(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps({**DATA, "ranges": {"x": {"start": "a"}}}))
    with pytest.raises(PrunectlError, match=r"ranges\.x\.start"):
        DataMeta.read(tmp_path)


def test_status_of_a_study_with_a_future_graph_is_refused_not_a_traceback(tmp_path):
    runs = tmp_path / "runs"
    study = runs / "my-study" / "v001"
    study.mkdir(parents=True)
    (study / "manifest.json").write_text(json.dumps({"name": "my-study", "version": 1, "stage": "study",
                                                     "status": "complete"}))
    (study / "graph.json").write_text(json.dumps({"schema_version": 2, "nodes": []}))
    out = prunectl("status", "my-study", env={**os.environ, "PRUNECTL_RUNS": str(runs)}, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"error: {study / 'graph.json'}: schema version 2 is newer than this prunectl reads " \
                                 "(1); upgrade prunectl"

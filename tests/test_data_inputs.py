"""Data inputs are checked before anything is written; a refused prepare leaves nothing; a full disk fails one line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from prunectl import data, store
from prunectl.errors import PrunectlError

from .conftest import manifest, refused

WORDS = "the quick brown fox jumps over a lazy dog while seven ravens watch from an old oak".split()


@pytest.fixture()
def env(tmp_path) -> dict:
    runs = tmp_path / "runs"
    runs.mkdir()
    return {"runs": runs, "env": {**os.environ, "PRUNECTL_RUNS": str(runs)}}


def _recipe(tmp_path: Path, source: str, name: str = "inputs") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nstage: data\ndata:\n  sources: [{source}]\n  tokenizer: {{vocab_size: 300}}\n"
                    "  doc_chars: 100\n  choice_task: null\n")
    return str(path)


def _jsonl(path: Path, docs: int = 40) -> Path:
    lines = [json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(30))}) for i in range(docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(**source) -> data.DataConfig:
    return data.DataConfig(sources=[data.SourceConfig(**source)])


def test_malformed_jsonl_and_empty_glob_are_refused_leaving_nothing(env, tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl")
    bad.write_text(bad.read_text().replace('{"text"', "{text", 1))
    err = refused(env["env"], env["runs"], "data", "prepare", _recipe(tmp_path, f"{{kind: jsonl, path: {bad}}}"),
                  written="*")
    assert err == f"error: data.sources: {bad} line 1: not valid JSON (Expecting property name enclosed in double " \
                  "quotes at column 2); a jsonl source holds one JSON object per line\n"
    err = refused(env["env"], env["runs"], "data", "prepare",
                  _recipe(tmp_path, f"{{kind: text, path: '{tmp_path}/none/*.txt'}}"), written="*")
    assert err.count("\n") == 1 and "no files match" in err


def test_too_little_text_fails_the_run_in_one_line(env, tmp_path):
    """Whether every range gets a document is known only once every unit is read: finalize fails the run."""
    from .conftest import prunectl

    one = _jsonl(tmp_path / "one.jsonl", docs=1)  # readable, but too little text for three ranges
    out = prunectl("data", "prepare", _recipe(tmp_path, f"{{kind: jsonl, path: {one}}}"), env=env["env"], check=False)
    assert out.returncode == 1 and "Traceback" not in out.stdout
    m = manifest(env["runs"], "inputs")
    assert m["status"] == "failed" and "got no document" in m["note"] and "\n" not in m["note"]


def test_source_checks_name_the_file_and_line(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n\n["a", "list"]\n')
    with pytest.raises(PrunectlError, match=r"rows.jsonl line 3: a JSON list, not an object"):
        data.check_sources(_config(kind="jsonl", path=str(rows)))
    rows.write_text('{"body": "no text field"}\n')
    with pytest.raises(PrunectlError, match=r"rows.jsonl line 1: record has no field 'text' \(fields: body\)"):
        data.check_sources(_config(kind="jsonl", path=str(rows)))

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(PrunectlError, match=r"t.parquet: no column 'text' \(columns: body\)"):
        data.check_sources(_config(kind="parquet", path=str(tmp_path / "t.parquet")))
    data.check_sources(_config(kind="parquet", path=str(tmp_path / "t.parquet"), field="body"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PrunectlError, match=r"junk.parquet: not a readable parquet file"):
        data.check_sources(_config(kind="parquet", path=str(tmp_path / "junk.parquet")))

    text = tmp_path / "locked.txt"
    text.write_text("words")
    real_open = open

    def denied(path, *args, **kw):  # tests may run as root, where chmod 000 denies nothing
        if Path(path) == text:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(PrunectlError) as caught:
        data.check_sources(data.DataConfig(sources=[data.SourceConfig(kind="text", path=str(text)),
                                                    data.SourceConfig(kind="jsonl", path=str(tmp_path / "no*.jsonl"))]))
    assert caught.value.problems == [f"data.sources: cannot read {text}: Permission denied",
                                     f"data.sources: no files match {tmp_path}/no*.jsonl"]


def test_disk_full_while_writing_tokens_fails_the_run_in_one_line(env, tmp_path, monkeypatch):
    from prunectl import submission
    from prunectl.recipe import resolve

    recipe = resolve(_recipe(tmp_path, f"{{kind: jsonl, path: {_jsonl(tmp_path / 'docs.jsonl')}}}"))
    real = data.encode

    def full(tokenizer, docs, batch=256):
        yield next(real(tokenizer, docs, batch))  # one document written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "encode", full)
    run, _ = submission.submit_data(env["runs"], recipe, "debug", None, False, lambda line: None)
    m = manifest(env["runs"], "inputs")
    assert run.ref == "inputs@v001" and m["status"] == "failed" and "\n" not in m["note"]
    assert m["note"].startswith("no space left on device")
    assert not list((run.dir / "tokens").rglob("*.partial"))  # the partial unit gave its space back
    with pytest.raises(PrunectlError, match="is failed, not complete"):
        store.resolve(env["runs"], "inputs@v001")

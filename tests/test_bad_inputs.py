"""An adversarial corpus of user mistakes, one per case, over every command: the promise for each is

- exactly one line on stderr, starting with `error: `;
- exit code 2;
- no `Traceback` anywhere in the output, and no exception escaping `prunectl.cli.main()`;
- nothing written or changed under the runs root (every path and mtime, empty directories included,
  symlinks not followed), nor anywhere else the command could reach (recipes dir, working directory,
  the case's own fixture files, the shared prepared data run).

Each case runs in this process (`sys.argv` + `prunectl.cli.main()`), so the corpus stays fast. Job
submission is replaced by a sentinel: a bad input that slips through every check reaches it and fails
its case (with "submitted a job") instead of training anything.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from .conftest import PARENT_RECIPE, REPO

# ------------------------------------------------------------------------------------------ fixtures


MINI_DATA = """
name: bi-mini-data
stage: data
description: a few kilobytes of generated text, for data prepare cases
data:
  sources:
    - {{kind: text, path: "{corpus}/*.txt"}}
  tokenizer: {{kind: bpe, vocab_size: 300}}
  ranges: {{validation: 0.05, calibration: 0.05, retrain: 0.2, pretrain: 0.7}}
  doc_chars: 300
  shard_tokens: 4096
  seed: 0
"""

EVAL_RECIPE = """
name: bi-eval
stage: eval
run: bi-fake@latest
eval:
  heldout: {range: validation, tokens: 4096, seq_len: 64}
  perplexity: []
  zero_shot: {tasks: []}
  batch_size: 8
launch: {tasks_per_node: 1, cpus_per_task: 1, time_min: 5}
"""

COMPARE_RECIPE = """
name: bi-compare
stage: compare
eval: bi-eval
compare:
  methods:
    - {label: Missing, retrain: [bi-missing-retrain@latest]}
"""

PRUNE_HF = """
name: bi-prune-hf
stage: prune
parent: {parent}
data: test-data@latest
prune: {{method: wanda, ratio: 0.5}}
calibration: {{range: calibration, samples: 8, seq_len: 64, micro_batch: 8}}
heldout: {{range: validation, tokens: 4096, seq_len: 64}}
launch: {{tasks_per_node: 1, cpus_per_task: 1, time_min: 5}}
"""


@dataclass
class Ctx:
    """Where a case lives: T its own directory, S and R the session's fixtures and recipes."""

    T: Path  # the case's directory (runs root, working directory and its fixture files live here)
    S: Path  # session fixtures: HF model directories, corpus
    R: Path  # the recipes root (PRUNECTL_RECIPES): a copy of recipes/tiny plus this file's recipes
    runs: Path  # the runs root (PRUNECTL_RUNS) = T / "runs"
    data_run: Path | None  # the real prepared `test-data` directory the runs root links to, if the case needs it


@pytest.fixture(scope="session")
def bad_inputs_session(tmp_path_factory) -> dict[str, Path]:
    """Recipes (shipped tiny ones, copied, plus the ones below) and a small generated corpus."""
    base = tmp_path_factory.mktemp("bad-inputs")
    recipes, fixtures = base / "recipes", base / "fixtures"
    shutil.copytree(REPO / "recipes" / "tiny", recipes / "tiny")
    ws = recipes / "ws"
    ws.mkdir()
    corpus = fixtures / "corpus"
    corpus.mkdir(parents=True)
    rng = random.Random(0)
    words = "the a king queen sword river house light dark night day sea land fire stone wind old new".split()
    for i in range(3):
        paragraphs = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))).capitalize() + "."
                      for _ in range(150)]
        (corpus / f"part{i}.txt").write_text("\n\n".join(paragraphs) + "\n")
    (ws / "parent.yaml").write_text(textwrap.dedent(PARENT_RECIPE).replace("name: test-parent", "name: bi-parent"))
    (ws / "mini-data.yaml").write_text(textwrap.dedent(MINI_DATA).format(corpus=corpus))
    (ws / "eval.yaml").write_text(textwrap.dedent(EVAL_RECIPE))
    (ws / "compare.yaml").write_text(textwrap.dedent(COMPARE_RECIPE))
    return {"base": base, "recipes": recipes, "fixtures": fixtures}


def _llama_config(vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": vocab, "max_position_embeddings": 256, "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float32"}


@pytest.fixture(scope="session")
def hf_dirs(bad_inputs_session, workspace) -> dict[str, Path]:
    """Hugging Face Llama directories: a good one (control) and one per defect."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    data_dir = workspace["runs"] / "test-data" / "v001"
    vocab = json.loads((data_dir / "data.json").read_text())["tokenizer"]["vocab_size"]
    out = bad_inputs_session["fixtures"] / "hf"
    good = out / "good"
    config = {k: v for k, v in _llama_config(vocab).items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(good)
    for f in (data_dir / "tokenizer").iterdir():
        shutil.copy(f, good / f.name)
    dirs = {"good": good}
    for defect in ("bad-config", "no-weights", "no-tokenizer", "no-config"):
        dirs[defect] = out / defect
        shutil.copytree(good, dirs[defect])
    (dirs["bad-config"] / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,,, oops')
    for f in dirs["no-weights"].glob("*.safetensors"):
        f.unlink()
    for f in dirs["no-tokenizer"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    (dirs["no-config"] / "config.json").unlink()
    return dirs


# ------------------------------------------------------------------------------------------ fixture files


RANDOM_BYTES = random.Random(1234).randbytes(700)
PNG_HEADER = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00\x1f\xf3\xffa"
              + random.Random(7).randbytes(64))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def fake_run(root: Path, name: str, version: int = 1, status: str = "complete", stage: str = "pretrain",
             final: bool = True, inputs: dict[str, str] | None = None, vocab: int = 4096) -> Path:
    """A run directory that only looks like one: manifest (see store.Manifest) and final/config.json."""
    run = root / name / f"v{version:03d}"
    run.mkdir(parents=True)
    write(run / "manifest.json", json.dumps({"schema_version": 1, "name": name, "version": version, "stage": stage,
                                             "status": status, "inputs": inputs or {}, "executor": "local",
                                             "host": "test", "code_version": "test", "packages": {},
                                             "created": "2026-01-01T00:00:00+00:00"}, indent=2))
    if final:
        write(run / "final" / "config.json", json.dumps(_llama_config(vocab)))
    return run


def outside_data_link(c: Ctx) -> None:
    """T/outside -> the real prepared test-data: `../outside@v001` from the runs root is a complete data run."""
    (c.T / "outside").symlink_to(c.data_run, target_is_directory=True)


def outside_model_run(c: Ctx) -> None:
    """A complete pretrain run outside the runs root (T/elsewhere/model/v001), trained on test-data@v001."""
    fake_run(c.T / "elsewhere", "model", inputs={"data": "test-data@v001"})


def recipe_file(name: str, text: str) -> Callable[[Ctx], None]:
    return lambda c: write(c.T / name, textwrap.dedent(text).format(T=c.T, S=c.S, R=c.R))


def binary_file(name: str, content: bytes) -> Callable[[Ctx], None]:
    return lambda c: write(c.T / name, content)


def both(*setups: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        for s in setups:
            s(c)
    return run


def hf_recipe(defect: str) -> Callable[[Ctx], None]:
    return lambda c: write(c.T / "prune-hf.yaml", textwrap.dedent(PRUNE_HF).format(parent=c.S / "hf" / defect))


# ------------------------------------------------------------------------------------------ the corpus


@dataclass
class Case:
    id: str
    argv: list[str]  # {T}, {S}, {R} are the case dir, session fixtures and recipes root
    data: bool = False  # the runs root holds the prepared test-data run (session `workspace`)
    setup: Callable[[Ctx], None] | None = None
    mentions: tuple[str, ...] = ()  # what the error line names (case-insensitive), e.g. the dotted key
    hf: bool = False  # needs the Hugging Face directories


PARENT = "{R}/ws/parent.yaml"  # bi-parent: a valid pretrain recipe on test-data@latest
MINI = "{R}/ws/mini-data.yaml"  # bi-mini-data: a valid data recipe on a small generated corpus
EVAL = "{R}/ws/eval.yaml"  # bi-eval: run=bi-fake@latest, held-out loss only
WANDA = "{R}/tiny/prune/wanda-50.yaml"
WANDA24 = "{R}/tiny/prune/wanda-2of4.yaml"
RETRAIN = "{R}/tiny/retrain/wanda-50.yaml"

CASES: list[Case] = [
    # ---------------------------------------------------------------- recipes show
    Case("show:unknown-recipe-name", ["recipes", "show", "tiny-parnet"], mentions=("tiny-parnet",)),
    Case("show:missing-recipe-file", ["recipes", "show", "{T}/nope.yaml"], mentions=("nope.yaml",)),
    Case("show:binary-random-bytes", ["recipes", "show", "{T}/random.yaml"],
         setup=binary_file("random.yaml", RANDOM_BYTES), mentions=("random.yaml",)),
    Case("show:binary-png-resolved", ["recipes", "show", "{T}/image.yaml", "--resolved"],
         setup=binary_file("image.yaml", PNG_HEADER), mentions=("image.yaml",)),
    Case("show:empty-file-resolved", ["recipes", "show", "{T}/empty.yaml", "--resolved"],
         setup=binary_file("empty.yaml", b"")),
    Case("show:yaml-list-not-mapping", ["recipes", "show", "{T}/list.yaml", "--resolved"],
         setup=recipe_file("list.yaml", "- stage: pretrain\n- name: x\n"), mentions=("mapping",)),
    Case("show:invalid-yaml", ["recipes", "show", "{T}/broken.yaml", "--resolved"],
         setup=recipe_file("broken.yaml", "name: x\nstage: [pretrain\n"), mentions=("yaml",)),
    Case("show:extends-a-directory", ["recipes", "show", "{T}/child.yaml", "--resolved"],
         setup=both(lambda c: (c.T / "base.d").mkdir(), recipe_file("child.yaml", "extends: base.d\nname: child\n")),
         mentions=("base.d",)),
    Case("show:extends-missing-file", ["recipes", "show", "{T}/child.yaml", "--resolved"],
         setup=recipe_file("child.yaml", "extends: no-such-base.yaml\nname: child\n"), mentions=("no-such-base",)),
    Case("show:extends-itself", ["recipes", "show", "{T}/self.yaml", "--resolved"],
         setup=recipe_file("self.yaml", "extends: self.yaml\nname: me\n"), mentions=("cycle",)),
    Case("show:extends-cycle-of-two", ["recipes", "show", "{T}/a.yaml", "--resolved"],
         setup=both(recipe_file("a.yaml", "extends: b.yaml\nname: a\n"), recipe_file("b.yaml", "extends: a.yaml\n")),
         mentions=("cycle",)),
    Case("show:extends-binary-file", ["recipes", "show", "{T}/child.yaml", "--resolved"],
         setup=both(binary_file("base.yaml", RANDOM_BYTES), recipe_file("child.yaml", "extends: base.yaml\nname: c\n")),
         mentions=("base.yaml",)),
    Case("show:pattern-5:4", ["recipes", "show", WANDA24, "prune.pattern=5:4", "--resolved"], mentions=("prune.pattern",)),
    Case("show:pattern-0:4", ["recipes", "show", WANDA24, "prune.pattern=0:4", "--resolved"], mentions=("prune.pattern",)),
    Case("show:pattern-1:4-is-ambiguous", ["recipes", "show", WANDA24, "prune.pattern=1:4", "--resolved"],
         mentions=("prune.pattern", "keep 1 of 4")),
    Case("show:pattern-words", ["recipes", "show", WANDA24, "prune.pattern=two-of-four", "--resolved"],
         mentions=("prune.pattern",)),
    Case("show:name-../x", ["recipes", "show", PARENT, "name=../x", "--resolved"], mentions=("name",)),
    Case("show:name-/abs", ["recipes", "show", PARENT, "name=/abs", "--resolved"], mentions=("name",)),
    Case("show:name-a@v001", ["recipes", "show", PARENT, "name=a@v001", "--resolved"], mentions=("name",)),
    Case("show:binary-random-bytes-resolved", ["recipes", "show", "{T}/random.yaml", "--resolved"],
         setup=binary_file("random.yaml", RANDOM_BYTES), mentions=("random.yaml",)),
    Case("show:recipe-path-is-a-directory", ["recipes", "show", "{T}/dir.yaml"],
         setup=lambda c: (c.T / "dir.yaml").mkdir(), mentions=("dir.yaml",)),
    Case("show:pattern-contradicts-ratio", ["recipes", "show", WANDA24, "prune.ratio=0.3", "--resolved"],
         mentions=("ratio",)),
    Case("show:unknown-override-key", ["recipes", "show", PARENT, "train.tokns=5", "--resolved"],
         mentions=("train.tokns",)),
    Case("show:override-without-equals", ["recipes", "show", PARENT, "train.tokens", "--resolved"],
         mentions=("train.tokens",)),
    Case("show:unknown-stage", ["recipes", "show", "{T}/stage.yaml", "--resolved"],
         setup=recipe_file("stage.yaml", "name: x\nstage: pretrian\n"), mentions=("stage",)),
    Case("recipes:misspelled-subcommand", ["recipes", "sho", "tiny-parent"], mentions=("sho",)),
    Case("recipes:unknown-option", ["recipes", "ls", "--jsn"], mentions=("--jsn",)),
    # ---------------------------------------------------------------- data prepare
    Case("data:glob-matches-nothing", ["data", "prepare", "{T}/data.yaml"],
         setup=recipe_file("data.yaml", """
             name: bi-glob-data
             stage: data
             data:
               sources: [{{kind: text, path: "{T}/no-such-dir/*.txt"}}]
               tokenizer: {{kind: bpe, vocab_size: 300}}
             """), mentions=("no-such-dir",)),
    Case("data:jsonl-first-line-not-json", ["data", "prepare", "{T}/data.yaml"],
         setup=both(lambda c: write(c.T / "corpus" / "docs.jsonl",
                                    "this line is not JSON\n" + "".join(json.dumps({"text": f"doc {i} " * 40}) + "\n"
                                                                        for i in range(50))),
                    recipe_file("data.yaml", """
             name: bi-jsonl-data
             stage: data
             data:
               sources: [{{kind: jsonl, path: "{T}/corpus/docs.jsonl"}}]
               tokenizer: {{kind: bpe, vocab_size: 300}}
             """)), mentions=("docs.jsonl",)),
    Case("data:jsonl-record-without-field", ["data", "prepare", "{T}/data.yaml"],
         setup=both(lambda c: write(c.T / "corpus" / "docs.jsonl",
                                    "".join(json.dumps({"body": f"doc {i} " * 40}) + "\n" for i in range(50))),
                    recipe_file("data.yaml", """
             name: bi-field-data
             stage: data
             data:
               sources: [{{kind: jsonl, path: "{T}/corpus/docs.jsonl", field: text}}]
               tokenizer: {{kind: bpe, vocab_size: 300}}
             """)), mentions=("text",)),
    Case("data:package-not-installed", ["data", "prepare", MINI, "data.sources=[{kind: text, package: no_such_pkg_bi, path: '*.txt'}]"],
         mentions=("no_such_pkg_bi",)),
    Case("data:hf-tokenizer-path-missing", ["data", "prepare", MINI, "data.tokenizer={kind: hf, path: {T}/no-tokenizer-here}"],
         mentions=("tokenizer",)),
    Case("data:range-share-above-1", ["data", "prepare", MINI, "data.ranges.pretrain=1.5"], mentions=("data.ranges",)),
    Case("data:range-share-nan", ["data", "prepare", MINI, "data.ranges.retrain=.nan"], mentions=("data.ranges",)),
    Case("data:vocab-too-small", ["data", "prepare", MINI, "data.tokenizer.vocab_size=10"],
         mentions=("data.tokenizer.vocab_size",)),
    Case("data:no-sources", ["data", "prepare", MINI, "data.sources=[]"], mentions=("data.sources",)),
    Case("data:seed-negative", ["data", "prepare", MINI, "data.seed=-1"], mentions=("data.seed",)),
    Case("data:doc-chars-wrong-type", ["data", "prepare", MINI, "data.doc_chars=abc"], mentions=("data.doc_chars",)),
    Case("data:unknown-key", ["data", "prepare", MINI, "data.shuffle=true"], mentions=("data.shuffle",)),
    Case("data:name-../x", ["data", "prepare", MINI, "name=../escaped-data"], mentions=("name",)),
    Case("data:name-absolute", ["data", "prepare", MINI, "name={T}/abs-data"], mentions=("name",)),
    Case("data:name-dotdot", ["data", "prepare", MINI, "name=.."], mentions=("name",)),
    Case("data:stage-mismatch", ["data", "prepare", PARENT], mentions=("pretrain",)),
    Case("data:runs-dir-is-a-file", ["data", "prepare", MINI, "--runs-dir", "{T}/a-file"],
         setup=lambda c: write(c.T / "a-file", "not a directory\n"), mentions=("a-file",)),
    Case("data:missing-argument", ["data", "prepare"], mentions=("recipe",)),
    Case("data:misspelled-subcommand", ["data", "prepar", MINI], mentions=("prepar",)),
    # ---------------------------------------------------------------- pretrain: names (a valid recipe otherwise)
    Case("pretrain:name-../x", ["pretrain", PARENT, "name=../x"], data=True, mentions=("name",)),
    Case("pretrain:name-absolute", ["pretrain", PARENT, "name={T}/abs"], data=True, mentions=("name",)),
    Case("pretrain:name-..", ["pretrain", PARENT, "name=.."], data=True, mentions=("name",)),
    Case("pretrain:name-.", ["pretrain", PARENT, "name=."], data=True, mentions=("name",)),
    Case("pretrain:name-empty", ["pretrain", PARENT, "name=''"], data=True, mentions=("name",)),
    Case("pretrain:name-a/b", ["pretrain", PARENT, "name=a/b"], data=True, mentions=("name",)),
    Case("pretrain:name-a@v001", ["pretrain", PARENT, "name=a@v001"], data=True, mentions=("name",)),
    Case("pretrain:name-in-file-../x", ["pretrain", "{T}/named.yaml"], data=True, mentions=("name",),
         setup=recipe_file("named.yaml", "extends: {R}/ws/parent.yaml\nname: ../x\n")),
    # ---------------------------------------------------------------- pretrain: numbers
    Case("pretrain:lr-.inf", ["pretrain", PARENT, "optimizer.lr=.inf"], data=True, mentions=("optimizer.lr",)),
    Case("pretrain:lr-nan", ["pretrain", PARENT, "optimizer.lr=nan"], data=True, mentions=("optimizer.lr",)),
    Case("pretrain:lr-.nan", ["pretrain", PARENT, "optimizer.lr=.nan"], data=True, mentions=("optimizer.lr",)),
    Case("pretrain:weight-decay-.inf", ["pretrain", PARENT, "optimizer.weight_decay=.inf"], data=True,
         mentions=("optimizer.weight_decay",)),
    Case("pretrain:grad-clip-.inf", ["pretrain", PARENT, "optimizer.grad_clip=.inf"], data=True,
         mentions=("optimizer.grad_clip",)),
    Case("pretrain:rope-theta-.inf", ["pretrain", PARENT, "model.rope_theta=.inf"], data=True,
         mentions=("model.rope_theta",)),
    Case("pretrain:seed-negative", ["pretrain", PARENT, "train.seed=-1"], data=True, mentions=("train.seed",)),
    Case("pretrain:betas-[2,3]", ["pretrain", PARENT, "optimizer.betas=[2,3]"], data=True, mentions=("optimizer.betas",)),
    Case("pretrain:betas-[0.9,1.0]", ["pretrain", PARENT, "optimizer.betas=[0.9,1.0]"], data=True,
         mentions=("optimizer.betas",)),
    Case("pretrain:betas-negative", ["pretrain", PARENT, "optimizer.betas=[-0.1,0.95]"], data=True,
         mentions=("optimizer.betas",)),
    Case("pretrain:tokens-zero", ["pretrain", PARENT, "train.tokens=0"], data=True, mentions=("train.tokens",)),
    Case("pretrain:tokens-negative", ["pretrain", PARENT, "train.tokens=-131072"], data=True, mentions=("train.tokens",)),
    Case("pretrain:tokens-abc", ["pretrain", PARENT, "train.tokens=abc"], data=True, mentions=("train.tokens",)),
    Case("pretrain:tokens-.inf", ["pretrain", PARENT, "train.tokens=.inf"], data=True, mentions=("train.tokens",)),
    Case("pretrain:tokens-fractional", ["pretrain", PARENT, "train.tokens=131072.5"], data=True, mentions=("train.tokens",)),
    Case("pretrain:tokens-1e400", ["pretrain", PARENT, "train.tokens=1e400"], data=True, mentions=("train.tokens",)),
    Case("pretrain:override-yaml-python-tag", ["pretrain", PARENT, "train.tokens=!!python/object/apply:os.getcwd []"],
         data=True, mentions=("train.tokens",)),
    Case("pretrain:array-negative-seed", ["pretrain", PARENT, "--array", "train.seed=0,-1"], data=True,
         mentions=("train.seed",)),
    Case("pretrain:name-with-space", ["pretrain", PARENT, "name=a b"], data=True, mentions=("name",)),
    Case("pretrain:name-too-long", ["pretrain", PARENT, "name=" + "n" * 300], data=True, mentions=("name",)),
    Case("pretrain:tokens-below-one-step", ["pretrain", PARENT, "train.tokens=100"], data=True, mentions=("tokens",)),
    Case("pretrain:seq-len-beyond-max-position", ["pretrain", PARENT, "train.seq_len=512"], data=True,
         mentions=("seq_len",)),
    Case("pretrain:heads-not-dividing-hidden", ["pretrain", PARENT, "model.heads=3", "model.kv_heads=1"], data=True,
         mentions=("model",)),
    Case("pretrain:range-not-in-data", ["pretrain", PARENT, "train.data_ranges=[no-such-range]"], data=True,
         mentions=("train.data_ranges",)),
    Case("pretrain:batch-not-split-over-ranks", ["pretrain", PARENT, "launch.tasks_per_node=3"], data=True,
         mentions=("train.global_batch",)),
    # ---------------------------------------------------------------- pretrain: keys and override syntax
    Case("pretrain:unknown-key-train.tokns", ["pretrain", PARENT, "train.tokns=5"], data=True, mentions=("train.tokns",)),
    Case("pretrain:unknown-top-level-key", ["pretrain", PARENT, "epochs=3"], data=True, mentions=("epochs",)),
    Case("pretrain:unknown-model-key", ["pretrain", PARENT, "model.experts=8"], data=True, mentions=("model.experts",)),
    Case("pretrain:override-without-equals", ["pretrain", PARENT, "train.tokens"], data=True, mentions=("train.tokens",)),
    Case("pretrain:override-empty-key", ["pretrain", PARENT, "=5"], data=True, mentions=("=5",)),
    Case("pretrain:override-empty-path-part", ["pretrain", PARENT, "train..tokens=5"], data=True,
         mentions=("train..tokens",)),
    Case("pretrain:override-into-a-number", ["pretrain", PARENT, "train.tokens.x=1"], data=True,
         mentions=("train.tokens",)),
    Case("pretrain:stage-mismatch", ["pretrain", MINI], mentions=("data",)),
    # ---------------------------------------------------------------- pretrain: references that leave the runs root
    Case("pretrain:data-../../etc@v001", ["pretrain", PARENT, "data=../../etc@v001"], data=True, mentions=("data",)),
    Case("pretrain:data-/tmp/x@v001", ["pretrain", PARENT, "data=/tmp/x@v001"], data=True, mentions=("data",)),
    Case("pretrain:data-x@v1/../..", ["pretrain", PARENT, "data=x@v1/../.."], data=True, mentions=("data",)),
    Case("pretrain:data-../outside@v001-exists", ["pretrain", PARENT, "data=../outside@v001"], data=True,
         setup=outside_data_link, mentions=("data",)),
    Case("pretrain:data-absolute-exists", ["pretrain", PARENT, "data={T}/outside@v001"], data=True,
         setup=outside_data_link, mentions=("data",)),
    Case("pretrain:like-../../etc@v001", ["pretrain", PARENT, "model=null", "like=../../etc@v001"], data=True,
         mentions=("like",)),
    Case("pretrain:like-x@v1/../..", ["pretrain", PARENT, "model=null", "like=x@v1/../.."], data=True,
         mentions=("like",)),
    # ---------------------------------------------------------------- pretrain: command line
    Case("pretrain:unknown-option", ["pretrain", PARENT, "--no-such-flag"], mentions=("--no-such-flag",)),
    Case("pretrain:missing-argument", ["pretrain"], mentions=("recipe",)),
    Case("pretrain:misspelled-command", ["pretrian", PARENT], mentions=("pretrian",)),
    Case("pretrain:executor-nope", ["pretrain", PARENT, "--executor", "nope"], mentions=("nope",)),
    Case("pretrain:option-missing-value", ["pretrain", PARENT, "--executor"], mentions=("--executor",)),
    Case("pretrain:array-without-equals", ["pretrain", PARENT, "--array", "train.seed"], data=True, mentions=("--array",)),
    Case("pretrain:array-without-key", ["pretrain", PARENT, "--array", "=0,1"], data=True, mentions=("--array",)),
    Case("pretrain:array-without-values", ["pretrain", PARENT, "--array", "train.seed="], data=True, mentions=("--array",)),
    Case("pretrain:array-bad-value", ["pretrain", PARENT, "--array", "train.seed=0,x"], data=True,
         mentions=("train.seed",)),
    Case("pretrain:sweep-nope", ["pretrain", PARENT, "--sweep", "nope"], data=True, mentions=("--sweep",)),
    Case("pretrain:sweep-lr-without-section", ["pretrain", PARENT, "--sweep", "lr"], data=True, mentions=("sweep",)),
    Case("pretrain:sweep-and-array", ["pretrain", PARENT, "--sweep", "lr", "--array", "train.seed=0,1"], data=True,
         mentions=("--sweep",)),
    Case("pretrain:profile-missing", ["pretrain", PARENT, "--profile", "no-such-profile"], data=True,
         mentions=("no-such-profile",)),
    Case("cli:unknown-root-option", ["--verbose", "status"], mentions=("--verbose",)),
    # ---------------------------------------------------------------- retrain
    Case("retrain:init-missing", ["retrain", RETRAIN], mentions=("init",)),
    Case("retrain:init-../../etc@v001", ["retrain", RETRAIN, "init=../../etc@v001"], mentions=("init",)),
    Case("retrain:init-/tmp/x@v001", ["retrain", RETRAIN, "init=/tmp/x@v001"], mentions=("init",)),
    Case("retrain:init-x@v1/../..", ["retrain", RETRAIN, "init=x@v1/../.."], mentions=("init",)),
    Case("retrain:init-../elsewhere-exists", ["retrain", RETRAIN, "init=../elsewhere/model@v001", "train.seq_len=64",
                                              "train.eval_tokens=4096"],
         data=True, setup=outside_model_run, mentions=("init",)),
    Case("retrain:init-running", ["retrain", RETRAIN, "init=bi-pruned@v001"],
         setup=lambda c: fake_run(c.runs, "bi-pruned", status="running", stage="prune"), mentions=("init",)),
    Case("retrain:init-bad-version", ["retrain", RETRAIN, "init=bi-pruned@1"],
         setup=lambda c: fake_run(c.runs, "bi-pruned", stage="prune"), mentions=("init",)),
    Case("retrain:tokens-negative", ["retrain", RETRAIN, "train.tokens=-204800"], mentions=("train.tokens",)),
    Case("retrain:sweep-nope", ["retrain", RETRAIN, "--sweep", "nope"], mentions=("--sweep",)),
    Case("retrain:stage-mismatch", ["retrain", PARENT], mentions=("pretrain",)),
    Case("retrain:distill-unknown-key", ["retrain", RETRAIN, "distill.temprature=2"], mentions=("distill.temprature",)),
    Case("retrain:distill-temperature-.inf", ["retrain", RETRAIN, "distill.temperature=.inf"],
         mentions=("distill.temperature",)),
    Case("retrain:zero-stage-7", ["retrain", RETRAIN, "train.zero_stage=7"], mentions=("train.zero_stage",)),
    # ---------------------------------------------------------------- prune
    Case("prune:parent-missing", ["prune", WANDA], mentions=("parent",)),
    Case("prune:parent-../../etc@v001", ["prune", WANDA, "parent=../../etc@v001"], mentions=("parent",)),
    Case("prune:parent-/tmp/x@v001", ["prune", WANDA, "parent=/tmp/x@v001"], mentions=("parent",)),
    Case("prune:parent-x@v1/../..", ["prune", WANDA, "parent=x@v1/../.."], mentions=("parent",)),
    Case("prune:parent-../elsewhere-exists", ["prune", WANDA, "parent=../elsewhere/model@v001",
                                             "calibration.seq_len=64", "calibration.samples=8", "heldout.seq_len=64",
                                             "heldout.tokens=4096"],
         data=True, setup=outside_model_run, mentions=("parent",)),
    Case("prune:parent-incomplete", ["prune", WANDA, "parent=bi-parent-run@latest"],
         setup=lambda c: fake_run(c.runs, "bi-parent-run", status="failed"), mentions=("parent",)),
    Case("prune:pattern-5:4", ["prune", WANDA24, "prune.pattern=5:4"], mentions=("prune.pattern",)),
    Case("prune:method-unknown", ["prune", WANDA, "prune.method=wandaa"], mentions=("prune.method",)),
    Case("prune:ratio-above-1", ["prune", WANDA, "prune.ratio=1.5"], mentions=("prune.ratio",)),
    Case("prune:ratio-.nan", ["prune", WANDA, "prune.ratio=.nan"], mentions=("prune.ratio",)),
    Case("prune:calibrates-on-validation", ["prune", WANDA, "calibration.range=validation"], mentions=("calibration",)),
    Case("prune:sweep-is-not-an-option", ["prune", WANDA, "--sweep", "lr"], mentions=("--sweep",)),
    Case("prune:hf-parent-malformed-config", ["prune", "{T}/prune-hf.yaml"], data=True, hf=True,
         setup=hf_recipe("bad-config"), mentions=("config.json",)),
    Case("prune:hf-parent-without-weights", ["prune", "{T}/prune-hf.yaml"], data=True, hf=True,
         setup=hf_recipe("no-weights"), mentions=("parent",)),
    Case("prune:hf-parent-without-tokenizer", ["prune", "{T}/prune-hf.yaml"], data=True, hf=True,
         setup=hf_recipe("no-tokenizer"), mentions=("parent",)),
    Case("prune:hf-parent-without-config", ["prune", "{T}/prune-hf.yaml"], data=True, hf=True,
         setup=hf_recipe("no-config"), mentions=("config.json",)),
    Case("prune:hf-parent-too-few-calibration-tokens", ["prune", "{T}/prune-hf.yaml", "calibration.samples=1000000"],
         data=True, hf=True, setup=hf_recipe("good"), mentions=("calibration.samples",)),
    Case("prune:hf-parent-ratio-infeasible", ["prune", "{T}/prune-hf.yaml", "prune.method=minitron-depth",
                                              "prune.ratio=0.99"],
         data=True, hf=True, setup=hf_recipe("good"), mentions=("ratio",)),
    Case("prune:ratio-of-total-for-a-sparse-method", ["prune", WANDA, "prune.ratio_of=total"], mentions=("ratio_of",)),
    Case("prune:ratio-of-layers-for-a-width-method", ["prune", "{R}/tiny/prune/minitron-width-50.yaml",
                                                      "prune.ratio_of=layers"], mentions=("ratio_of",)),
    Case("prune:target-for-a-sparse-method", ["prune", WANDA, "prune.target={ffn: 64}"], mentions=("target",)),
    Case("prune:target-larger-than-the-parent", ["prune", "{T}/prune-hf.yaml", "prune.method=minitron-depth",
                                                 "prune.target={layers: 999}"],
         data=True, hf=True, setup=hf_recipe("good"), mentions=("prune.target",)),
    # ---------------------------------------------------------------- eval
    Case("eval:run-missing", ["eval", EVAL, "run=bi-nope@latest"], mentions=("run",)),
    Case("eval:run-running", ["eval", EVAL, "run=bi-fake@v001"],
         setup=lambda c: fake_run(c.runs, "bi-fake", status="running"), mentions=("run",)),
    Case("eval:run-only-failed-versions", ["eval", EVAL, "run=bi-fake@latest"],
         setup=lambda c: fake_run(c.runs, "bi-fake", status="failed"), mentions=("run",)),
    Case("eval:run-without-final-model", ["eval", EVAL, "run=bi-fake@v001"],
         setup=lambda c: fake_run(c.runs, "bi-fake", final=False), mentions=("run",)),
    Case("eval:run-bad-version", ["eval", EVAL, "run=bi-fake@v1x"],
         setup=lambda c: fake_run(c.runs, "bi-fake"), mentions=("run",)),
    Case("eval:run-../../etc@v001", ["eval", EVAL, "run=../../etc@v001"], mentions=("run",)),
    Case("eval:run-../elsewhere-exists", ["eval", EVAL, "run=../elsewhere/model@v001"], data=True,
         setup=outside_model_run, mentions=("run",)),
    Case("eval:array-without-equals", ["eval", EVAL, "--array", "run"], mentions=("--array",)),
    Case("eval:executor-nope", ["eval", EVAL, "--executor", "nope"], mentions=("nope",)),
    Case("eval:unknown-key", ["eval", EVAL, "eval.heldout.tokenz=5"], mentions=("eval.heldout.tokenz",)),
    Case("eval:stage-mismatch", ["eval", PARENT], mentions=("pretrain",)),
    # ---------------------------------------------------------------- compare
    Case("compare:names-a-missing-run", ["compare", "{R}/ws/compare.yaml"], mentions=("bi-missing-retrain",)),
    Case("compare:run-incomplete", ["compare", "{R}/ws/compare.yaml",
                                    "compare.methods=[{label: X, retrain: [bi-running@v001]}]"],
         setup=lambda c: fake_run(c.runs, "bi-running", status="running", stage="retrain"), mentions=("bi-running",)),
    Case("compare:run-../../etc@v001", ["compare", "{R}/ws/compare.yaml",
                                        "compare.methods=[{label: X, retrain: [../../etc@v001]}]"], mentions=("etc",)),
    Case("compare:eval-recipe-missing", ["compare", "{R}/ws/compare.yaml", "eval=no-such-eval"],
         mentions=("no-such-eval",)),
    Case("compare:method-without-retrain", ["compare", "{R}/ws/compare.yaml", "compare.methods=[{label: X}]"],
         mentions=("compare.methods[0].retrain",)),
    Case("eval:array-empty-values", ["eval", EVAL, "--array", "run="], mentions=("--array",)),
    Case("retrain:array-lr-.inf", ["retrain", RETRAIN, "--array", "optimizer.lr=1e-3,.inf"], mentions=("optimizer.lr",)),
    Case("compare:study-not-submitted", ["compare", "{R}/tiny/study.yaml"], mentions=("tiny-study",)),
    Case("compare:pretrain-recipe", ["compare", PARENT], mentions=("pretrain",)),
    Case("compare:unknown-option", ["compare", "{R}/ws/compare.yaml", "--allow-mismatches"],
         mentions=("--allow-mismatches",)),
    # ---------------------------------------------------------------- study
    Case("study:executor-debug", ["study", "{R}/tiny/study.yaml", "--executor", "debug"], mentions=("debug",)),
    Case("study:executor-nope", ["study", "{R}/tiny/study.yaml", "--executor", "nope"], mentions=("nope",)),
    Case("study:unknown-key", ["study", "{R}/tiny/study.yaml", "methodz=[]"], mentions=("methodz",)),
    Case("study:no-methods", ["study", "{R}/tiny/study.yaml", "methods=[]"], mentions=("methods",)),
    Case("study:parent-recipe-missing", ["study", "{T}/study.yaml"], mentions=("no-such-parent",),
         setup=recipe_file("study.yaml", """
             name: bi-study
             stage: study
             parent: no-such-parent.yaml
             methods:
               - {{label: Wanda-U, prune: {R}/tiny/prune/wanda-50.yaml, retrain: [{R}/tiny/retrain/wanda-50.yaml]}}
             eval: {R}/tiny/eval.yaml
             """)),
    Case("study:data-entry-is-not-a-data-recipe", ["study", "{T}/study.yaml"], mentions=("data",),
         setup=recipe_file("study.yaml", """
             name: bi-study
             stage: study
             data: [{R}/ws/parent.yaml]
             parent: {R}/tiny/parent.yaml
             methods:
               - {{label: Wanda-U, prune: {R}/tiny/prune/wanda-50.yaml, retrain: [{R}/tiny/retrain/wanda-50.yaml]}}
             eval: {R}/tiny/eval.yaml
             """)),
    Case("study:checks-graph-before-preparing-data", ["study", "{T}/study.yaml"], mentions=("no-such-parent",),
         setup=recipe_file("study.yaml", """
             name: bi-study
             stage: study
             data: [{R}/ws/mini-data.yaml]
             parent: no-such-parent.yaml
             methods:
               - {{label: Wanda-U, prune: {R}/tiny/prune/wanda-50.yaml, retrain: [{R}/tiny/retrain/wanda-50.yaml]}}
             eval: {R}/tiny/eval.yaml
             """)),
    Case("study:retrain-recipe-is-binary", ["study", "{T}/study.yaml"], mentions=("random.yaml",),
         setup=both(binary_file("random.yaml", RANDOM_BYTES), recipe_file("study.yaml", """
             name: bi-study
             stage: study
             parent: {R}/tiny/parent.yaml
             methods:
               - {{label: Wanda-U, prune: {R}/tiny/prune/wanda-50.yaml, retrain: [random.yaml]}}
             eval: {R}/tiny/eval.yaml
             """))),
    Case("study:missing-argument", ["study"], mentions=("recipe",)),
    # ---------------------------------------------------------------- status
    Case("status:missing-name", ["status", "bi-nope"], mentions=("bi-nope",)),
    Case("status:missing-name-json", ["status", "bi-nope", "--json"], mentions=("bi-nope",)),
    Case("status:missing-recipe-file", ["status", "{T}/nope.yaml"], mentions=("nope.yaml",)),
    Case("status:binary-recipe-file", ["status", "{T}/random.yaml"], setup=binary_file("random.yaml", RANDOM_BYTES),
         mentions=("random.yaml",)),
    Case("status:name-..", ["status", ".."], mentions=("..",)),
    Case("status:unknown-option", ["status", "--jsonn"], mentions=("--jsonn",)),
]

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# ------------------------------------------------------------------------------------------ the runner


class JobSubmitted(BaseException):
    """Raised by the stand-in for launch.submit: the input got past every check."""


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots (the roots too) with its type, size and mtime; symlinks are not followed."""
    seen: dict[str, tuple] = {}
    for root in roots:
        if not os.path.lexists(root):
            seen[str(root)] = ("absent",)
            continue
        st = os.lstat(root)
        seen[str(root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
        if not stat.S_ISDIR(st.st_mode):
            continue
        for folder, dirs, files in os.walk(root, followlinks=False):
            for name in dirs + files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                seen[path] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return seen


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    out = [f"created {p}" for p in sorted(after.keys() - before.keys())]
    out += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    out += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return out


@dataclass
class Outcome:
    code: int | str | None
    out: str
    err: str
    escaped: str | None = None  # the traceback of an exception that left main()
    written: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"exit code: {self.code}", "stderr:\n" + (self.err[:1500] or "(empty)"),
                 "stdout:\n" + (self.out[:600] or "(empty)")]
        if self.escaped:
            parts.append("exception escaped main():\n" + self.escaped[-2000:])
        if self.written:
            parts.append("written:\n" + "\n".join(self.written[:30]))
        return "\n".join(parts)


def run_cli(argv: list[str], monkeypatch, capfd, watch: list[Path]) -> Outcome:
    from prunectl import cli

    monkeypatch.setattr(sys, "argv", ["prunectl", *argv])
    before = snapshot(*watch)
    capfd.readouterr()
    code: int | str | None
    escaped = None
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else str(exit_.code))
    except KeyboardInterrupt:
        raise
    except JobSubmitted:
        code, escaped = "submitted a job", "the input passed every check and reached launch.submit"
    except BaseException:  # noqa: BLE001  (anything leaving main() is a traceback for the user)
        code, escaped = "exception", traceback.format_exc()
    out, err = capfd.readouterr()
    return Outcome(code, out, err, escaped, changes(before, snapshot(*watch)))


@pytest.fixture()
def cli_env(monkeypatch, tmp_path, bad_inputs_session):
    """The case's runs root, working directory and environment; job submission replaced by a sentinel."""
    from prunectl import launch

    runs, cwd = tmp_path / "runs", tmp_path / "cwd"
    runs.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PRUNECTL_RUNS", str(runs))
    monkeypatch.setenv("PRUNECTL_RECIPES", str(bad_inputs_session["recipes"]))
    monkeypatch.setenv("PRUNECTL_DEBUG", "0")  # the CLI's root callback sets it; restored after the case
    monkeypatch.setenv("SUBMITIT_LOG_LEVEL", "ERROR")
    for offline in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(offline, "1")

    def no_jobs(*args, **kwargs):
        raise JobSubmitted()

    monkeypatch.setattr(launch, "submit", no_jobs)
    return Ctx(T=tmp_path, S=bad_inputs_session["fixtures"], R=bad_inputs_session["recipes"], runs=runs, data_run=None)


def _prepare(case: Case | None, request, ctx: Ctx) -> Ctx:
    """The case's runs root links the prepared test-data if it needs it (always for case None), then its setup."""
    if case is None or case.data:
        workspace = request.getfixturevalue("workspace")
        ctx.data_run = workspace["runs"] / "test-data"
        (ctx.runs / "test-data").symlink_to(ctx.data_run, target_is_directory=True)
    if case is not None and case.hf:
        request.getfixturevalue("hf_dirs")
    if case is not None and case.setup is not None:
        case.setup(ctx)
    return ctx


def _argv(argv: list[str], ctx: Ctx) -> list[str]:
    return [a.replace("{T}", str(ctx.T)).replace("{S}", str(ctx.S)).replace("{R}", str(ctx.R)) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_nothing_written(case: Case, cli_env: Ctx, request, monkeypatch, capfd):
    ctx = _prepare(case, request, cli_env)
    watch = [ctx.T, ctx.R, ctx.S] + ([ctx.data_run] if ctx.data_run else [])
    got = run_cli(_argv(case.argv, ctx), monkeypatch, capfd, watch)
    print(f"{case.id}: exit {got.code}: {got.err.strip()[:400]}")  # shown by pytest -rP
    lines = got.err.splitlines()
    broken = []
    if got.escaped is not None:
        broken.append("an exception left main()" if got.code != "submitted a job" else "a job was submitted")
    if "Traceback" in got.out + got.err:
        broken.append("a traceback was printed")
    if got.code != 2:
        broken.append(f"exit code {got.code}, not 2")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        broken.append(f"{len(lines)} stderr line(s), not one `error: ` line")
    if got.written:
        broken.append(f"{len(got.written)} path(s) written or changed")
    missing = [word for word in case.mentions if not lines or word.lower() not in lines[0].lower()]
    if missing and len(lines) == 1:
        broken.append(f"the error line does not name {', '.join(map(repr, missing))}")
    assert not broken, f"{'; '.join(broken)}\nprunectl {' '.join(_argv(case.argv, ctx))}\n{got.describe()}"


# ------------------------------------------------------------------------------------------ controls


def test_pattern_override_stays_a_string(cli_env: Ctx, monkeypatch, capfd):
    """`prune.pattern=2:4` on the command line is the string "2:4", not YAML 1.1's base-60 integer 124."""
    argv = _argv(["recipes", "show", WANDA24, "prune.pattern=2:4", "--resolved"], cli_env)
    got = run_cli(argv, monkeypatch, capfd, [cli_env.T, cli_env.R])
    assert got.code == 0 and got.escaped is None, got.describe()
    assert re.search(r"^\s*pattern: ['\"]?2:4['\"]?\s*$", got.out, re.M), got.describe()
    assert not re.search(r"^\s*pattern: ['\"]?124", got.out, re.M), got.describe()
    # and the same for another N:M pattern on a method that takes it
    argv = _argv(["recipes", "show", WANDA24, "prune.pattern=4:8", "--resolved"], cli_env)
    got = run_cli(argv, monkeypatch, capfd, [cli_env.T, cli_env.R])
    assert got.code == 0 and re.search(r"^\s*pattern: ['\"]?4:8['\"]?\s*$", got.out, re.M), got.describe()


def test_controls_pass_their_checks(cli_env: Ctx, request, monkeypatch, capfd):
    """The recipes the cases break are valid as shipped: each case's refusal is about its one defect."""
    ctx = _prepare(None, request, cli_env)
    request.getfixturevalue("hf_dirs")
    hf_recipe("good")(ctx)
    fake_run(ctx.runs, "bi-fake", inputs={"data": "test-data@v001"})
    watch = [ctx.T, ctx.R, ctx.S, ctx.data_run]
    for argv in (["pretrain", PARENT, "--dry-run"], ["prune", "{T}/prune-hf.yaml", "--dry-run"],
                 ["eval", EVAL, "--dry-run"], ["recipes", "show", MINI, "--resolved"],
                 ["recipes", "show", "{R}/ws/compare.yaml", "--resolved"], ["recipes", "show", RETRAIN, "--resolved"]):
        got = run_cli(_argv(argv, ctx), monkeypatch, capfd, watch)
        assert got.code == 0 and got.escaped is None and not got.written, f"{' '.join(argv)}\n{got.describe()}"

"""Eval guards: include directories run code only when trusted (never under --dry-run), training ranges are
refused under any alias, and a result file appears only complete."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from prunectl import store
from prunectl.errors import PrunectlError
from prunectl.evaluate.config import EvalConfig, results_path
from prunectl.recipe import EvalRecipe
from prunectl.stages import eval as eval_stage

from .conftest import prunectl, refused

EVAL_FILES = "*/v*/eval/*"


@pytest.fixture()
def trained(fresh_runs, tmp_path) -> dict:
    """A complete pretrain run (a random tiny model) whose manifest says it trained on test-data's pretrain range,
    an eval recipe for it, and a task directory whose Python leaves a marker file when imported."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    runs = fresh_runs["runs"]
    run = store.allocate(runs, "fake-parent")
    tokenizer = AutoTokenizer.from_pretrained(runs / "test-data" / "v001" / "tokenizer")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
                     ).save_pretrained(run.final)
    tokenizer.save_pretrained(run.final)
    use = store.DataUse(data="test-data@v001", ranges=["pretrain"], seq_len=64, sequences=1, tokens=64, budget_tokens=64,
                        epochs=0.0, seed=0, intervals=[])
    run.write_manifest(store.Manifest(name="fake-parent", version=1, stage="pretrain", status="complete",
                                      inputs={"data": "test-data@v001"}, data=use))
    tasks, marker = tmp_path / "tasks", tmp_path / "imported.marker"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text('{"q": "is this code run?"}\n')
    (tasks / "utils.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n\n"
                                    "def doc_to_text(doc):\n    return doc['q']\n")
    (tasks / "guard.yaml").write_text(textwrap.dedent(f"""\
        task: guard_marker
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: {tasks / 'docs.jsonl'}}}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: !function utils.doc_to_text
        doc_to_choice: ["yes", "no"]
        doc_to_target: 0
        metadata: {{version: 1.0}}
        """))
    recipe = tmp_path / "guard-eval.yaml"
    recipe.write_text("name: guard-eval\nstage: eval\nrun: fake-parent@v001\n"
                      "eval: {heldout: null, perplexity: [{name: val, data: test-data@v001, range: validation, seq_len: 32, "
                      "sequences: 2}], batch_size: 2}\n")
    return {**fresh_runs, "run": run, "recipe": str(recipe), "tasks": tasks, "marker": marker}


def _recipe(trained: dict, **zero_shot) -> EvalRecipe:
    return EvalRecipe(name="guard-eval", stage="eval", run="fake-parent@v001",
                      eval={"heldout": None, "zero_shot": {"tasks": ["guard_marker"], "include": [str(trained["tasks"])],
                                                           **zero_shot}})


def test_include_code_without_trust_code_is_refused_before_anything_runs(trained):
    include = f"eval.zero_shot.include=[{trained['tasks']}]"
    err = refused(trained["env"], trained["runs"], "eval", trained["recipe"], "eval.zero_shot.tasks=[guard_marker]",
                  include, written=EVAL_FILES)
    assert err.count("\n") == 1 and "can execute Python" in err and "eval.zero_shot.trust_code=true" in err
    assert not trained["marker"].exists()
    with pytest.raises(PrunectlError, match="trust_code=true"):  # a job or --prefetch is refused the same way
        eval_stage.run(_recipe(trained), trained["run"].dir)
    with pytest.raises(PrunectlError, match="trust_code=true"):
        eval_stage.prefetch(_recipe(trained))
    assert not trained["marker"].exists() and not (trained["run"].dir / "eval").exists()


def test_dry_run_never_imports_include_code_even_when_trusted(trained, monkeypatch, tmp_path):
    out = prunectl("eval", trained["recipe"], "eval.zero_shot.tasks=[guard_marker]",
                   f"eval.zero_shot.include=[{trained['tasks']}]", "eval.zero_shot.trust_code=true", "--dry-run",
                   env=trained["env"])
    assert "guard_marker" in out.stdout and not trained["marker"].exists()
    eval_stage.check(trained["runs"], _recipe(trained, trust_code=True), includes=False)
    assert not trained["marker"].exists()
    # the control: a real (trusted) check imports it, so the marker would have shown a leak above
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    eval_stage.check(trained["runs"], _recipe(trained, trust_code=True))
    assert trained["marker"].exists()


def test_trust_code_does_not_change_the_results_key():
    assert EvalConfig(zero_shot={"trust_code": True}).key() == EvalConfig().key()


def test_training_range_is_refused_under_an_alias(trained):
    runs, env = trained["runs"], trained["env"]
    (runs / "alias").symlink_to(runs / "test-data", target_is_directory=True)
    err = refused(env, runs, "eval", trained["recipe"],
                  "eval.perplexity=[{name: leak, data: alias@v001, range: pretrain}]", written=EVAL_FILES)
    assert "trained or calibrated on 'pretrain' of alias@v001" in err
    with pytest.raises(PrunectlError, match="eval.heldout.range: .*trained or calibrated on 'pretrain'"):
        eval_stage.check(runs, EvalRecipe(name="e", stage="eval", run="fake-parent@v001",
                                          eval={"heldout": {"range": "pretrain"}, "perplexity": []}))
    eval_stage.check(runs, EvalRecipe(name="e", stage="eval", run="fake-parent@v001",  # held out: fine
                                      eval={"perplexity": [{"name": "v", "data": "alias@v001", "range": "validation"}]}))


def test_a_killed_eval_leaves_no_result_file(trained, monkeypatch):
    from prunectl.recipe import resolve

    recipe, run_dir = resolve(trained["recipe"]), trained["run"].dir
    path = results_path(run_dir, recipe.eval)
    real_replace = store.os.replace

    def killed(src, dst):  # the job dies as the file would appear
        if Path(dst) == path:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        eval_stage.run(recipe, run_dir)
    assert not path.exists() and not list(path.parent.glob("*.json"))
    monkeypatch.setattr(store.os, "replace", real_replace)
    eval_stage.run(recipe, run_dir)
    assert json.loads(path.read_text())["perplexity"]["val"]["tokens"] > 0

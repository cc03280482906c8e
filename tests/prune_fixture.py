"""The pruned runs every prune test reads: a 4-layer parent trained in the session, then one run per method.

Defined once and registered in conftest.py, so test_prune.py and test_slurm.py share one instance.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO, prunectl

PARENT = """
name: test-prune-parent
stage: pretrain
data: test-data@latest
model: {layers: 4, hidden: 64, heads: 4, kv_heads: 2, ffn: 192, max_position: 256, tie_embeddings: true}
optimizer: {lr: 3.0e-3}
train:
  tokens: 262144
  data_ranges: [pretrain]
  seq_len: 64
  global_batch: 16
  micro_batch: 16
  zero_stage: 0
  checkpoint_every: 0
  eval_every: 0
  eval_tokens: 16384
  log_every: 16
launch: {tasks_per_node: 1, cpus_per_task: 2, time_min: 15}
"""

COMMON = """
stage: prune
parent: test-prune-parent@latest
calibration: {range: calibration, samples: 128, seq_len: 64, micro_batch: 16}  # 8,192 tokens: enough for a stable ordering
heldout: {range: validation, tokens: 32768, seq_len: 64}
launch: {tasks_per_node: 1, cpus_per_task: 2, time_min: 15}
"""

CONFIGS = {
    "depth": {"method": "minitron-depth", "ratio": 0.5},
    "shortgpt": {"method": "shortgpt", "ratio": 0.5},
    "width": {"method": "minitron-width", "ratio": 0.5, "search": {"candidates": 3, "quantum": 4}},
    "flap": {"method": "flap", "ratio": 0.5},
    "sheared": {"method": "sheared-llama", "ratio": 0.5, "search": {"candidates": 2, "quantum": 4},
                "sheared": {"mask_lr": 0.3, "dual_lr": 1.0, "train": {
                    "tokens": 16384, "data_ranges": ["retrain"], "seq_len": 64, "global_batch": 16, "micro_batch": 16,
                    "zero_stage": 2, "checkpoint_every": 0, "eval_every": 0, "eval_tokens": 4096, "log_every": 4}}},
    "wanda": {"method": "wanda", "ratio": 0.5},
    "wanda-24": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt": {"method": "sparsegpt", "ratio": 0.5},
    "sparsegpt-24": {"method": "sparsegpt", "pattern": "2:4"},
    "magnitude": {"method": "magnitude", "ratio": 0.5},
    "magnitude-24": {"method": "magnitude", "pattern": "2:4"},
}


@pytest.fixture(scope="session")
def pruned(workspace) -> dict:
    """The parent, then every method's run, and what a fresh process loads from each final/."""
    recipes, runs, env = workspace["recipes"], workspace["runs"], workspace["env"]
    (recipes / "prune-parent.yaml").write_text(textwrap.dedent(PARENT))
    prunectl("pretrain", "test-prune-parent", "--executor", "local", env=env, timeout=1800)
    (recipes / "_prune.yaml").write_text(textwrap.dedent(COMMON))
    for key, cfg in CONFIGS.items():
        (recipes / f"prune-{key}.yaml").write_text(
            f"extends: _prune.yaml\nname: test-prune-{key}\nprune: {json.dumps(cfg)}\n")
        prunectl("prune", f"test-prune-{key}", "--executor", "local", env=env, timeout=1800)
    reports = {key: json.loads((runs / f"test-prune-{key}" / "v001" / "report.json").read_text()) for key in CONFIGS}
    finals = {key: str(runs / f"test-prune-{key}" / "v001" / "final") for key in CONFIGS}
    script = textwrap.dedent("""
        import json, sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        out = {}
        for key, path in json.loads(sys.argv[1]).items():
            model = AutoModelForCausalLM.from_pretrained(path)
            seen, total = set(), 0
            for p in model.parameters():
                if id(p) not in seen:
                    seen.add(id(p)); total += p.numel()
            state = model.state_dict()
            info = {"total": total, "layers": model.config.num_hidden_layers}
            try:
                masks = load_file(path + "/masks.safetensors")
            except FileNotFoundError:
                masks = {}
            if masks:
                w = {k: state[k] for k in masks}
                info["zeros_match_masks"] = all(torch.equal(w[k] != 0, masks[k] & (w[k] != 0)) and
                                                not w[k][~masks[k]].any() for k in masks)
                info["row_sparsity"] = sorted({round(1 - float(m.float().mean(1).min()), 6) for m in masks.values()} |
                                              {round(1 - float(m.float().mean(1).max()), 6) for m in masks.values()})
                info["layer_sparsity"] = sorted({round(1 - float(m.float().mean()), 6) for m in masks.values()})
                info["max_nonzero_per_4"] = max(int((w[k] != 0).reshape(w[k].shape[0], -1, 4).sum(-1).max()) for k in w)
            out[key] = info
        print(json.dumps(out))
    """)
    loaded = subprocess.run([sys.executable, "-c", script, json.dumps(finals)], capture_output=True, text=True,
                            cwd=REPO, check=True).stdout
    return {"reports": reports, "loaded": json.loads(loaded.strip().splitlines()[-1])}

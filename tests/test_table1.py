"""The paper recipes produce Table 1's architectures of Llama-3.1-8B, checked without weights.

Each recipe in recipes/paper/prune is loaded as a user's run would load it, and prunectl's own shape logic
(the method table's `feasible`: the pinned shape, or the candidates a search would try) runs on the paper
parent's shape; the pruned architecture is then built on the meta device and its parameters counted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunectl import model as models
from prunectl import recipe as recipes
from prunectl.model import ModelConfig, Shape
from prunectl.prune import budget

REPO = Path(__file__).resolve().parent.parent
PRUNE = REPO / "recipes" / "paper" / "prune"

# Table 1, verbatim: layers, attention heads, hidden, FFN, sparsity, parameters (B; non-zero for sparse rows)
BASE = (32, 32, 4096, 14336, 0.0, 8.0)
SPARSE_50 = (32, 32, 4096, 14336, 0.5, 4.5)
TABLE_1 = {
    "minitron-depth-50": (16, 32, 4096, 14336, 0.0, 4.5),
    "minitron-depth-625": (8, 32, 4096, 14336, 0.0, 2.8),
    "minitron-depth-75": (4, 32, 4096, 14336, 0.0, 1.9),
    "minitron-depth-813": (2, 32, 4096, 14336, 0.0, 1.5),
    "minitron-width-50": (32, 32, 3072, 9216, 0.0, 4.5),
    "minitron-width-625": (32, 32, 2432, 6144, 0.0, 3.1),
    "minitron-width-75": (32, 32, 1792, 6016, 0.0, 2.0),
    "minitron-width-813": (32, 32, 1536, 4736, 0.0, 1.5),
    "flap-50": (32, 20, 4096, 6656, 0.0, 4.5),
    "sheared-llama-50": (32, 32, 3456, 7552, 0.0, 4.6),
    "wanda-50": SPARSE_50,
    "wanda-2of4": SPARSE_50,
    "sparsegpt-50": SPARSE_50,
    "sparsegpt-2of4": SPARSE_50,
    "magnitude-50": SPARSE_50,  # not in Table 1: the baseline, at the sparse rows' ratio
}
# Where Table 1's parameter count disagrees with its own shape: Minitron-W 62.5% (hidden 2432, FFN 6144, 32 heads
# of 128, 8 KV heads, untied 128,256-token embeddings) counts 2.855B, not 3.1B. Table 5's 62.5% candidates, all
# labelled 3.1B, count 2.77B to 3.09B; the shape is what the paper chose, so the shape is what is pinned.
COUNTED_NOT_TABLE_1 = {"minitron-width-625": 2.855}


def _paper_parent() -> Shape:
    """Llama-3.1-8B as the paper parent recipe builds it, on the meta device."""
    return Shape.of(_meta_model(recipes.resolve(str(REPO / "recipes/paper/parent.yaml")).model))


def _meta_model(cfg: ModelConfig, heads: tuple[int, int] | None = None, biases: bool = False):
    """`cfg` built on the meta device; `heads` (query, KV) are set after the config validates, as the cut sets
    them: transformers refuses query heads that do not divide the hidden size (FLAP's 20 of 4096) at
    construction and on save, see test_flaps_table_1_shape_saves_as_a_hugging_face_config."""
    from transformers import LlamaForCausalLM

    config = models.llama_config(cfg, cfg.vocab, None, None, None)
    if heads is not None:
        config.num_attention_heads, config.num_key_value_heads = heads
    config.attention_bias = config.mlp_bias = biases  # FLAP's compensation biases
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _built(shape: Shape):
    cfg = ModelConfig(layers=shape.layers, hidden=shape.hidden, heads=1, head_dim=shape.head_dim, ffn=shape.ffn,
                      vocab=shape.vocab, tie_embeddings=shape.tied)
    return _meta_model(cfg, heads=(shape.heads, shape.kv_heads), biases=shape.attention_bias)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def parent() -> Shape:
    return _paper_parent()


def test_every_paper_prune_recipe_is_a_table_1_row():
    shipped = {p.stem for p in PRUNE.glob("*.yaml") if not p.name.startswith("_") and not p.stem.endswith("-search")}
    assert shipped == set(TABLE_1)


def test_the_parent_is_table_1s_base(parent):
    assert (parent.layers, parent.heads, parent.hidden, parent.ffn) == BASE[:4]
    assert (parent.kv_heads, parent.head_dim, parent.vocab, parent.tied) == (8, 128, 128256, False)
    assert _count(_built(parent)) == parent.parameters()
    assert parent.parameters() / 1e9 == pytest.approx(BASE[5], abs=0.1)


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_the_recipe_produces_table_1s_architecture(parent, name):
    cfg = recipes.resolve(str(PRUNE / f"{name}.yaml")).prune
    layers, heads, hidden, ffn, sparsity, billions = TABLE_1[name]
    shapes = cfg.spec.feasible(cfg, parent)
    assert len(shapes) == 1, f"{name}: a search among {len(shapes)} shapes; Table 1's must be what the recipe makes"
    shape = shapes[0]
    assert (shape.layers, shape.heads, shape.hidden, shape.ffn) == (layers, heads, hidden, ffn)
    assert shape.kv_heads == heads // parent.group and shape.head_dim == parent.head_dim
    total = _count(_built(shape))
    assert total == shape.parameters()  # Shape counts what transformers builds
    kept = total - (cfg.ratio * budget.size(shape, "decoder") if cfg.spec.sparse else 0)  # sparse: non-zero
    assert (cfg.ratio if cfg.spec.sparse else 0.0) == sparsity
    assert kept / 1e9 == pytest.approx(COUNTED_NOT_TABLE_1.get(name, billions), abs=0.1 if name not in
                                       COUNTED_NOT_TABLE_1 else 0.001)


@pytest.mark.parametrize("name", ["minitron-width-50", "minitron-width-625", "flap-50", "minitron-depth-625"])
def test_a_pinned_recipe_still_searches_without_its_pin(parent, name):
    r = recipes.resolve(str(PRUNE / f"{name}.yaml"), ["prune.target=null"])
    shapes = r.prune.spec.feasible(r.prune, parent)
    want = (1 - r.prune.ratio) * budget.size(parent, r.prune.ratio_of)
    assert len(shapes) >= (1 if name.startswith("minitron-depth") else 3)
    assert all(abs(budget.size(s, r.prune.ratio_of) - want) <= 0.05 * budget.size(parent, r.prune.ratio_of)
               for s in shapes)


def test_the_sheared_search_recipe_tries_table_7_and_table_1s_shape_is_one(parent):
    cfg = recipes.resolve(str(PRUNE / "sheared-llama-50-search.yaml")).prune
    shapes = cfg.spec.feasible(cfg, parent)
    assert len(shapes) == 10 and all(s.parameters() / 1e9 == pytest.approx(4.5, abs=0.05) for s in shapes)
    assert (32, 32, 3456, 7552) in {(s.layers, s.heads, s.hidden, s.ffn) for s in shapes}


def test_flaps_table_1_shape_saves_and_loads_as_a_hugging_face_config(parent, tmp_path):
    """transformers 5.x refuses 20 heads of 128 in a 4096-wide Llama unless prunectl relaxes its check for an
    explicit head_dim (model.allow_explicit_head_dim, applied by every prunectl job); a fresh process that
    loads it through prunectl reads the shape back."""
    import subprocess
    import sys

    cfg = recipes.resolve(str(PRUNE / "flap-50.yaml")).prune
    _built(cfg.spec.feasible(cfg, parent)[0]).config.save_pretrained(tmp_path)
    read = ("from prunectl.model import allow_explicit_head_dim; allow_explicit_head_dim(); "
            "from transformers import AutoConfig; c = AutoConfig.from_pretrained(%r); "
            "print(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["4096", "20", "5", "128"]

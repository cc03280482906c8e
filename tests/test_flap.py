"""FLAP against a reference written here from the method's definition, on a random parent of the prune
fixture's shape; and its `statistics: sequential` option against the numbers prunectl gave before issue 17."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from prunectl.prune.config import PruneConfig
from prunectl.prune.context import Context
from prunectl.prune.meter import Meter
from prunectl.prune.surgery import Shape
from prunectl.prune.width import apply_flap, flap_prune

from .prune_fixture import PARENT

CPU = torch.device("cpu")


def _parent(skew: bool = True) -> LlamaForCausalLM:
    """A random Llama of the prune fixture's parent shape. skew=True gives each layer's o_proj one KV group
    with a single dominant channel and one with evenly larger channels: the squared and the plain group
    sums then disagree about which group to keep."""
    m = yaml.safe_load(PARENT)["model"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=m["hidden"], intermediate_size=m["ffn"], num_hidden_layers=m["layers"],
                         num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"], max_position_embeddings=64,
                         tie_word_embeddings=m["tie_embeddings"], attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    if skew:
        width = m["hidden"] // m["kv_heads"]  # o_proj input channels per KV group (its query heads)
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                w = layer.self_attn.o_proj.weight
                spiky, even = (i % 2) * width, (1 - i % 2) * width
                w[:, spiky : spiky + width] *= 0.5
                w[:, spiky + 3] *= 16.0
                w[:, even : even + width] *= 1.3
    return model


def _ids(n: int = 8, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(1))


def _target(model, kv_heads: int, ffn: int) -> Shape:
    shape = Shape.of(model)
    return shape.with_(kv_heads=kv_heads, heads=kv_heads * shape.group, ffn=ffn, attention_bias=True, mlp_bias=True)


def reference_flap(model: LlamaForCausalLM, ids: torch.Tensor, kv_heads: int, ffn: int, squared: bool = True) -> list[dict]:
    """FLAP from its definition, in float64 over every calibration token at once. The unpruned parent's inputs
    to o_proj and down_proj; per input channel j, score = Var(X_j) (unbiased) * ||W_:,j||^2; a KV group's
    score is the sum over its query heads' channels of the squared score (plain sum with squared=False);
    the top groups and MLP channels are kept; a removed channel's calibration mean times its weight column
    is added to the bias."""
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, lin in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            hooks.append(lin.register_forward_pre_hook(lambda _m, a, key=(i, name): inputs.__setitem__(key, a[0])))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    kv, out = model.config.num_key_value_heads, []
    for i, layer in enumerate(model.model.layers):
        chosen = {}
        for name, lin, keep in (("o", layer.self_attn.o_proj, kv_heads), ("down", layer.mlp.down_proj, ffn)):
            x = inputs[(i, name)].reshape(-1, lin.in_features).double()
            w = lin.weight.double()
            score = x.var(0, unbiased=True) * w.square().sum(0)
            if name == "o":
                units = (score.square() if squared else score).reshape(kv, -1).sum(1)
                kept = sorted(torch.topk(units, keep).indices.tolist())
                per = lin.in_features // kv
                removed = [c for g in range(kv) if g not in kept for c in range(g * per, (g + 1) * per)]
            else:
                kept = sorted(torch.topk(score, keep).indices.tolist())
                removed = [c for c in range(lin.in_features) if c not in kept]
            chosen[name] = kept
            chosen[name + "_bias"] = w[:, removed] @ x.mean(0)[removed]
        out.append(chosen)
    return out


def _kept_rows(big: torch.Tensor, small: torch.Tensor, rows_per_unit: int = 1) -> list[int]:
    """Which units of `big` (blocks of rows) `small` kept, found by matching the weights themselves."""
    units = big.view(-1, rows_per_unit, big.shape[-1])
    return [next(u for u in range(units.shape[0]) if torch.equal(units[u], row))
            for row in small.view(-1, rows_per_unit, small.shape[-1])]


def kept(parent: LlamaForCausalLM, pruned: LlamaForCausalLM) -> list[dict]:
    d = Shape.of(parent).head_dim
    return [{"o": _kept_rows(a.self_attn.k_proj.weight, b.self_attn.k_proj.weight, d),
             "down": _kept_rows(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight),
             "o_bias": b.self_attn.o_proj.bias.detach(), "down_bias": b.mlp.down_proj.bias.detach()}
            for a, b in zip(parent.model.layers, pruned.model.layers)]


def test_flap_keeps_what_the_reference_keeps_from_the_parents_statistics():
    parent, ids = _parent(), _ids()
    ref = reference_flap(parent, ids, kv_heads=1, ffn=96)
    got = kept(parent, flap_prune(parent, ids, 3, CPU, _target(parent, 1, 96)))
    for layer, (r, g) in enumerate(zip(ref, got)):
        assert g["o"] == r["o"] and g["down"] == r["down"], layer
        torch.testing.assert_close(g["o_bias"].double(), r["o_bias"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g["down_bias"].double(), r["down_bias"], rtol=1e-4, atol=1e-6)
    # the test tells the corrections apart: the plain group sum, and the sequential reading, keep other units
    plain = reference_flap(parent, ids, kv_heads=1, ffn=96, squared=False)
    assert any(p["o"] != r["o"] for p, r in zip(plain, ref))
    sequential = kept(parent, flap_prune(parent, ids, 3, CPU, _target(parent, 1, 96), statistics="sequential"))
    assert any(s["down"] != r["down"] for s, r in zip(sequential, ref))


# statistics: sequential on the unskewed parent, as prunectl computed it before issue 17 (commit 4af61a3,
# which deep-copied the parent and pruned it in place): KV groups, kept MLP channels as a bitmask (bit i =
# channel i), (sum, norm) of the o_proj and down_proj biases per layer, and the loss on the ids.
BEFORE = {
    "groups": [[1], [0], [1], [1]],
    "ffn": ["822d95d83005bb337c530d7cb97e54047afd823fce3ce161", "2dee57929e4fc7b41b252bd0852624143958d70cecc5bf1d",
            "f3452ca902f80f0a3b962a3c56b596929d7952fe76d214e6", "1c22fe1236ec43a6f172c2ff8a2664acaec69d40b72bbcb0"],
    "o_bias": [(-0.011705, 0.012561), (0.032157, 0.023168), (0.039288, 0.028609), (0.030038, 0.033143)],
    "down_bias": [(-0.002761, 0.002515), (0.005241, 0.003052), (-5e-05, 0.002564), (0.002713, 0.003049)],
    "loss": 5.566617488861084,
}


def test_sequential_statistics_reproduce_the_numbers_before_the_correction():
    from prunectl.prune.calibration import lm_loss

    parent, ids = _parent(skew=False), _ids()
    state = {k: v.clone() for k, v in parent.state_dict().items()}
    pruned = flap_prune(parent, ids, 3, CPU, _target(parent, 1, 96), statistics="sequential")
    got = kept(parent, pruned)
    assert [g["o"] for g in got] == BEFORE["groups"]
    assert [format(sum(1 << c for c in g["down"]), "048x") for g in got] == BEFORE["ffn"]
    for key in ("o_bias", "down_bias"):
        summary = [x for g in got for x in (float(g[key].sum()), float(g[key].norm()))]
        assert summary == pytest.approx([x for pair in BEFORE[key] for x in pair], abs=2e-6), key
    assert lm_loss(pruned, ids, 4) == pytest.approx(BEFORE["loss"], abs=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in parent.state_dict().items())  # no longer pruned in place


@pytest.mark.parametrize("statistics", ["parent", "sequential"])
def test_the_candidate_search_copies_no_model_and_reads_the_parent_once(monkeypatch, tmp_path: Path, statistics):
    parent, ids = _parent(), _ids()
    state = {k: v.clone() for k, v in parent.state_dict().items()}
    deepcopy = copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        assert not isinstance(obj, LlamaForCausalLM), "the candidate search deep-copied a whole model"
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    passes, last = [], parent.model.layers[-1]
    last.register_forward_hook(lambda module, *_: passes.append(module is last))  # not its pruned stand-ins
    cfg = PruneConfig.model_validate({"method": "flap", "ratio": 0.5, "search": {"quantum": 8, "candidates": 2},
                                      "flap": {"statistics": statistics}})
    report = {"candidates": []}
    micro = 3
    pruned = apply_flap(Context(parent, ids, cfg, micro, CPU, Shape.of(parent), Meter(CPU), report, tmp_path)).model
    batches = math.ceil(ids.shape[0] / micro)
    count = len(report["candidates"])
    assert count >= 2
    # parent: one pass scores every candidate; sequential: each candidate reads the parent's layers once more
    assert sum(passes) == batches * (1 if statistics == "parent" else count)
    assert report["flap"] == {"statistics": statistics, "kv_group_score": "sum of squared channel scores"}
    assert all(torch.equal(v, state[k]) for k, v in parent.state_dict().items())
    chosen = next(c for c in report["candidates"] if c["selected"])
    target = _target(parent, chosen["kv_heads"], chosen["ffn"])
    same = flap_prune(parent, ids, micro, CPU, target, statistics=statistics)
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, same(ids).logits)

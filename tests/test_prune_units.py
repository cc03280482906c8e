"""Pruning building blocks in-process on small random Llamas: masks, surgery, the layer-wise engine."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunectl.errors import PrunectlError
from prunectl.prune import calibration as calib
from prunectl.prune import sparse
from prunectl.prune.surgery import Shape, cut


def _model(layers=3, hidden=64, heads=4, kv=2, ffn=128, tied=True, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                         tie_word_embeddings=tied, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _ids(n=8, t=32, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [True, False])
def test_shape_counts_parameters_exactly(tied):
    m = _model(tied=tied)
    assert Shape.of(m).parameters() == sum(p.numel() for p in m.parameters())
    biased = cut(m, biases=True)
    assert Shape.of(biased).parameters() == sum(p.numel() for p in biased.parameters())


def test_cut_keeping_everything_is_the_same_function():
    m, x = _model(), _ids()
    same = cut(m, layers=[0, 1, 2], hidden=torch.arange(64), kv_groups=[torch.arange(2)] * 3,
               ffn=[torch.arange(128)] * 3)
    with torch.no_grad():
        assert torch.allclose(m(x).logits, same(x).logits, atol=1e-5)


def test_cut_drops_kv_groups_with_their_query_heads():
    m = _model(heads=8, kv=2)
    small = cut(m, kv_groups=[torch.tensor([1])] * 3, ffn=[torch.arange(0, 128, 2)] * 3)
    c = small.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (4, 1, 64)
    # query heads 4..7 belong to KV group 1: their rows of q_proj survive, in order
    q = m.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(small.model.layers[0].self_attn.q_proj.weight, q[4 * 8 : 8 * 8])
    assert torch.equal(small.model.layers[0].self_attn.k_proj.weight, m.model.layers[0].self_attn.k_proj.weight[8:16])
    small(_ids())  # runs: GQA shapes are consistent


def test_layerwise_pass_matches_the_full_model():
    m, x = _model(), _ids()
    walk = calib.Layerwise(m, x, micro=3, device=torch.device("cpu"))
    for _ in walk.each_layer():
        pass
    with torch.no_grad():
        logits = m.lm_head(m.model.norm(torch.cat(list(walk.hidden))))
        assert torch.allclose(logits, m(x).logits, atol=1e-4)


def test_shared_inputs_give_the_same_statistics_as_one_hook_per_linear():
    m, x = _model(), _ids()
    layer = m.model.layers[0]
    h = m.model.embed_tokens(x)
    pos = torch.arange(x.shape[1])[None]
    pe = m.model.rotary_emb(h, pos)

    def run():
        with torch.no_grad():
            layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)

    shared = calib.collect(layer, run, gram=True, shared=True)
    single = calib.collect(layer, run, gram=True, shared=False)
    for name in calib.LINEARS:
        assert torch.allclose(shared[name].xtx, single[name].xtx) and shared[name].n == single[name].n
    assert shared["self_attn.q_proj"] is shared["self_attn.v_proj"]  # one accumulation for q, k and v


def test_n_of_m_keeps_exactly_n_per_group_and_matches_a_loop():
    score = torch.randn(16, 64).abs()
    keep = sparse.keep_n_of_m(score, 2, 4)
    assert (keep.view(16, 16, 4).sum(-1) == 2).all()
    for r in range(16):
        for g in range(16):
            best = set(torch.topk(score[r, 4 * g : 4 * g + 4], 2).indices.tolist())
            assert set(torch.nonzero(keep[r, 4 * g : 4 * g + 4]).flatten().tolist()) == best


def test_wanda_is_exact_per_row_and_uses_input_norms():
    w = torch.randn(8, 32)
    norm = torch.ones(32)
    norm[:4] = 100.0  # the first inputs carry large activations: Wanda keeps their weights
    keep = sparse.wanda_mask(w, norm, 0.5, None)
    assert (keep.sum(1) == 16).all()
    assert keep[:, :4].all()


def test_sparsegpt_is_exact_per_layer_and_reconstructs_better_than_magnitude():
    torch.manual_seed(0)
    x = torch.randn(2048, 96) * torch.linspace(0.1, 3, 96)  # uneven input scales, as in a real layer
    lin = torch.nn.Linear(96, 48, bias=False)
    w0 = lin.weight.data.clone()
    keep = sparse.sparsegpt_(lin.weight, x.T @ x, x.shape[0], 0.5, None, sparse.SparseGPTConfig(), "t")
    assert int((~keep).sum()) == w0.numel() // 2 and torch.equal(lin.weight == 0, ~keep | (w0 == 0))
    mag = w0 * sparse.magnitude_mask(w0, 0.5, None)
    err = lambda w: float((x @ w0.T - x @ w.T).square().mean())  # noqa: E731
    assert err(lin.weight.data) < 0.5 * err(mag)
    # several blocks (cumulative per-block counts): still exactly half of the layer
    blocked = torch.nn.Linear(96, 48, bias=False)
    keep = sparse.sparsegpt_(blocked.weight, x.T @ x, x.shape[0], 0.37, None, sparse.SparseGPTConfig(block_size=32), "t")
    assert int((~keep).sum()) == round(0.37 * w0.numel())

    lin2 = torch.nn.Linear(96, 48, bias=False)
    keep = sparse.sparsegpt_(lin2.weight, x.T @ x, x.shape[0], 0.5, (2, 4), sparse.SparseGPTConfig(), "t")
    assert (keep.view(48, 24, 4).sum(-1) == 2).all() and ((lin2.weight != 0).view(48, 24, 4).sum(-1) <= 2).all()


def test_sparsegpt_failed_cholesky_is_an_error_not_a_fallback():
    lin = torch.nn.Linear(8, 4, bias=False)
    with pytest.raises(PrunectlError, match="dampening"):
        sparse.sparsegpt_(lin.weight, -torch.eye(8) * 5, 1, 0.5, None, sparse.SparseGPTConfig(dampening=0.01), "x")


def test_patterns():
    assert sparse.parse_pattern("unstructured") is None and sparse.parse_pattern("4:8") == (4, 8)
    with pytest.raises(ValueError):
        sparse.parse_pattern("4:2")


def test_n_m_is_refused_where_nvidias_and_the_wanda_codes_readings_differ():
    """prunectl keeps N of M; Wanda's and SparseGPT's flags prune N of M. Same for 2:4 and 4:8, opposite for 1:4."""
    assert sparse.parse_pattern("2:4") == (2, 4) and sparse.parse_pattern("keep 1 of 4") == (1, 4)
    assert sparse.parse_pattern("prune 1 of 4") == (3, 4) and sparse.parse_pattern("prune 2 of 4") == (2, 4)
    with pytest.raises(ValueError, match="write 'keep 1 of 4' or 'prune 1 of 4'"):
        sparse.parse_pattern("1:4")
    assert sparse.describe_pattern("2:4") == "2:4 (keep 2 of every 4)"
    assert sparse.describe_pattern("prune 1 of 4") == "prune 1 of 4 (keep 3 of every 4)"
    mask = sparse.wanda_mask(torch.arange(1.0, 9.0).reshape(1, 8), torch.ones(8), 0.25, sparse.parse_pattern("prune 1 of 4"))
    assert mask.tolist() == [[False, True, True, True, False, True, True, True]]  # the smallest of each 4 pruned


def test_open_masks_leave_the_function_unchanged_and_cut_to_the_target():
    from prunectl.prune import sheared
    from prunectl.prune.hardconcrete import MaskedLlama

    m, x = _model(layers=3, heads=4, kv=2), _ids()
    with torch.no_grad():
        reference = m(x, labels=x).loss
    target = Shape.of(m).with_(layers=2, hidden=48, kv_heads=1, heads=2, ffn=64)
    masked = MaskedLlama(m, target, init_log_alpha=3.0).eval()  # deterministic z = 1 everywhere
    with torch.no_grad():
        loss, _ = masked(x, labels=x)
    assert torch.allclose(loss, reference, atol=1e-6)
    dense = sheared.to_dense(masked, target)
    assert Shape.of(dense) == target
    dense(x)


def test_the_cut_from_a_state_dict_matches_the_module_and_changes_nothing():
    """What rank 0 does under ZeRO-3: cut from fit()'s consolidated state, not from the module's own tensors."""
    from prunectl.prune import sheared
    from prunectl.prune.hardconcrete import MaskedLlama

    m, x = _model(layers=3, heads=4, kv=2, tied=False), _ids()
    target = Shape.of(m).with_(layers=2, hidden=48, kv_heads=1, heads=2, ffn=64)
    masked = MaskedLlama(m, target, init_log_alpha=0.5).eval()
    with torch.no_grad():
        for la in masked.log_alpha.values():
            la.add_(torch.randn(la.shape))  # distinct log-alphas: a real choice of units, partly open masks
    state = {k: v.clone() for k, v in masked.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    from_state, from_module = sheared.to_dense(masked, target, state), sheared.to_dense(masked, target)
    assert all(torch.equal(state[k], before[k]) for k in state)  # folded out of place
    assert all(torch.equal(v, masked.state_dict()[k]) for k, v in before.items())
    assert Shape.of(from_state) == target
    with torch.no_grad():
        assert torch.equal(from_state(x).logits, from_module(x).logits)
    assert sheared.expected_of(state) == sheared._expected_metrics(masked.expected())


def test_candidates_spread_over_ranks_score_as_select_does_on_one_rank():
    models, x = [_model(layers=2, seed=s) for s in range(3)], _ids()
    rows: list[dict] = []
    calib.select(((m, {}) for m in models), x, 4, "cpu", rows)
    assert calib.spread(lambda k: models[k], 3, x, 4, torch.device("cpu"), 0, 1) == [r["calibration_loss"] for r in rows]


def test_the_lagrangian_pushes_the_expected_shape_toward_the_target():
    from prunectl.prune.hardconcrete import MaskedLlama

    m, x = _model(layers=2), _ids(n=4, t=16)
    target = Shape.of(m).with_(hidden=32, ffn=64)
    masked = MaskedLlama(m, target, init_log_alpha=3.0, dual_lr=1.0).train()
    opt = torch.optim.Adam(masked.log_alpha.parameters(), lr=0.5)
    start = masked.expected().detach()
    peak = torch.zeros(4)
    for _ in range(30):
        lm, lagrangian = masked(x, labels=x)
        opt.zero_grad()
        (lm + lagrangian).backward()
        opt.step()
        peak = torch.maximum(peak, masked.lambdas)
    end = masked.expected().detach()
    assert end[2] < start[2] - 0.1 and end[3] < start[3] - 0.1  # hidden and MLP fractions fall toward 0.5
    assert peak[2] > 0 and peak[3] > 0  # ascent: the multipliers grew while the constraint was violated
    assert int(masked.draws) == 30  # one seeded draw per training forward


# ------------------------------------------------------------------------------------------ ratio basis and pins

TINY = Shape(layers=12, hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=384, vocab=2048, tied=True)


def _prune_cfg(**prune):
    from prunectl.prune.config import PruneConfig

    return PruneConfig(**prune)


def test_the_ratio_basis_defaults_to_total_and_to_decoder_for_sparse_methods():
    assert _prune_cfg(method="minitron-depth", ratio=0.5).ratio_of == "total"
    assert _prune_cfg(method="wanda", pattern="2:4").ratio_of == "decoder"
    depth = _prune_cfg(method="minitron-depth", ratio=0.5)
    layers = _prune_cfg(method="minitron-depth", ratio=0.5, ratio_of="layers")
    assert [s.layers for s in depth.spec.feasible(depth, TINY)] == [5]  # half the parameters: embeddings stay
    assert [s.layers for s in layers.spec.feasible(layers, TINY)] == [6]  # half the layers


@pytest.mark.parametrize("prune, message", [
    ({"method": "sparsegpt", "ratio": 0.5, "ratio_of": "total"}, "a sparse method zeroes decoder Linear weights"),
    ({"method": "sheared-llama", "ratio": 0.5, "ratio_of": "layers", "sheared": {"train": {"tokens": 4096}}},
     "ratio_of layers fits methods that remove whole layers only"),
    ({"method": "magnitude", "ratio": 0.5, "target": {"ffn": 8}}, "keeps the parent's shape"),
    ({"method": "shortgpt", "ratio": 0.5, "target": {"hidden": 64}}, "pins layers; it cannot change hidden"),
    ({"method": "flap", "ratio": 0.5, "target": {}}, "name at least one"),
    ({"method": "sheared-llama", "ratio": 0.5, "target": {"hidden": 96},
      "sheared": {"train": {"tokens": 4096}, "targets": [{"hidden": 96, "heads": 4, "ffn": 128}]}}, "keep one"),
])
def test_a_basis_or_pin_the_method_cannot_honour_is_refused(prune, message):
    with pytest.raises(ValueError, match=message):
        _prune_cfg(**prune)


@pytest.mark.parametrize("target, message", [
    ({"hidden": 256, "ffn": 192}, r"larger than the parent \(hidden 256 > 128\)"),
    ({"hidden": 128, "ffn": 384}, "is the parent's shape"),
    ({"hidden": 32, "ffn": 32}, r"removes 90.4% of the parent's parameters, but prune.ratio is 50.0% of total"),
])
def test_a_pinned_shape_is_checked_against_the_parent_and_the_ratio(target, message):
    cfg = _prune_cfg(method="minitron-width", ratio=0.5, target=target)
    with pytest.raises(PrunectlError, match=message):
        cfg.spec.feasible(cfg, TINY)


def test_a_pinned_shape_is_the_one_candidate_and_heads_bring_their_kv_groups():
    width = _prune_cfg(method="minitron-width", ratio=0.5, target={"hidden": 96, "ffn": 192})
    assert width.spec.feasible(width, TINY) == [TINY.with_(hidden=96, ffn=192)]
    flap = _prune_cfg(method="flap", ratio=0.5, ratio_of="decoder", target={"heads": 2, "ffn": 192})
    assert [(s.heads, s.kv_heads, s.ffn, s.mlp_bias) for s in flap.spec.feasible(flap, TINY)] == [(2, 1, 192, True)]
    odd = _prune_cfg(method="flap", ratio=0.5, target={"heads": 3, "ffn": 192})
    with pytest.raises(PrunectlError, match="not a multiple of the parent's 2 query heads per KV group"):
        odd.spec.feasible(odd, TINY)

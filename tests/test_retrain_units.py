"""Retraining's parts in isolation: the distillation loss, masks held by the optimizer, prefix and range budgets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from prunectl import masks as sparse_masks
from prunectl.distill import kd_loss, next_token_loss
from prunectl.errors import PrunectlError
from prunectl.train import TrainConfig


def test_kd_loss_is_t_squared_kl_from_teacher_to_student():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    T = 2.0
    p_t, p_s = F.softmax(t / T, -1), F.softmax(s / T, -1)
    manual = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(manual.item(), rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, t, T).item() > 0


def test_next_token_loss_matches_transformers():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    x = torch.randint(0, 64, (2, 9))
    out = model(input_ids=x, labels=x)
    assert next_token_loss(out.logits, x).item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_held_masks_stay_exactly_zero_under_adamw_with_weight_decay():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    masks = {n: torch.rand_like(p) > 0.5 for n, p in model.named_parameters() if n.endswith("proj.weight")}
    sparse_masks.hold(model, masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        x = torch.randint(0, 64, (4, 16))
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    summary = sparse_masks.check(state, masks)  # raises if a masked weight moved
    kept_moved = sum(int((state[n][m] != before[n][m]).sum()) for n, m in masks.items())
    assert kept_moved > 0.9 * sum(int(m.sum()) for m in masks.values())  # the surviving weights do train
    kept = sum(int(m.sum()) for m in masks.values())
    assert summary["mask_sparsity"] == pytest.approx(1 - kept / sum(m.numel() for m in masks.values()), abs=1e-6)
    assert summary["masked_linears_zero_fraction"] >= summary["mask_sparsity"]
    state["model.layers.0.mlp.up_proj.weight"][~masks["model.layers.0.mlp.up_proj.weight"]] = 1.0
    with pytest.raises(PrunectlError, match="masked weights are non-zero"):
        sparse_masks.check(state, masks)


def test_masks_for_another_architecture_are_refused():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    with pytest.raises(PrunectlError, match="does not fit the model"):
        sparse_masks.hold(model, {"model.layers.0.mlp.up_proj.weight": torch.ones(8, 8, dtype=torch.bool)})


def test_prefix_and_range_budgets():
    t = TrainConfig(tokens=16 * 64 * 100, prefix_tokens=16 * 64 * 10, seq_len=64, global_batch=16, micro_batch=16)
    assert (t.steps, t.run_steps) == (100, 10)  # the prefix follows the full run's schedule
    with pytest.raises(ValueError, match="exceeds the budget"):
        TrainConfig(tokens=16 * 64, prefix_tokens=16 * 64 * 2, seq_len=64, global_batch=16, micro_batch=16)
    with pytest.raises(ValueError, match="not in data_ranges"):
        TrainConfig(tokens=16 * 64, seq_len=64, global_batch=16, micro_batch=16, range_tokens={"retrain": 100})
    assert math.isclose(TrainConfig(tokens=16 * 64, seq_len=64, global_batch=16, micro_batch=16).run_steps, 1)

"""The chunked next-token loss and activation checkpointing change memory, never the numbers."""

from __future__ import annotations

import pytest
import torch

from prunectl import model as models
from prunectl.loss import CausalLM, checkpoint_layers, language_model_state, next_token_loss


def _llama(seed: int = 0, vocab: int = 1000, tie: bool = False):
    config = models.llama_config(models.ModelConfig(layers=4, hidden=32, heads=4, kv_heads=2, ffn=64, vocab=vocab,
                                                    tie_embeddings=tie), vocab, 1, 2, 0)
    return models.build(config, seed)


@pytest.mark.parametrize(("chunk", "tie"), [(0, False), (37, False), (37, True), (4096, True)])
def test_the_chunked_loss_and_its_gradients_equal_hfs_full_vocabulary_loss(chunk, tie):
    x = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    full, chunked = _llama(tie=tie), _llama(tie=tie)
    reference = full(input_ids=x, labels=x).loss
    loss = next_token_loss(chunked, x, chunk)
    assert abs(loss.item() - reference.item()) <= 1e-6 * reference.item()
    reference.backward()
    loss.backward()
    for (name, a), b in zip(full.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def _three_steps(mode: str):
    torch.manual_seed(0)
    root = CausalLM(_llama(), chunk=100)
    checkpoint_layers(root.lm, mode)
    root.train()
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        x = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(step))
        loss = root(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, language_model_state(root.state_dict())


def test_activation_checkpointing_gives_the_same_loss_and_weights():
    losses, weights = _three_steps("none")
    assert set(weights) == set(_llama().state_dict())  # final/ keeps the LlamaForCausalLM's own names
    for mode in ("full", "selective"):
        again, trained = _three_steps(mode)
        assert again[0] == pytest.approx(losses[0], rel=1e-6)
        assert again == pytest.approx(losses, rel=1e-5)
        for name, w in weights.items():
            assert torch.allclose(trained[name], w, rtol=1e-5, atol=1e-6), (mode, name)


def test_selective_checkpointing_recomputes_every_second_layer():
    lm = _llama()
    checkpoint_layers(lm, "selective")
    assert [layer.gradient_checkpointing for layer in lm.model.layers] == [True, False, True, False]
    lm = _llama()
    checkpoint_layers(lm, "full")
    assert all(layer.gradient_checkpointing for layer in lm.model.layers)

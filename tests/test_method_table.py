"""The prune method table is the one place a method is declared: recipes, checks and the stage all read it."""

from __future__ import annotations

import pytest
import torch

from prunectl.errors import PrunectlError
from prunectl.prune import methods
from prunectl.prune.config import PruneConfig
from prunectl.prune.context import Context, Pruned
from prunectl.prune.meter import Meter
from prunectl.prune.surgery import Shape, cut


def _tiny():
    from prunectl import model as models
    from prunectl.model import ModelConfig

    cfg = ModelConfig(layers=4, hidden=32, heads=4, kv_heads=2, ffn=64, vocab=64, max_position=64)
    return models.build(models.llama_config(cfg, 64, None, None, None), seed=0)


def drop_last_layers(ctx: Context) -> Pruned:
    """A toy method: keep the first half of the layers."""
    keep = max(1, round(ctx.shape.layers * (1 - ctx.cfg.ratio)))
    with ctx.meter.phase("cut"):
        return Pruned(cut(ctx.model, layers=list(range(keep))))


def needs_four_layers(cfg, shape: Shape) -> None:
    if shape.layers < 4:
        raise PrunectlError("prune.ratio: drop-last needs at least 4 layers")


def test_a_new_method_is_one_table_entry(monkeypatch):
    with pytest.raises(ValueError, match="unknown method"):
        PruneConfig(method="drop-last", ratio=0.5)
    monkeypatch.setitem(methods.METHODS, "drop-last",
                        methods.Method(sparse=False, calibrated=False, layerwise=False,
                                       feasible=needs_four_layers, apply=drop_last_layers))
    cfg = PruneConfig(method="drop-last", ratio=0.5)
    model = _tiny()
    shape = Shape.of(model)
    cfg.spec.feasible(cfg, shape)
    with pytest.raises(PrunectlError, match="at least 4 layers"):
        cfg.spec.feasible(cfg, shape.with_(layers=2))
    meter = Meter(torch.device("cpu"))
    out = cfg.spec.apply(Context(model, None, cfg, 8, torch.device("cpu"), shape, meter, {"candidates": []}, None))
    assert out.model.config.num_hidden_layers == 2 and out.masks == {}
    assert [p["phase"] for p in meter.phases] == ["cut"]


def test_every_table_entry_is_a_recipe_method_with_its_flags():
    assert set(methods.METHODS) == {"minitron-depth", "shortgpt", "minitron-width", "flap", "sheared-llama", "wanda",
                                    "sparsegpt", "magnitude"}
    assert {k for k, m in methods.METHODS.items() if m.sparse} == {"wanda", "sparsegpt", "magnitude"}
    assert {k for k, m in methods.METHODS.items() if not m.calibrated} == {"magnitude"}
    assert {k for k, m in methods.METHODS.items() if m.learn} == {"sheared-llama"}
    with pytest.raises(ValueError, match="applies to sparse methods"):
        PruneConfig(method="flap", pattern="2:4")

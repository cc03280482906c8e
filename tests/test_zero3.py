"""Models made and loaded straight into ZeRO-3 partitions (prunectl.zero3), on 2 real ranks over gloo with a
persistence threshold of 0, so that every parameter is partitioned: the weights equal the plain build's and the
saved model's, no rank holds a whole parameter outside a gather, and a sparse mask is held in partitions."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.slow


def _config(tied: bool = False):
    from prunectl import model as models

    return models.llama_config(models.ModelConfig(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=300,
                                                  tie_embeddings=tied), 300, 1, 2, 0)


def _ds_config():
    from prunectl.train import OptimizerConfig, TrainConfig, deepspeed_config

    cfg = TrainConfig(tokens=4096, seq_len=32, global_batch=4, micro_batch=2, zero_stage=3,
                      deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    return deepspeed_config(cfg, OptimizerConfig(), 2, False)


def _full_state(model) -> dict[str, torch.Tensor]:
    from prunectl.zero3 import gathered

    state = {}
    for name, p in model.named_parameters():
        with gathered([p]):
            state[name] = p.detach().numpy().copy()  # through the queue by value, not a shared fd
    return state


def _rank(r: int, port: int, folder: str, out) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=os.path.join(sys.prefix, "torch_extensions"))
    try:
        import deepspeed

        from prunectl import masks, model as models
        from prunectl.zero3 import sliced

        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        built = models.build(_config(), 7, _ds_config())
        tied = models.build(_config(tied=True), 7, _ds_config())
        loaded = models.load(folder, _ds_config())  # a tied model
        all_sliced = all(sliced(p) for m in (built, tied, loaded) for p in m.parameters())
        masks.hold(loaded, masks.load(folder), partitioned=True)
        mask = loaded.model.layers[0].mlp.down_proj.keep_mask
        out.put((r, None, {"built": _full_state(built), "tied": _full_state(tied), "loaded": _full_state(loaded),
                           "sliced": all_sliced, "head_is_embedding": loaded.lm_head.weight is loaded.model.embed_tokens.weight,
                           "mask_sliced": sliced(mask)}))
    except BaseException:  # reported to the test, which fails with it
        import traceback

        out.put((r, traceback.format_exc(), None))


def test_built_and_loaded_in_partitions_equal_the_plain_model(tmp_path):
    from prunectl import masks, model as models

    plain, plain_tied = models.build(_config(), 7), models.build(_config(tied=True), 7)
    saved = models.build(_config(tied=True), 8)  # another model, saved as a checkpoint to load
    saved.save_pretrained(tmp_path)
    w = "model.layers.0.mlp.down_proj.weight"
    keep = torch.rand(saved.get_parameter(w).shape, generator=torch.Generator().manual_seed(0)) < 0.5
    save_file({w: keep}, str(tmp_path / masks.FILE))

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (err, got)) for r, err, got in (out.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(60)
    for r, (err, _) in results.items():
        assert err is None, f"rank {r}: {err}"

    stored = {n: p.detach() for n, p in saved.named_parameters()}
    for r, (_, got) in results.items():
        assert got["sliced"] and got["mask_sliced"], "every parameter and the mask are partitioned"
        assert got["head_is_embedding"]
        for key, model in (("built", plain), ("tied", plain_tied)):
            expected = {n: p.detach() for n, p in model.named_parameters()}
            assert got[key].keys() == expected.keys()
            for name in expected:  # the same random draws as the plain build, bit for bit
                assert torch.equal(torch.from_numpy(got[key][name]), expected[name]), f"rank {r}: {key} {name} differs"
        for name in stored:
            want = stored[name].masked_fill(~keep, 0) if name == w else stored[name]
            assert torch.equal(torch.from_numpy(got["loaded"][name]), want), f"rank {r}: loaded {name} differs"

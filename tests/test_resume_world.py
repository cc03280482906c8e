"""Resume anywhere: a run checkpointed on W ranks resumes on W' ranks (DeepSpeed's universal checkpoint), reads
exactly the sequences an uninterrupted run reads, continues its loss curve, and the manifest says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunectl import checkpoints, store

from .conftest import manifest, prunectl
from .test_checkpoints import plant, record

# 16 steps of 1024 tokens, a loss logged at every step, checkpoints at 4, 8, 12 (8 and 12 kept).
ARGS = ["pretrain", "test-parent", "train.tokens=16384", "train.checkpoint_every=4", "train.log_every=1",
        "launch.cpus_per_task=1", "--executor", "local"]


def ranks(n: int) -> str:
    return f"launch.tasks_per_node={n}"


def _interrupt(run_dir: Path) -> None:
    """A complete run turned back into one interrupted after its step-12 checkpoint: failed, no final/."""
    shutil.rmtree(run_dir / "final")
    m = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**m, "status": "failed", "finished": None, "note": "killed"}))


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _log_note(run_dir: Path) -> str:
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("**/*_0_log.out"))
    return [line for line in logs.splitlines() if line.startswith("resumed at step")][-1]


def _resumes_like_uninterrupted(fresh_runs, stage: int, saved_on: int, resumed_on: int, at: int = 12,
                                damage=None) -> str:
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    args = [*ARGS, f"train.zero_stage={stage}"]
    # The uninterrupted run on `saved_on` ranks is the reference; its checkpoints are what the resume starts from.
    prunectl(*args, ranks(saved_on), env=env)
    run_dir = runs / "test-parent" / "v001"
    reference, ref_manifest, ref_losses = load_file(str(run_dir / "final" / "model.safetensors")), \
        manifest(runs, "test-parent"), _losses(run_dir)
    assert json.loads((run_dir / "checkpoints" / "step00000012" / checkpoints.RECORD).read_text())["world"] == saved_on
    _interrupt(run_dir)
    if damage:
        damage(run_dir / "checkpoints")

    out = prunectl(*args, ranks(resumed_on), env=env)
    assert "resuming test-parent@v001" in out.stdout  # the same run: launch is not a training run's identity
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete" and m["resumed_from"] == [at], m
    assert m["resumed_world"] == [[at, saved_on, resumed_on]] and m["summary"]["world_size"] == resumed_on
    # exactly the same sequences: token intervals, sequence and token counts
    assert m["data"] == ref_manifest["data"] and m["summary"]["tokens"] == ref_manifest["summary"]["tokens"] == 16384
    assert not (run_dir / "checkpoints" / checkpoints.UNIVERSAL).exists()  # the conversion is gone once loaded

    # Loss continuity. The steps after the resume compute their loss from the resumed weights on the same
    # sequences: they match the uninterrupted run's losses at those steps to float32 reduction-order noise
    # (another number of ranks sums the gradients in another order, so not bit for bit); a wrong weight,
    # moment or sequence would be off by far more. Before the resume, metrics.jsonl is the reference's own.
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 17))
    assert all(losses[s] == ref_losses[s] for s in range(1, at + 1))
    after = [(s, losses[s], ref_losses[s]) for s in range(at + 1, 17)]
    assert all(abs(a - b) <= 1e-4 * abs(b) for _, a, b in after), after
    # and the final weights equal the uninterrupted run's to the same noise (Adam's normalisation of
    # near-zero moments amplifies it a little, hence an absolute tolerance on weights of order 0.1)
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert final.keys() == reference.keys()
    worst = max((final[k] - reference[k]).abs().max().item() for k in final)
    assert worst < 1e-3, worst
    note = _log_note(run_dir)
    assert note.startswith(f"resumed at step {at} on {resumed_on} ranks from a checkpoint saved on {saved_on} "
                           "(DeepSpeed universal checkpoint)"), note
    return note


@pytest.mark.slow  # a two-rank pretrain job, then its resume on one rank
@pytest.mark.parametrize("stage", [2, 3])
def test_a_two_rank_checkpoint_resumes_on_one_rank(fresh_runs, stage):
    _resumes_like_uninterrupted(fresh_runs, stage, saved_on=2, resumed_on=1)


@pytest.mark.slow  # a one-rank pretrain job, then its resume on two ranks
def test_a_one_rank_zero1_checkpoint_resumes_on_two_ranks(fresh_runs):
    _resumes_like_uninterrupted(fresh_runs, 1, saved_on=1, resumed_on=2)


@pytest.mark.slow  # a two-rank pretrain job, then its resume on one rank
def test_the_conversion_unpickles_nothing(fresh_runs, tmp_path):
    """Rank 1's partition is read only by the conversion when one rank resumes: a payload planted there (with a
    record that agrees) is refused by the weights-only loads, and the run falls back to the older checkpoint."""
    marker = tmp_path / "pwned"

    def planted(ckpt: Path) -> None:
        newest = ckpt / "step00000012"
        [shard] = newest.glob("zero_pp_rank_1_*optim_states.pt")
        plant(shard, marker)
        world = json.loads((newest / checkpoints.RECORD).read_text())["world"]
        record(newest, 12)
        rec = json.loads((newest / checkpoints.RECORD).read_text())
        (newest / checkpoints.RECORD).write_text(json.dumps({**rec, "world": world}))

    note = _resumes_like_uninterrupted(fresh_runs, 2, saved_on=2, resumed_on=1, at=8, damage=planted)
    assert not marker.exists()
    assert "checkpoint step00000012 did not load: converting it from 2 to 1 ranks failed: UnpicklingError" in note, note


# ------------------------------------------------------------------------------------------ units


def test_the_saved_world_is_recorded_or_counted_from_the_partitions(tmp_path):
    where = tmp_path / "step00000004"
    where.mkdir()
    files = {"mp_rank_00_model_states.pt": 1, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 1,
             "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1, "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt": 1}
    (where / checkpoints.RECORD).write_text(json.dumps({"step": 4, "files": files}))
    assert checkpoints._saved_world(where) == 3  # written before records held the world
    (where / checkpoints.RECORD).write_text(json.dumps({"step": 4, "world": 4, "files": files}))
    assert checkpoints._saved_world(where) == 4
    (where / checkpoints.RECORD).write_text(json.dumps({"step": 4, "files": {"mp_rank_00_model_states.pt": 1}}))
    assert checkpoints._saved_world(where) is None  # stage 0 in fp32: loads on any number of ranks


def test_the_resume_note_and_an_old_manifest():
    assert checkpoints.note(checkpoints.Resumed(0, None, None), 2) is None
    assert checkpoints.note(checkpoints.Resumed(12, None, 2), 2) == "resumed at step 12"
    assert checkpoints.note(checkpoints.Resumed(12, "checkpoint x did not load", 2), 1) == (
        "resumed at step 12 on 1 ranks from a checkpoint saved on 2 (DeepSpeed universal checkpoint) "
        "(checkpoint x did not load)")
    old = store.Manifest(name="x", version=1, stage="pretrain").model_dump(exclude={"resumed_world"})
    assert store.Manifest.model_validate(old).resumed_world == []


def test_every_load_is_weights_only_inside_the_switch(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "evil.pt", marker)
    with checkpoints.weights_only_everywhere():
        with pytest.raises(Exception, match="Unsupported global"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # what DeepSpeed's conversion passes
    assert not marker.exists()


def test_the_allow_list_survives_a_nested_safe_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save({"loss_scaler": LossScaler(1.0)}, tmp_path / "scaler.pt")
    before = torch.serialization.get_safe_globals()
    with checkpoints.weights_only_everywhere():
        checkpoints.safe_load(tmp_path / "scaler.pt")  # leaving it must not drop what the outer context allowed
        assert type(torch.load(tmp_path / "scaler.pt", weights_only=False)["loss_scaler"]) is LossScaler
    assert set(torch.serialization.get_safe_globals()) == set(before)


def test_a_training_runs_identity_leaves_out_its_launch(tmp_path):
    import textwrap

    from prunectl.recipe import dump, identity, resolve

    from .conftest import PARENT_RECIPE

    path = tmp_path / "parent.yaml"
    path.write_text(textwrap.dedent(PARENT_RECIPE))
    one = identity(dump(resolve(str(path))))
    assert identity(dump(resolve(str(path), ["launch.tasks_per_node=4", "launch.nodes=2"]))) == one
    assert identity(dump(resolve(str(path), ["train.global_batch=32"]))) != one  # what it makes still counts

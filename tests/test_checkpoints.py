"""Checkpoints: nothing a run directory names is unpickled, a damaged newest checkpoint falls back to an older
one (ending bit-identical), none loading fails in one line, and a diverged loss fails the run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from prunectl import checkpoints
from prunectl.train import OptimizerConfig, TrainConfig

from .conftest import REPO, manifest, prunectl

# 16 steps of 1024 tokens, checkpoints at 4, 8, 12: the two newest (8, 12) are kept.
ARGS = ["pretrain", "test-parent", "train.tokens=16384", "train.checkpoint_every=4", "--executor", "local"]


class Planted:
    """A pickle payload: unpickling it creates `marker` (what a crafted checkpoint would do with a shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    torch.save({"module": Planted(marker), "step": 12}, path)


def record(folder: Path, step: int) -> None:
    """What save() writes, so that only the safe load stands between a planted file and unpickling."""
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != checkpoints.RECORD}
    (folder / checkpoints.RECORD).write_text(json.dumps({"step": step, "files": files}))


def fake_checkpoint(folder: Path, step: int) -> Path:
    where = folder / checkpoints.tag_of(step)
    where.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}, "step": step}, where / "mp_rank_00_model_states.pt")
    record(where, step)
    return where


# ------------------------------------------------------------------------------------------ units


def test_the_planted_payload_is_real_and_the_safe_load_refuses_it(tmp_path):
    marker = tmp_path / "control"
    plant(tmp_path / "control.pt", marker)
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert marker.exists()  # so a missing marker below means it was never unpickled

    marker = tmp_path / "marker"
    folder = tmp_path / "checkpoints"
    where = fake_checkpoint(folder, 12)
    plant(where / "mp_rank_00_model_states.pt", marker)
    record(where, 12)
    why = checkpoints._verify(folder, "step00000012", 0, {})
    assert why.endswith("UnpicklingError: WeightsUnpickler error: Unsupported global: GLOBAL io.open"), why
    assert not marker.exists()


def test_only_recorded_step_directories_inside_checkpoints_verify(tmp_path):
    folder = tmp_path / "checkpoints"
    fake_checkpoint(folder, 8)
    preloaded = {}
    assert checkpoints._verify(folder, "step00000008", 0, preloaded) is None
    assert list(preloaded.values())[0]["step"] == 8

    outside = fake_checkpoint(tmp_path / "elsewhere", 9)
    (folder / "step00000009").symlink_to(outside, target_is_directory=True)
    assert "not a directory inside checkpoints" in checkpoints._verify(folder, "step00000009", 0, {})
    assert checkpoints._verify(folder, "step00000010", 0, {}) == "it is missing"

    unfinished = folder / "step00000011"
    unfinished.mkdir()
    (unfinished / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert "no files.json" in checkpoints._verify(folder, "step00000011", 0, {})

    truncated = fake_checkpoint(folder, 12)
    with open(truncated / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(100)
    assert "has 100 bytes" in checkpoints._verify(folder, "step00000012", 0, {})

    extra = fake_checkpoint(folder, 13)
    (extra / "mp_rank_01_model_states.pt").write_bytes(b"x")  # DeepSpeed globs these: one more changes what it loads
    assert "unexpected ['mp_rank_01_model_states.pt']" in checkpoints._verify(folder, "step00000013", 0, {})

    linked = fake_checkpoint(folder, 14)
    (linked / "mp_rank_00_model_states.pt").unlink()
    (linked / "mp_rank_00_model_states.pt").symlink_to(outside / "mp_rank_00_model_states.pt")
    assert "not a plain file" in checkpoints._verify(folder, "step00000014", 0, {})


@pytest.mark.parametrize("latest, first, problem", [
    ({"tag": "step00000012"}, "step00000012", None),
    ({"tag": "../../../../tmp/evil"}, "step00000016", "not a checkpoint of this run"),
    ({"tag": "/tmp/evil"}, "step00000016", "not a checkpoint of this run"),
    ({"tag": "step00000012/../../x"}, "step00000016", "not a checkpoint of this run"),
    ({"tag": 12}, "step00000016", "not a checkpoint of this run"),
    ("{not json", "step00000016", "unreadable"),
    (None, "step00000016", None),
])
def test_candidates_never_take_a_tag_from_latest_json_unchecked(tmp_path, latest, first, problem):
    folder = tmp_path / "checkpoints"
    for step in (8, 12, 16):
        fake_checkpoint(folder, step)
    (folder / "notes").mkdir()
    if latest is not None:
        (folder / "latest.json").write_text(latest if isinstance(latest, str) else json.dumps(latest))
    tags, problems, committed = checkpoints._candidates(folder)
    assert committed and tags[0] == first and all(checkpoints.TAG.fullmatch(t) for t in tags)
    # a save newer than the one latest.json names never finished: it is no candidate
    assert tags == (["step00000012", "step00000008"] if first == "step00000012" else
                    ["step00000016", "step00000012", "step00000008"])
    assert (problem is None and not problems) or problem in problems[0]


def test_nothing_saved_yet_is_a_fresh_start(tmp_path):
    folder = tmp_path / "checkpoints"
    assert checkpoints._candidates(folder) == ([], [], False)
    (folder / "step00000004").mkdir(parents=True)  # a first save killed before its record
    assert checkpoints._candidates(folder)[2] is False


def test_optimizer_betas_and_seed_are_checked():
    assert OptimizerConfig(betas=(0.0, 0.999)).betas == (0.0, 0.999)
    for betas in [(0.9, 1.0), (-0.1, 0.95), (1.5, 0.9)]:
        with pytest.raises(ValidationError, match=r"each must be in \[0, 1\)"):
            OptimizerConfig(betas=betas)
    with pytest.raises(ValidationError, match="seed"):
        TrainConfig(tokens=1 << 20, seed=-1)


def _engine(stage: int, seed: int):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunectl.train import deepspeed_config, lr_factor

    torch.manual_seed(seed)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    train, opt = TrainConfig(tokens=64, seq_len=8, global_batch=2, micro_batch=2, zero_stage=stage), OptimizerConfig()
    engine, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=net.parameters(), config=deepspeed_config(train, opt, 1, False),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, 8, opt)))
    return engine


def _step(engine, seed: int) -> float:
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def zero_roundtrip(stage: int, folder: str) -> None:
    """In a fresh process: train, save, resume into an engine initialised differently, and train on both."""
    from prunectl import distributed

    env = distributed.init()
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):  # every load a resume does, through whichever DeepSpeed path
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    torch.load = spy
    saved = _engine(stage, 0)
    _step(saved, 1), _step(saved, 2)
    checkpoints.save(saved, Path(folder), 2, 0, 2, env)
    resumed = _engine(stage, 7)
    assert checkpoints.resume(resumed, Path(folder), env) == (2, None, 1)
    assert seen and all(w is True for w in seen), seen
    # same weights, Adam moments and LR schedule: the next steps' losses agree bit for bit
    assert [_step(saved, s) for s in (3, 4, 5)] == [_step(resumed, s) for s in (3, 4, 5)]
    print("roundtrip ok", len(seen))


@pytest.mark.slow  # builds and steps DeepSpeed engines
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_checkpoints_load_weights_only(tmp_path, stage):
    code = f"from tests.test_checkpoints import zero_roundtrip; zero_roundtrip({stage}, {str(tmp_path / 'ckpt')!r})"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "DS_ACCELERATOR": "cpu"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "roundtrip ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


# ------------------------------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def interrupted(workspace, tmp_path_factory) -> dict:
    """A run that saved checkpoints at steps 8 and 12 (latest: 12), its final weights as the uninterrupted
    reference, then turned back into an interrupted run: failed, no final/."""
    runs = tmp_path_factory.mktemp("interrupted") / "runs"
    runs.mkdir()
    (runs / "test-data").symlink_to(workspace["runs"] / "test-data", target_is_directory=True)
    prunectl(*ARGS, env={**workspace["env"], "PRUNECTL_RUNS": str(runs)})
    run_dir = runs / "test-parent" / "v001"
    reference = load_file(str(run_dir / "final" / "model.safetensors"))
    assert checkpoints._tags(run_dir / "checkpoints") == ["step00000008", "step00000012"]
    shutil.rmtree(run_dir / "final")
    m = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**m, "status": "failed", "finished": None, "note": "killed"}))
    return {"run_dir": run_dir, "reference": reference}


@pytest.fixture()
def copy(interrupted, fresh_runs) -> dict:
    """The interrupted run in a runs root of this test's own."""
    run_dir = fresh_runs["runs"] / "test-parent" / "v001"
    shutil.copytree(interrupted["run_dir"], run_dir, symlinks=True)
    return {**fresh_runs, "run_dir": run_dir, "ckpt": run_dir / "checkpoints", "reference": interrupted["reference"]}


def _rerun_completes_like_uninterrupted(copy, resumed_at: int) -> str:
    """Rerun the command: it completes with the uninterrupted run's weights; the resume's note line (from rank
    0's log: completion replaces the manifest's note)."""
    out = prunectl(*ARGS, env=copy["env"])
    assert "resuming test-parent@v001" in out.stdout
    m = manifest(copy["runs"], "test-parent")
    assert m["status"] == "complete" and m["resumed_from"] == [resumed_at], m
    final = load_file(str(copy["run_dir"] / "final" / "model.safetensors"))
    assert final.keys() == copy["reference"].keys()
    differing = [k for k in final if not torch.equal(final[k], copy["reference"][k])]
    assert not differing, f"weights differ after resuming at step {resumed_at}: {differing[:3]}"
    logs = "".join(p.read_text() for p in (copy["run_dir"] / "logs").glob("**/*_0_log.out"))
    [note] = [line for line in logs.splitlines() if line.startswith("resumed at step")]
    assert note.startswith(f"resumed at step {resumed_at}")
    return note


@pytest.mark.slow  # a resumed pretrain job per attack
@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink"])
def test_a_crafted_latest_json_unpickles_nothing(copy, tmp_path, attack):
    marker = tmp_path / "pwned"
    evil = tmp_path / "outside" / "evil"
    evil.mkdir(parents=True)
    plant(evil / "mp_rank_00_model_states.pt", marker)
    record(evil, 99)
    tag = {"dotdot": os.path.relpath(evil, copy["ckpt"]), "absolute": str(evil), "symlink": "step00000099"}[attack]
    if attack == "symlink":
        (copy["ckpt"] / tag).symlink_to(evil, target_is_directory=True)
    (copy["ckpt"] / "latest.json").write_text(json.dumps({"tag": tag, "step": 99, "tokens": 0}))

    note = _rerun_completes_like_uninterrupted(copy, 12)  # from the genuine newest checkpoint
    assert not marker.exists()
    if attack == "symlink":
        assert note == ("resumed at step 12 (checkpoint step00000099 did not load: "
                        "it is not a directory inside checkpoints/)")
        assert not (copy["ckpt"] / "step00000099").is_symlink()
    else:
        assert note.startswith("resumed at step 12 (latest.json names ") and "not a checkpoint of this run" in note
    assert (evil / "mp_rank_00_model_states.pt").exists()  # what a symlink pointed at is never removed


@pytest.mark.slow  # a resumed pretrain job per damage
@pytest.mark.parametrize("damage", ["truncate", "delete", "planted"])
def test_a_damaged_newest_checkpoint_falls_back_and_ends_bit_identical(copy, tmp_path, damage):
    newest = copy["ckpt"] / "step00000012"
    marker = tmp_path / "pwned"
    if damage == "truncate":
        [shard] = newest.glob("zero_pp_rank_0_*optim_states.pt")
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif damage == "delete":
        shutil.rmtree(newest)
    else:  # the record agrees with the planted file: only the weights-only load stops it
        plant(newest / "mp_rank_00_model_states.pt", marker)
        record(newest, 12)
    note = _rerun_completes_like_uninterrupted(copy, 8)
    why = {"truncate": "has ", "delete": "it is missing", "planted": "UnpicklingError"}[damage]
    assert note.startswith("resumed at step 8 (checkpoint step00000012 did not load: ") and why in note, note
    assert not marker.exists()
    assert (newest / checkpoints.RECORD).is_file()  # the one that did not load was removed, then saved anew


@pytest.mark.slow  # a two-rank pretrain job, then its resume
def test_two_ranks_fall_back_together_when_one_cannot_load(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    args = [*ARGS, "launch.tasks_per_node=2", "launch.cpus_per_task=1"]
    prunectl(*args, env=env)
    run_dir = runs / "test-parent" / "v001"
    reference = load_file(str(run_dir / "final" / "model.safetensors"))
    shutil.rmtree(run_dir / "final")
    m = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**m, "status": "failed", "finished": None}))
    # rank 1's own partition, broken at the same size: only rank 1 finds out, when it deserializes it
    [shard] = (run_dir / "checkpoints" / "step00000012").glob("zero_pp_rank_1_*optim_states.pt")
    with open(shard, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(bytes(64))
    prunectl(*args, env=env)
    m = manifest(runs, "test-parent")
    assert m["status"] == "complete" and m["resumed_from"] == [8] and m["summary"]["world_size"] == 2
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert [k for k in reference if not torch.equal(reference[k], final[k])] == []
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("**/*_0_log.out"))
    assert "resumed at step 8 (checkpoint step00000012 did not load: it did not load on another rank)" in logs


@pytest.mark.slow  # two pretrain jobs that fail at their start
def test_no_checkpoint_loads_fails_the_run_in_one_line(copy):
    for tag in ("step00000008", "step00000012"):
        (copy["ckpt"] / tag / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    for _ in range(2):  # and again on a rerun: the same one line, never a bare AssertionError
        out = prunectl(*ARGS, env=copy["env"], check=False)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and out.stderr.startswith("error: test-parent@v001 failed: train: no ")
        m = manifest(copy["runs"], "test-parent")
        assert m["status"] == "failed" and "\n" not in m["note"]
        assert m["note"].startswith(f"train: no checkpoint in {copy['ckpt']} loads (checkpoint step00000012 did not ")
        assert m["note"].endswith("pass --new to start a new version")
        assert not (copy["run_dir"] / "final").exists()
    assert (copy["ckpt"] / "step00000008").is_dir()  # kept as they were: evidence, and --new starts elsewhere


@pytest.mark.slow  # a pretrain job that diverges
def test_a_diverging_loss_fails_the_run_and_publishes_nothing(fresh_runs):
    runs, env = fresh_runs["runs"], fresh_runs["env"]
    out = prunectl("pretrain", "test-parent", "train.tokens=16384", "optimizer.lr=1e20", "train.log_every=2",
                   "--executor", "local", env=env, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    m = manifest(runs, "test-parent")
    assert m["status"] == "failed" and re.match(r"train: the loss is (nan|inf) at step \d+; ", m["note"]), m["note"]
    assert m["note"].endswith("lower optimizer.lr (or raise warmup) and run again")
    assert not (runs / "test-parent" / "v001" / "final").exists()

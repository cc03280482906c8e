"""The memory preflight at the paper's shapes: a sparse 8B retrain on 64 H100s (80 GB), from the paper's recipes."""

from __future__ import annotations

from prunectl import launch, memory
from prunectl.model import Shape
from prunectl.recipe import resolve
from prunectl.stages.train import memory_problem

RETRAIN = "recipes/paper/retrain/wanda-50-r10b.yaml"


def _paper_shape() -> Shape:
    parent = resolve("recipes/paper/parent.yaml")
    return Shape.of_model(parent.model, 128_256)  # Llama-3.1-8B; a 50% sparse prune keeps every shape


def test_llama_3_1_8b_has_8b_parameters():
    assert 8.02e9 < _paper_shape().parameters() < 8.04e9


def test_a_sparse_retrain_at_zero2_without_checkpointing_is_refused_and_zero3_selective_fits():
    shape = _paper_shape()
    r = resolve(RETRAIN, ["train.zero_stage=2", "train.activation_checkpointing=none"])
    res = launch.resources(r.launch)
    assert (res.world, res.gpu_mem_gb) == (64, 80)
    line = memory.fit_problem(r.name, shape, r.train, res.world, True, True, res.gpu_mem_gb)
    assert line.startswith("memory: paper-wanda-50-r10b needs about ") and "per GPU, over the 90% of 80 GiB" in line
    assert line.endswith("try train.zero_stage=3 train.activation_checkpointing=selective")
    assert "\n" not in line
    fits = resolve(RETRAIN)  # the recipe as shipped: ZeRO-3, selective checkpointing
    assert (fits.train.zero_stage, fits.train.activation_checkpointing) == (3, "selective")
    assert memory.fit_problem(fits.name, shape, fits.train, res.world, True, True, res.gpu_mem_gb) is None
    parts = memory.estimate(shape, fits.train, 64, True, True)
    assert 30 * memory.GIB < memory.total(parts) < 60 * memory.GIB


def test_the_preflight_only_judges_gpu_jobs(tmp_path):
    r = resolve(RETRAIN, ["train.zero_stage=2", "train.activation_checkpointing=none"])
    cpu = launch.resources(r.launch).model_copy(update={"gpus_per_node": 0})
    assert memory_problem(tmp_path, r, cpu) == []


def test_paper_jobs_ask_for_what_they_use():
    def res(path: str):
        return launch.resources(resolve(path).launch)

    prune, eval_, compare = res("recipes/paper/prune/wanda-50.yaml"), res("recipes/paper/eval.yaml"), \
        res("recipes/paper/study.yaml")
    assert (prune.world, prune.gpus_per_node, prune.mem_gb) == (1, 1, 240)  # one GPU, not the node's eight
    assert (eval_.world, eval_.gpus_per_node) == (1, 1)
    assert (compare.gpus_per_node, compare.partition, compare.mem_gb) == (0, "cpu", 16)
    sheared = res("recipes/paper/prune/sheared-llama-50.yaml")
    assert (sheared.world, sheared.gpus_per_node) == (64, 8)  # mask learning trains like a parent

"""What runs on a rank: the distributed environment, and stopping together for preemption or requeue.

Submission (launch.py) never imports this; a job's ranks call `init()` first thing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int
    device: Any
    job_id: str | None
    slurm_job_id: str | None

    @property
    def writer(self) -> bool:
        """Rank 0 writes the run's manifest and files; the others compute."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init() -> RankEnv:
    """Export RANK/WORLD_SIZE/MASTER_* from the submitit job (Slurm or local) and start the process group."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's JIT-built ops, cached per environment: two checkouts on one machine do not rebuild each other's.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    job_id = slurm_job_id = None
    try:
        import submitit

        job_env = submitit.JobEnvironment()
        job_id = str(job_env.job_id)
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        if job_env.cluster != "slurm":
            dist_env.master_addr = "127.0.0.1"
        else:
            slurm_job_id = job_id
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
    except RuntimeError:  # not inside a submitit job: a plain process, single rank unless torchrun set it up
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    threads = int(os.environ.get("PRUNECTL_THREADS", "0"))
    if threads and not cuda:
        torch.set_num_threads(threads)
    import deepspeed

    local_rank = int(os.environ["LOCAL_RANK"])
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return RankEnv(
        rank=int(os.environ["RANK"]),
        world=int(os.environ["WORLD_SIZE"]),
        local_rank=local_rank,
        device=device,
        job_id=job_id,
        slurm_job_id=slurm_job_id,
    )


def allow_tf32(device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on a GPU (fp32 statistics, losses); nothing on a CPU."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


@contextmanager
def exact_fp32():
    """fp32 matmuls without TF32 inside the block (SparseGPT's reference code turns TF32 off: its column-by-column
    updates compound every rounding), whatever allow_tf32() set."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def rank() -> int:
    """This process's global rank in a submitit job (0 outside one), without starting a process group."""
    try:
        import submitit

        return submitit.JobEnvironment().global_rank
    except RuntimeError:
        return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StopRequest:
    """Preemption, time-limit (SIGUSR2 from Slurm/submitit) or SIGTERM: finish the step, save, leave."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum


def agree(local: bool, env: RankEnv) -> bool:
    """All ranks stop at the same step if any one of them was signalled."""
    if env.world == 1:
        return local
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local else 0.0], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def leave_for_requeue(run, env: RankEnv, step: int, signum: int | None) -> None:
    """After the checkpoint: requeue on Slurm preemption/time limit, otherwise stop resumably."""
    from . import lifecycle

    requeue = signum == signal.SIGUSR2 and env.slurm_job_id is not None
    if env.writer:
        if requeue:
            run.update(status="pending", note=f"preempted at step {step}; requeued, resumes from its checkpoint")
            subprocess.run(["scontrol", "requeue", env.slurm_job_id], check=False)
        else:
            name = signal.Signals(signum).name if signum else "signal"
            lifecycle.fail(run, f"stopped by {name} at step {step}; run the same command again to resume")
    # SystemExit is not an Exception: submitit writes no result, so the job is not seen as finished.
    sys.exit(3)

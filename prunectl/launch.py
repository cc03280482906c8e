"""Submission: submitit executors (slurm | local | debug), Slurm profiles, job arrays, dependencies and job states.

The launcher runs callables and knows no stage: what a job does is the callable it is handed
(stages/__init__.py builds them). What runs on a rank once the job starts is in distributed.py.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, Field

from .errors import PrunectlError
from .schema import Strict

Executor = Literal["slurm", "local", "debug"]
PROFILES_ENV = "PRUNECTL_SLURM_PROFILES"


class LaunchConfig(Strict):
    """Where and how big a job runs. Unset keys come from the Slurm profile, then the defaults."""

    profile: str = Field("local", description="slurm/profiles/<profile>.yaml")
    nodes: int | None = Field(None, ge=1)
    tasks_per_node: int | None = Field(None, ge=1, description="ranks per node (one per GPU on a GPU node)")
    cpus_per_task: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    gpu_mem_gb: int | None = Field(None, ge=1, description="memory of one GPU: the training preflight's limit")
    mem_gb: int | None = Field(None, ge=1)
    time_min: int | None = Field(None, ge=1)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] | None = Field(None, description="shell lines run before the job (module load, ...)")
    array_parallelism: int | None = Field(None, ge=1)


class Resources(BaseModel):
    """A fully resolved LaunchConfig."""

    profile: str
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    gpu_mem_gb: int | None = None
    mem_gb: int | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = Field(default_factory=list)
    array_parallelism: int = 64

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node


def profile_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return dirs + [Path("slurm/profiles"), Path(__file__).resolve().parent.parent / "slurm" / "profiles"]


def load_profile(name: str) -> dict[str, Any]:
    for folder in profile_dirs():
        path = folder / f"{name}.yaml"
        if path.is_file():
            raw = yaml.safe_load(path.read_text()) or {}
            try:
                return LaunchConfig.model_validate({**raw, "profile": name}).model_dump(exclude_none=True)
            except Exception as err:
                raise PrunectlError(f"{path}: invalid Slurm profile: {err}".splitlines()[0]) from None
    known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise PrunectlError(f"launch.profile: no Slurm profile '{name}'; known: {', '.join(known) or 'none'}")


def resources(config: LaunchConfig, profile: str | None = None) -> Resources:
    """Defaults < profile < recipe's launch section (the recipe is the more specific)."""
    name = profile or config.profile
    merged = {**load_profile(name), **config.model_dump(exclude_none=True, exclude={"profile"}), "profile": name}
    return Resources.model_validate(merged)


@dataclass
class Raised:
    """A debug job's exception, returned instead of raised: submitit's debug executor would open pdb."""

    error: BaseException


@dataclass
class Threaded:
    """What submitit pickles and runs on every rank: a callable, with the job's CPU threads exported first."""

    fn: Callable[[], Any]
    threads: int
    in_process: bool = False  # the debug executor: hand an exception back, never to pdb

    def __call__(self) -> Any:
        from .model import allow_explicit_head_dim

        os.environ.setdefault("PRUNECTL_THREADS", str(self.threads))
        allow_explicit_head_dim()  # jobs read and write pruned Llama shapes that transformers 5.x refuses
        if not self.in_process:
            return self.fn()
        try:
            return self.fn()
        except Exception as err:
            return Raised(err)


def make_executor(kind: Executor, folder: Path, res: Resources, name: str, dependency: str | None = None):
    import submitit

    if kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=20)
        params: dict[str, Any] = dict(
            job_name=name,
            nodes=res.nodes,
            ntasks_per_node=res.tasks_per_node,
            cpus_per_task=res.cpus_per_task,
            time=res.time_min,
            setup=res.setup,
            array_parallelism=res.array_parallelism,
            signal_delay_s=90,
        )
        if dependency:  # a study's later stages: start once their inputs' jobs have ended, then check them
            params["dependency"] = dependency
            if dependency.startswith("afterok"):  # a failed predecessor cancels the job instead of leaving it pending
                params["additional_parameters"] = {"kill-on-invalid-dep": "yes"}
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        if res.mem_gb:
            params["mem"] = f"{res.mem_gb}GB"
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(res, key):
                params[key] = getattr(res, key)
        ex.update_parameters(**params)
        return ex
    if kind == "local":
        if res.nodes > 1:
            raise PrunectlError("--executor local runs on one machine; set launch.nodes=1 or use --executor slurm")
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(tasks_per_node=res.tasks_per_node, timeout_min=res.time_min, gpus_per_node=res.gpus_per_node)
        return ex
    if res.world > 1:
        raise PrunectlError("--executor debug runs one rank in this process; set launch.tasks_per_node=1 or use local")
    return submitit.DebugExecutor(folder=folder)


def array_folder(run_dirs: list[Path]) -> Path:
    """Where one job's logs go (its run's logs/), or an array's (beside the runs, named by the first and last)."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "logs"
    return run_dirs[0].parent / "arrays" / f"{run_dirs[0].name}-{run_dirs[-1].name}"


def submit(kind: Executor, res: Resources, name: str, calls: list[Callable[[], Any]], folder: Path,
           dependency: str | None = None, link_logs: list[Path] = ()) -> list:
    """One job per callable; several go out as one job array sharing `folder`. For an array, each run
    directory in `link_logs` gets logs/array pointing at the array's folder."""
    _SQUEUE["at"] = -1.0  # a listing taken before these jobs existed would call them gone
    jobs_of = [Threaded(call, res.cpus_per_task, kind == "debug") for call in calls]
    ex = make_executor(kind, folder, res, name, dependency)
    if len(jobs_of) == 1:
        with _sigint_ignored(kind == "local"):
            return [ex.submit(jobs_of[0])]
    if kind == "local":
        # No scheduler here: run as many at once as the cores hold, so threads never oversubscribe them.
        at_once = max(1, (os.cpu_count() or 1) // (res.cpus_per_task * res.tasks_per_node))
        jobs = []
        for i in range(0, len(jobs_of), at_once):
            with _sigint_ignored(True):
                wave = [ex.submit(job) for job in jobs_of[i : i + at_once]]
            for job in wave:
                job.wait()
            jobs += wave
    else:
        with ex.batch():
            jobs = [ex.submit(job) for job in jobs_of]
    for d in link_logs:  # each run's logs/ still leads to its logs
        (d / "logs").mkdir(exist_ok=True)
        link = d / "logs" / "array"
        if link.is_symlink():  # resubmitted: point at the newest array
            link.unlink()
        link.symlink_to(folder.resolve(), target_is_directory=True)
    return jobs


class _sigint_ignored:
    """Local jobs start with SIGINT ignored (inherited through exec): a Ctrl-C at the terminal reaches the
    whole process group, and submitit's local controller would kill the ranks within a second. The
    CLI catches it instead and asks the ranks to stop cleanly (`stop_local`)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def stop_local(jobs: list) -> int:
    """Ask local jobs to stop: SIGTERM to submitit's controller, which passes it to every rank; a training
    rank saves a checkpoint and leaves resumably. Returns how many jobs were still running."""
    alive = 0
    for job in jobs:
        process = getattr(job, "_process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            alive += 1
    return alive


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failed|Owned)\b.*")


def last_words(job) -> str:
    """Why a job ended, in one line: a debug job's exception, else the last exception line of rank 0's
    stderr log, with the log's path."""
    result = getattr(getattr(job, "_submission", None), "_result", None)
    if isinstance(result, Raised):
        return f"{type(result.error).__name__}: {result.error}".splitlines()[0]
    try:
        path = job.paths.stderr
        lines = path.read_text(errors="replace").splitlines()
    except (AttributeError, OSError):
        return "no log was written"
    found = [line.strip() for line in lines if _EXCEPTION_LINE.match(line.strip())]
    return (found[-1][:300] + "; " if found else "no error in its log (killed?); ") + f"log: {path}"


def batch_script(folder: Path, res: Resources, name: str, dependency: str | None = None, tasks: int | None = None) -> str:
    """The sbatch script submitit would submit (for --dry-run), without touching the cluster; `tasks`: an array's."""
    from submitit.slurm import slurm

    ex = make_executor("slurm", folder, res, name, dependency)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return slurm._make_sbatch_string(command=command, folder=folder, map_count=tasks, **ex.parameters)


class SlurmUnreachable(PrunectlError):
    """squeue gave no answer: the jobs' states are unknown, which is not the same as gone."""


_SQUEUE: dict[str, Any] = {"at": -1.0, "states": {}, "error": None}


def slurm_state(job_id: str) -> str | None:
    """The job's state from squeue, or None once Slurm has forgotten it; SlurmUnreachable if squeue fails.

    One `squeue` listing of this user's jobs (array tasks one per line) serves every lookup for a second,
    so following a study of hundreds of jobs costs one scheduler query per poll, not one per job. A
    failure is kept for 30 s, so a status listing waits for a dead controller once, not once per job."""
    now = time.monotonic()
    if now - _SQUEUE["at"] > (30.0 if _SQUEUE["error"] else 1.0):
        _SQUEUE.update(at=time.monotonic(), **_squeue())
    if _SQUEUE["error"]:
        raise SlurmUnreachable(_SQUEUE["error"])
    return _SQUEUE["states"].get(str(job_id))


def squeue_error() -> str | None:
    """Why the last squeue call failed, if it did."""
    return _SQUEUE["error"]


def _squeue() -> dict[str, Any]:
    import getpass

    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i %T"],
                             capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        why = "squeue is not installed here (run prunectl on the cluster's login node)"
    except subprocess.TimeoutExpired:
        why = "squeue did not answer in 10 s"
    except OSError as e:
        why = f"squeue: {e}"
    else:
        if out.returncode == 0:
            lines = (line.split() for line in out.stdout.splitlines())
            return {"states": dict(f[:2] for f in lines if len(f) >= 2), "error": None}
        why = f"squeue: {(out.stderr.strip().splitlines() or [f'exit code {out.returncode}'])[-1]}"
    return {"states": {}, "error": f"cannot read Slurm job states, {why}; is the controller up? "
                                   "(for the local test cluster: make slurm-up)"}


def job_alive(manifest) -> bool:
    """A run's job still queued or running: Slurm's word for Slurm jobs, the process table for local ones."""
    if manifest.executor == "slurm" and manifest.job_ids:
        return slurm_state(manifest.job_ids[-1]) is not None
    if manifest.status not in ("running", "pending"):
        return False
    # a local job's id is the pid of submitit's controller, alive from submission to the job's end
    local = [int(j) for j in manifest.job_ids[-1:] if manifest.executor == "local" and j.isdigit()]
    return any(pid_alive(pid, manifest.host) for pid in [*local, manifest.pid])


def job_over(job, on_unknown: Callable[[str], None] = lambda why: None) -> bool:
    """Local jobs: submitit knows. Slurm jobs: the result file, else squeue (submitit's done() polls sacct,
    which clusters without accounting answer with an error on stderr, and it waits forever for the result
    file of a cancelled job). While Slurm does not answer, a job is not over: `on_unknown` hears why."""
    if type(job).__name__ != "SlurmJob":
        return job.done()
    if job.paths.result_pickle.exists():
        return True
    try:
        for _ in range(3):  # a requeued job is briefly absent between its two lives
            if slurm_state(str(job.job_id)) is not None:
                return False
            time.sleep(2)
    except SlurmUnreachable as e:
        on_unknown(str(e))
        return False
    return True


def pid_alive(pid: int | None, host: str | None) -> bool:
    """A live process on this host (a zombie left by a killed parent counts as dead)."""
    if not pid or host != socket.gethostname():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")

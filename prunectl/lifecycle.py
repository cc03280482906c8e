"""A run's life, in one place: pending -> running -> complete, or failed with a one-line note.

Every stage goes through `running()`: it records who runs the run (job, pid, host), and any error
that escapes the body marks the run failed with one line before it propagates. SystemExit passes
untouched: it is how a preempted rank leaves for requeue, after writing its own state.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

from . import store
from .errors import PrunectlError


def one_line(err: BaseException | str) -> str:
    """What a failed run's note says: a user error's problems, else the exception's first line."""
    if isinstance(err, str):
        text = err
    elif isinstance(err, PrunectlError):
        text = "; ".join(err.problems)
    else:
        text = f"{type(err).__name__}: {err}"
    return (text.splitlines() or [""])[0][:500]


def fail(run: store.Run, err: BaseException | str) -> store.Manifest:
    return run.update(status="failed", finished=store.now(), note=one_line(err))


def complete(run: store.Run, summary: dict[str, Any] | None = None, note: str | None = None,
             **changes: Any) -> store.Manifest:
    """Durably: every file of the run is fsynced before the manifest says complete."""
    if summary is not None:
        changes["summary"] = summary
    return store.mark_complete(run, note=note, **changes)


def started(run: store.Run, job_id: str | None = None, **changes: Any) -> store.Manifest:
    manifest = run.manifest()
    job_ids = list(manifest.job_ids)
    if job_id and job_id not in job_ids:
        job_ids.append(job_id)
    return run.update(status="running", started=manifest.started or store.now(), job_ids=job_ids, pid=os.getpid(),
                      host=os.uname().nodename, **changes)


@contextmanager
def running(run: store.Run, job_id: str | None = None, writer: bool = True, **changes: Any) -> Iterator[None]:
    """Mark the run running (if `writer`: rank 0 of a job), and failed if the body raises."""
    if writer:
        started(run, job_id, **changes)
    try:
        yield
    except SystemExit:
        raise
    except BaseException as err:
        if writer:
            fail(run, err)
        raise

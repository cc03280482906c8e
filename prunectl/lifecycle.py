"""A run's life, in one place: pending -> running -> complete, or failed with a one-line note.

Every stage goes through `running()`: it records who runs the run (job, pid, host), holds the run's
owner lock for as long as it writes there, and any error that escapes the body marks the run failed
with one line before it propagates. SystemExit passes untouched: it is how a preempted rank leaves
for requeue, after writing its own state.

Publication cannot get stuck: `publish()` records the summary, renames the staging directory to
final/ (with a list of its files) and only then marks the run complete; a job killed between the two
leaves a run that `published()` verifies and `complete_published()` completes on the next submission, without redoing it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
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


OWNER_LOCK = ".owner.lock"
SUBMIT_LOCK = ".submit.lock"


class Owned(PrunectlError):
    """Another live process writes this run: this one must leave it untouched."""


def owner_alive(run: store.Run) -> bool:
    """Some process holds the run's owner lock right now (a job running in it)."""
    if not run.dir.is_dir():
        return False
    with store.file_lock(run.dir / OWNER_LOCK, wait=False) as got:
        return not got


@contextmanager
def claim(run: store.Run) -> Iterator[None]:
    """Held by a command while it decides to resume `run` and submits its job: two commands never both do."""
    with store.file_lock(run.dir / SUBMIT_LOCK, wait=False) as got:
        if not got:
            raise PrunectlError(f"{run.ref}: another command is resubmitting it right now; wait for it and check "
                                "`prunectl status`, or pass --new for a separate version")
        yield


@contextmanager
def running(run: store.Run, job_id: str | None = None, writer: bool = True, **changes: Any) -> Iterator[None]:
    """Own the run and mark it running (if `writer`: rank 0 of a job), and failed if the body raises."""
    with ExitStack() as stack:
        if writer:
            if not stack.enter_context(store.file_lock(run.dir / OWNER_LOCK, wait=False)):
                raise Owned(f"{run.ref}: another job is running in this directory (pid/job in manifest.json); "
                            "this one leaves it untouched")
            started(run, job_id, **changes)
        try:
            yield
        except SystemExit:
            raise
        except BaseException as err:
            if writer:
                try:
                    fail(run, err)
                except OSError:  # disk full: the CLI marks the run failed once the job has ended
                    pass
            raise


def publish(run: store.Run, staging: Path, summary: dict[str, Any] | None = None, note: str | None = None) -> None:
    """staging -> final/, then complete. The summary is recorded first, so a kill in between loses nothing."""
    if summary is not None:
        run.update(summary=summary)
    if run.final.exists():  # a final/ that did not verify: redone
        shutil.rmtree(run.final)
    store.publish_dir(staging, run.final)
    complete(run, note=note)


def published(run: store.Run) -> bool:
    """A previous job published final/ intact but died before marking the run complete (read-only, so
    every rank can ask). A damaged final/ is not published: `publish()` replaces it."""
    return run.final.exists() and store.verify_published(run.final) is None


def complete_published(run: store.Run) -> store.Manifest:
    return complete(run, note="completed on resubmission: its final/ was published before the previous job ended")

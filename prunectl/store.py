"""Versioned run directories: allocate, manifest, publish, resolve name@version.

runs/<recipe-name>/vNNN/ is complete only when its manifest says so, and the manifest
says so only after everything else in the directory has been fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import PrunectlError

RUNS_ENV = "PRUNECTL_RUNS"
SCHEMA_VERSION = 1
Status = Literal["pending", "running", "complete", "failed"]
_VERSION_DIR = re.compile(r"^v(\d{3,})$")
# A run name is one path component that a reference (name@vNNN) can name: no separators, no '@', not '.' or '..'.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
NAME = re.compile(rf"^{NAME_PATTERN}$")
NAME_RULE = "1-128 letters, digits, '.', '_', '+' or '-', starting with a letter or digit (no '/', '@', spaces)"
_PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "submitit", "tokenizers", "lm_eval", "numpy")


class TokenInterval(BaseModel):
    """Tokens [start, end) of the prepared token stream, in range `range`."""

    range: str
    start: int
    end: int


class DataUse(BaseModel):
    """Exactly which tokens a training run consumed, and in what order they were drawn."""

    data: str  # name@vNNN of the prepared data
    ranges: list[str]
    seq_len: int
    sequences: int
    tokens: int
    budget_tokens: int
    epochs: float
    seed: int
    intervals: list[TokenInterval]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    name: str
    version: int
    stage: str
    status: Status = "pending"
    inputs: dict[str, str] = Field(default_factory=dict)
    data: DataUse | None = None
    executor: str | None = None
    job_ids: list[str] = Field(default_factory=list)
    pid: int | None = None
    host: str = Field(default_factory=socket.gethostname)
    code_version: str = Field(default_factory=lambda: code_version())
    packages: dict[str, str] = Field(default_factory=lambda: package_versions())
    created: str = Field(default_factory=lambda: now())
    started: str | None = None
    finished: str | None = None
    note: str | None = None
    resumed_from: list[int] = Field(default_factory=list, description="steps at which the run resumed")
    resumed_world: list[tuple[int, int, int]] = Field(
        default_factory=list,
        description="one (step, ranks that saved the checkpoint, ranks that resumed from it) per resume")
    summary: dict[str, Any] = Field(default_factory=dict)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_name(name: str, what: str = "name") -> str:
    """A run name that stays one directory inside the runs root, or one line saying why not."""
    if not isinstance(name, str) or not NAME.match(name):
        raise PrunectlError(f"{what}: {name!r} is not a run name; a run name is {NAME_RULE}")
    return name


def parse_ref(ref: str) -> tuple[str, str]:
    """`name`, `name@latest` or `name@vNNN` -> (name, version text); refused unless the name is a run name."""
    name, _, version = str(ref).partition("@")
    if not NAME.match(name):
        raise PrunectlError(f"{ref}: not a run reference; give name, name@latest or name@vNNN, where a name is {NAME_RULE}")
    if version not in ("", "latest") and not _VERSION_DIR.match(version):
        raise PrunectlError(f"{ref}: a version is @latest or @vNNN, e.g. {name}@v001")
    return name, version


def runs_root(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit or os.environ.get(RUNS_ENV) or "runs").absolute()


@dataclass(frozen=True)
class Run:
    root: Path
    name: str
    version: int

    @classmethod
    def at(cls, run_dir: Path) -> Run:
        """The run whose directory is runs/<name>/vNNN, complete or not."""
        run_dir = Path(run_dir)
        return cls(run_dir.parent.parent, run_dir.parent.name, int(run_dir.name[1:]))

    @classmethod
    def of(cls, root: Path, ref: str) -> Run:
        """name@vNNN as a Run, complete or not (resolve() insists on complete)."""
        name, version = parse_ref(ref)
        if not _VERSION_DIR.match(version):
            raise PrunectlError(f"{ref}: give an exact version, name@vNNN")
        return cls(root, name, int(version[1:]))

    @property
    def dir(self) -> Path:
        return self.root / self.name / f"v{self.version:03d}"

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version:03d}"

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def final(self) -> Path:
        return self.dir / "final"

    def manifest(self) -> Manifest | None:
        try:
            return Manifest.model_validate_json(self.manifest_path.read_text())
        except FileNotFoundError:
            return None

    def write_manifest(self, manifest: Manifest) -> None:
        write_atomic(self.manifest_path, manifest.model_dump_json(indent=2))

    def update(self, **changes: Any) -> Manifest:
        """Read, change, write: under a lock, so the submitter and the job never lose each other's changes."""
        with file_lock(self.dir / ".manifest.lock"):
            manifest = self.manifest()
            if manifest is None:
                raise PrunectlError(f"{self.ref}: manifest.json is missing; the run directory is damaged")
            manifest = manifest.model_copy(update=changes)
            self.write_manifest(manifest)
            return manifest

    def same_as(self, other: Run) -> bool:
        """One run under two spellings (a symlinked name, another version alias): compare where it really is."""
        return self.dir.resolve() == other.dir.resolve()

    def is_complete(self) -> bool:
        manifest = self.manifest()
        return manifest is not None and manifest.status == "complete"


def versions(root: Path, name: str) -> list[Run]:
    folder = root / name
    if not folder.is_dir():
        return []
    found = [int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_DIR.match(p.name))]
    return [Run(root, name, v) for v in sorted(found)]


def run_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and versions(root, p.name))


def allocate(root: Path, name: str) -> Run:
    """A fresh version directory; mkdir is the lock, so concurrent array tasks never collide."""
    check_name(name)
    (root / name).mkdir(parents=True, exist_ok=True)
    while True:
        existing = versions(root, name)
        version = (existing[-1].version if existing else 0) + 1
        run = Run(root, name, version)
        try:
            run.dir.mkdir()
        except FileExistsError:
            continue
        return run


def resolve(root: Path, ref: str) -> Run:
    """`name`, `name@latest` (newest complete) or `name@vNNN` (must be complete)."""
    name, version = parse_ref(ref)
    runs = versions(root, name)
    if not runs:
        raise PrunectlError(f"{ref}: no runs named '{name}' under {root}")
    if version in ("", "latest"):
        complete = [r for r in runs if r.is_complete()]
        if not complete:
            raise PrunectlError(f"{ref}: '{name}' has no complete version under {root} ({len(runs)} incomplete)")
        return complete[-1]
    run = Run(root, name, int(version[1:]))
    if run not in runs:
        raise PrunectlError(f"{ref}: no such version under {root / name}")
    manifest = run.manifest()
    if manifest is None or manifest.status != "complete":
        status = manifest.status if manifest else "without a manifest"
        raise PrunectlError(f"{ref}: is {status}, not complete; use a complete version or @latest")
    return run


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a torn one, even after a power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; run files are shared like any other file
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def file_mode() -> int:
    """What open() would give a new file: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path`: the kernel drops it when the holder dies, kill -9 included.
    With wait=False, yields False at once when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


FILES = ".files.json"


def publish_dir(staging: Path, final: Path) -> None:
    """Make a fully written staging directory visible under its final name, durably, with a list of
    its files and sizes that `verify_published` checks."""
    files = [p for p in sorted(staging.rglob("*")) if p.is_file() and not p.is_symlink()]
    for path in files:  # some writers (safetensors) create 0600 files: every run file gets the umask's mode
        path.chmod(file_mode())
    sizes = {str(p.relative_to(staging)): p.stat().st_size for p in files}
    write_json(staging / FILES, sizes)
    fsync_tree(staging)
    if final.exists():
        raise PrunectlError(f"{final}: already exists; refusing to overwrite a published directory")
    os.replace(staging, final)
    fsync_dir(final.parent)


def verify_published(final: Path) -> str | None:
    """None when `final` holds every file publish_dir listed, at its size; else what is wrong."""
    try:
        sizes = json.loads((final / FILES).read_text())
    except (OSError, ValueError) as err:
        return f"{final / FILES}: {type(err).__name__}"
    for name, size in sizes.items():
        path = final / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{path}: missing or not {size} bytes"
    return None


def mark_complete(run: Run, **changes: Any) -> Manifest:
    fsync_tree(run.dir)
    return run.update(status="complete", finished=now(), **changes)


def code_version() -> str:
    """git describe of the prunectl checkout (with -dirty), or the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from . import __version__

        return __version__


def package_versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return found

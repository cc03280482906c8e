"""Versioned run directories: allocate, manifest, publish, resolve name@version.

runs/<recipe-name>/vNNN/ is complete only when its manifest says so, and the manifest
says so only after everything else in the directory has been fsynced.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import PrunectlError

RUNS_ENV = "PRUNECTL_RUNS"
SCHEMA_VERSION = 1
Status = Literal["pending", "running", "complete", "failed"]
_VERSION_DIR = re.compile(r"^v(\d{3,})$")
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
    summary: dict[str, Any] = Field(default_factory=dict)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        name, _, version = ref.partition("@")
        return cls(root, name, int(version.removeprefix("v")))

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
        manifest = self.manifest()
        if manifest is None:
            raise PrunectlError(f"{self.ref}: manifest.json is missing; the run directory is damaged")
        manifest = manifest.model_copy(update=changes)
        self.write_manifest(manifest)
        return manifest

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
    name, _, version = ref.partition("@")
    runs = versions(root, name)
    if not runs:
        raise PrunectlError(f"{ref}: no runs named '{name}' under {root}")
    if version in ("", "latest"):
        complete = [r for r in runs if r.is_complete()]
        if not complete:
            raise PrunectlError(f"{ref}: '{name}' has no complete version under {root} ({len(runs)} incomplete)")
        return complete[-1]
    match = _VERSION_DIR.match(version)
    if not match:
        raise PrunectlError(f"{ref}: a version is @latest or @vNNN, e.g. {name}@v001")
    run = Run(root, name, int(match.group(1)))
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
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


def publish_dir(staging: Path, final: Path) -> None:
    """Make a fully written staging directory visible under its final name, durably."""
    fsync_tree(staging)
    if final.exists():
        raise PrunectlError(f"{final}: already exists; refusing to overwrite a published directory")
    os.replace(staging, final)
    fsync_dir(final.parent)


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

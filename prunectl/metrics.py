"""metrics.jsonl: one JSON record per line, the one shape every stage writes and `--wait` reads.

A record always has `step`. Training records add `tokens` and the logged values; a phase of a
non-training stage (prune) adds `phase` and `event` (start | end) and, at the end, its seconds and
peak memory, with `step` counting the phases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends records; resuming at `keep_through` drops records a killed run wrote past its checkpoint."""

    def __init__(self, path: Path, keep_through: int | None = None) -> None:
        self.path = Path(path)
        if keep_through is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_through]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.handle = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def read(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def progress(path: Path, last: int = 3) -> dict[str, Any] | None:
    """The newest step and a one-line description of the run's last records (None before the first)."""
    path = Path(path)
    if not path.exists():
        return None
    lines = path.read_text().splitlines()[-last:]
    newest = {k: v for line in lines if line for k, v in json.loads(line).items()}
    if not newest:
        return None
    if "phase" in newest:
        info = f"{newest['phase']} ({newest['event']})"
    else:
        info = "  ".join(f"{k} {newest[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if newest.get(k) is not None)
    return {"step": newest.get("step", 0), "info": info}

"""What `prunectl status` shows, as plain rows (the CLI renders them as a table or prints them as JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pydantic import ValidationError

from . import launch, lifecycle, store
from .artifacts import StudyNode, summary_of
from .study import node_state


def run_rows(root: Path, names: list[str]) -> tuple[list[dict[str, Any]], str | None]:
    """One row per version of each name; and why Slurm did not answer, if it did not."""
    rows, unreachable = [], None
    for name in names:
        for run in store.versions(root, name):
            try:
                m = run.manifest()
            except (OSError, ValueError, ValidationError) as err:  # unreadable or damaged: say so, list the rest
                rows.append(_placeholder(run, "damaged", f"manifest.json: {type(err).__name__}"))
                continue
            if m is None:
                rows.append(_placeholder(run, "allocating", "no manifest yet"))
                continue
            job = m.job_ids[-1] if m.job_ids else ""
            state, slurm, owner = m.status, None, ""
            try:
                slurm = launch.slurm_state(job) if job and m.executor == "slurm" else None
                if state in ("running", "pending"):
                    alive = launch.job_alive(m) or lifecycle.owner_alive(run)
                    owner = f"job {job or '?'} ({m.executor}, pid {m.pid} on {m.host})" if alive else ""
                    state = state if alive else f"{state} (lost)"
            except launch.SlurmUnreachable as e:
                slurm, unreachable = "unknown", str(e)
            rows.append({"run": run.ref, "stage": m.stage, "status": m.status, "state": state, "job": job, "slurm": slurm,
                         "owner": owner, "tokens": m.data.tokens if m.data else m.summary.get("tokens"),
                         "epochs": m.data.epochs if m.data else None,
                         "lr": _lr(run, m), "created": m.created, "note": m.note})
    return rows, unreachable


def _placeholder(run: store.Run, state: str, note: str) -> dict[str, Any]:
    return {"run": run.ref, "stage": "?", "status": state, "state": state, "job": "", "slurm": None, "owner": "",
            "tokens": None, "epochs": None, "lr": "", "created": None, "note": note}


def _lr(run: store.Run, m: store.Manifest) -> str:
    """A training run's peak LR: 'by sweep' when a sweep chose it, the prefix loss for a sweep's own runs."""
    if m.stage not in ("pretrain", "retrain"):
        return ""
    sweep = getattr(m, "lr_sweep", None)
    if sweep:
        return f"{sweep['chosen_lr']:g} (by sweep)"
    try:
        lr = yaml.safe_load((run.dir / "recipe.yaml").read_text())["optimizer"]["lr"]
    except (OSError, KeyError, TypeError):
        return ""
    s = summary_of(m).model_dump()
    loss = s.get("final_train_loss")
    return f"{lr:g} (prefix loss {loss:.4f})" if s.get("steps") and run.name.endswith("-lrsweep") and loss else f"{lr:g}"


def graph_rows(root: Path, nodes: list[StudyNode], live: bool) -> list[dict[str, Any]]:
    """A study's nodes with their state now (live) or as planned."""
    rows = []
    for n in nodes:
        state, note = node_state(root, n) if live else (n.state, "")
        after = ", ".join(d.split("/", 1)[1] for d in n.deps) if len(n.deps) <= 2 else f"{len(n.deps)} runs"
        label = {"eval": f"eval of {n.ref}", "sweep": f"{n.ref} {n.key.rsplit('/', 1)[-1]}"}.get(n.group, n.ref)
        rows.append({"group": n.group, "label": label, "ref": n.ref, "state": state, "job": n.job, "after": after,
                     "note": note})
    return rows


def state_counts(root: Path, nodes: list[StudyNode]) -> str:
    """'3 complete, 2 running, ...' over a study's nodes now."""
    states = [node_state(root, n)[0].split()[0] for n in nodes]
    return ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))

"""A whole study in one submission: data -> parent -> prune (methods x ratios) -> retrain and scratch twins -> eval
-> compare.

The study resolves every stage's recipe with its inputs pinned to the exact versions the study
allocates (`init=<prune run>@v003`, ...), so each node knows what it will read before anything
runs. On Slurm every group goes out as one job array that depends (afterany) on the jobs of its
inputs; a node whose inputs did not complete fails at its start with a note naming them, and the
rest of the study goes on. With the local executor the groups run one after another here.
Runs whose exact recipe already completed are reused; interrupted ones resume; failed ones are
submitted again. `graph.json` in the study's run directory records the graph for `prunectl status`.
A data node is a data run's three phases (a tokenizer job, an array of tokenize tasks, a finalize job, chained
afterok); the nodes that read its ranges wait on its finalize job.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import distributed, launch, lifecycle, memory, store
from . import recipe as recipes
from .artifacts import StudyGraph
from .artifacts import StudyNode as Node
from .errors import PrunectlError
from .evaluate.config import results_path
from .launch import job_alive
from .stages import STAGES, compare, train
from .stages import eval as eval_
from .sweep import prefix_overrides

GROUPS = ("data", "parent", "prune", "sweep", "retrain", "scratch", "eval", "compare")


def run_dir(root: Path, ref: str) -> Path:
    """The directory of name@vNNN, complete or not (the `vNNN` placeholder of a dry run too)."""
    name, _, version = ref.partition("@")
    return root / name / version


def recipe_path(study_file: Path, ref: str) -> str:
    """A study's entries are paths relative to the study file, or recipe names."""
    candidate = study_file.parent / ref
    return str(candidate) if candidate.suffix in (".yaml", ".yml") and candidate.is_file() else ref


class Planner:
    """Builds the graph. Dry: placeholders (`name@vNNN`) for new runs. Otherwise new runs are allocated
    (recipe.yaml and a pending manifest) as they are planned, so later nodes can pin them."""

    def __init__(self, root: Path, study_file: Path, study, dry_run: bool, executor: str):
        self.root, self.study_file, self.study, self.dry_run, self.executor = root, study_file, study, dry_run, executor
        self.nodes: list[Node] = []
        self.names: dict[str, str] = {}  # run name -> the version this study pins
        self.fresh: list[store.Run] = []

    def path(self, ref: str) -> str:
        return recipe_path(self.study_file, ref)

    def build(self) -> list[Node]:
        study = self.study
        for entry in study.data:
            self.add_data(self.path(entry))
        parent = self.add("parent", "pretrain", self.path(study.parent), [("data", None)], [])
        trained = [parent]
        for method in study.methods:
            pruned = self.add("prune", "prune", self.path(method.prune),
                              [("parent", parent.ref), ("data", None), ("calibration.data", None)], [parent.key])
            for ref in method.retrain:
                trained.append(self.add("retrain", "retrain", self.path(ref), [("init", pruned.ref), ("data", None)],
                                        [pruned.key]))
            for ref in [*method.scratch, *([method.total] if method.total else [])]:
                trained.append(self.add("scratch", "pretrain", self.path(ref), [("like", pruned.ref), ("data", None)],
                                        [pruned.key]))
        ev = recipes.resolve(self.path(study.eval))
        if ev.stage != "eval":
            raise PrunectlError(f"eval: {study.eval} is a {ev.stage} recipe; a study's eval is an eval recipe")
        for target in trained:
            node = Node(key=f"eval/{target.name}", group="eval", stage="eval", source=self.path(study.eval),
                        overrides=[f"run={target.ref}"], deps=[target.key], ref=target.ref)
            if not target.ref.endswith("@vNNN"):
                node.results = str(results_path(run_dir(self.root, target.ref), ev.eval))
            node.state = "reused" if node.results and Path(node.results).exists() else \
                ("planned" if self.dry_run else "new")
            self.nodes.append(node)
        last = Node(key=f"compare/{study.name}-compare", group="compare", stage="compare", source=str(self.study_file),
                    overrides=[], deps=[n.key for n in self.nodes if n.group == "eval"])
        last.state = "planned" if self.dry_run else "new"
        last.ref = self.allocate_compare() if not self.dry_run else f"{study.name}-compare@vNNN"
        self.nodes.append(last)
        return self.nodes

    def build_or_clean(self) -> list[Node]:
        """build(), removing every run it allocated if it fails half-way."""
        try:
            return self.build()
        except BaseException:
            for run in self.fresh:
                shutil.rmtree(run.dir, ignore_errors=True)
            raise

    def add_data(self, source: str) -> Node:
        r = recipes.resolve(source)
        if r.stage != "data":
            raise PrunectlError(f"data: {source} is a {r.stage} recipe; a study's data entries are data recipes")
        node = Node(key=f"data/{r.name}", group="data", stage="data", source=source, overrides=[])
        self.decide(node, r)
        self.names[r.name] = node.ref
        self.nodes.append(node)
        return node

    def add(self, group: str, stage: str, source: str, pins: list[tuple[str, str | None]], deps: list[str]) -> Node:
        base = recipes.resolve(source)
        if base.stage != stage:
            raise PrunectlError(f"{source}: is a {base.stage} recipe; the study's {group} entries are {stage} recipes")
        overrides = [o for f, ref in pins for o in _pin(base, f, ref, self.names)]
        pinned = {o.partition("=")[2] for o in overrides}  # the study's data runs this node reads: it waits for them
        deps = [*(n.key for n in self.nodes if n.group == "data" and n.ref in pinned), *deps]
        r = recipes.resolve(source, overrides)
        existing = next((n for n in self.nodes if n.key == f"{group}/{r.name}"), None)
        if existing:
            return existing
        sweeps = self.sweep_nodes(source, overrides, r, deps) if getattr(r, "sweep", None) is not None else []
        node = Node(key=f"{group}/{r.name}", group=group, stage=stage, source=source, overrides=overrides,
                    deps=[*deps, *(n.key for n in sweeps)], pins=overrides)
        self.decide(node, r)
        self.names[r.name] = node.ref
        self.nodes.append(node)
        return node

    def sweep_nodes(self, source: str, overrides: list[str], r, deps: list[str]) -> list[Node]:
        out = []
        for lr in r.sweep.lrs:
            extra = [*overrides, *prefix_overrides(r.name, r.sweep, lr)]
            node = Node(key=f"sweep/{r.name}-lrsweep/lr={lr:g}", group="sweep", stage=r.stage, source=source,
                        overrides=extra, deps=list(deps), pins=overrides)
            self.decide(node, recipes.resolve(source, extra))
            self.nodes.append(node)
            out.append(node)
        return out

    def decide(self, node: Node, r) -> None:
        """Reuse a complete run of this exact recipe, follow one in flight, resume an interrupted one, or add one."""
        text = recipes.dump(r)
        # A run submitted on its own names its inputs `@latest`: the same run if its manifest recorded our pins.
        unpinned = recipes.dump(recipes.resolve(node.source, [o for o in node.overrides if o not in node.pins]))
        expected = _expected_inputs(node)
        for run in reversed(store.versions(self.root, r.name)):
            manifest = run.manifest()
            if manifest is None:
                continue
            same = recipes.same_recipe(run, text) or (
                recipes.same_recipe(run, unpinned) and manifest.status == "complete"
                and all(manifest.inputs.get(k) == v for k, v in expected.items()))
            if not same and getattr(manifest, "lr_sweep", None):  # the sweep's winner replaced optimizer.lr
                chosen = [*node.overrides, f"optimizer.lr={manifest.lr_sweep['chosen_lr']!r}"]
                same = recipes.same_recipe(run, recipes.resolve(node.source, chosen))
            if not same:
                continue
            if manifest.status == "complete":
                node.ref, node.state = run.ref, "reused"
            elif job_alive(manifest):
                node.ref, node.state = run.ref, "in-flight"
                node.job = manifest.job_ids[-1] if manifest.job_ids else None
            else:
                node.ref, node.state = run.ref, "resume"
                if not self.dry_run:
                    run.update(status="pending", finished=None, executor=self.executor)
            return
        if self.dry_run:
            node.ref, node.state = f"{r.name}@vNNN", "planned"
            return
        run = store.allocate(self.root, r.name)
        self.fresh.append(run)
        recipes.write_run_recipe(run, r)
        note = "queued by the study" if node.group == "data" else "waiting for its inputs (study)"
        run.write_manifest(store.Manifest(name=r.name, version=run.version, stage=node.stage, executor=self.executor,
                                          inputs=_expected_inputs(node), note=note))
        node.ref, node.state = run.ref, "new"

    def allocate_compare(self) -> str:
        run = store.allocate(self.root, f"{self.study.name}-compare")
        self.fresh.append(run)
        run.write_manifest(store.Manifest(name=run.name, version=run.version, stage="compare", executor=self.executor,
                                          note="waiting for the study's evals"))
        return run.ref

    def eval_config(self):
        return recipes.resolve(self.path(self.study.eval)).eval


def dry_run_groups(root: Path, study, planned: Planner, executor: str, profile: str | None):
    """--dry-run: (title, nodes, batch script or None) for each array the study would submit."""
    by_key = {n.key: n for n in planned.nodes}
    for group in GROUPS:
        todo = [n for n in planned.nodes if n.group == group and n.state in ("planned", "resume")]
        if group == "data":
            yield from _data_dry_run(root, todo, executor, profile)
            continue
        for res, bucket in _buckets(todo, profile, planned):
            deps = sorted({by_key[d].key for n in bucket for d in n.deps if by_key[d].state != "reused"})
            title = (f"{group}: {len(bucket)} job(s){' as one array' if len(bucket) > 1 else ''}"
                     + (f", after {len(deps)} input job(s)" if deps else "") + _memory_note(root, planned, bucket, res))
            script = None
            if executor == "slurm":
                script = launch.batch_script(root / study.name / "vNNN" / "logs" / group, res, f"{study.name}-{group}",
                                             "afterany:<job ids of " + ", ".join(deps) + ">" if deps else None)
            yield title, bucket, script


def _data_dry_run(root: Path, todo: list[Node], executor: str, profile: str | None):
    """A data node's three phases as a dry run shows them: the tokenize array's script stands for all three."""
    for n in todo:
        r = recipes.resolve(n.source, n.overrides)
        workers = r.data.workers
        title = (f"data {n.ref}: a tokenizer job, an array of {workers} tokenize task{'s' if workers > 1 else ''}, "
                 "a finalize job, each after the one before succeeds")
        script = None
        if executor == "slurm":
            script = launch.batch_script(run_dir(root, n.ref) / "logs", launch.resources(r.launch, profile),
                                         f"{r.name}-tokenize", "afterok:<job id of its tokenizer job>",
                                         tasks=workers if workers > 1 else None)
        yield title, [n], script


@functools.lru_cache(maxsize=None)
def _resolved(source: str, overrides: tuple[str, ...]):
    """A node's recipe, resolved once per command (hundreds of nodes share a few parents and prunes)."""
    return recipes.resolve(source, list(overrides))


def _trained_shape(root: Path, planned: Planner, n: Node):
    """(shape, holds a mask) of what a training node builds: from its input once that exists; before, the largest
    shape its prune can make on the parent (the prune's own feasible shapes), or the parent's. None if unknown."""
    found = train.train_shape(root, _resolved(n.source, tuple(n.overrides)))
    if found is not None:
        return found
    parent = next((p for p in planned.nodes if p.group == "parent"), None)
    upper = parent and train.train_shape(root, _resolved(parent.source, tuple(parent.overrides)))
    if not upper:
        return None
    prune = next((p for p in planned.nodes if p.key in n.deps and p.group == "prune"), None)
    if prune is None:  # no prune makes a model larger: the parent's shape, with a mask, bounds it
        return upper[0], n.group != "parent"
    return _largest_cut(prune.source, tuple(prune.overrides), upper[0])


@functools.lru_cache(maxsize=None)
def _largest_cut(source: str, overrides: tuple[str, ...], parent):
    cfg = _resolved(source, overrides).prune
    try:
        shapes = cfg.spec.feasible(cfg, parent)
    except PrunectlError:
        return parent, cfg.spec.sparse  # the prune's own check names the problem
    return max(shapes, key=lambda s: s.parameters()), cfg.spec.sparse


def _estimates(root: Path, planned: Planner, bucket: list[Node]):
    """Each training node's (recipe, shape, holds a mask) for the memory preflight; stops at the first unknown."""
    for n in bucket:
        found = _trained_shape(root, planned, n)
        if found is None:
            return
        yield _resolved(n.source, tuple(n.overrides)), *found


def _memory_note(root: Path, planned: Planner, bucket: list[Node], res) -> str:
    """A training group's largest estimated peak per GPU (not-yet-made inputs bounded as _trained_shape says)."""
    if bucket[0].stage not in ("pretrain", "retrain"):
        return ""
    worst = 0.0
    for r, shape, masked in _estimates(root, planned, bucket):
        bf16 = r.train.bf16(res.gpus_per_node > 0)
        worst = max(worst, memory.total(memory.estimate(shape, r.train, res.world, bf16, masked)))
    if not worst:
        return ""
    unit = "GPU" if res.gpus_per_node else "rank"
    return f", memory at most ~{worst / memory.GIB:.1f} GiB per {unit}" + (f" of {res.gpu_mem_gb}" if res.gpu_mem_gb else "")


def memory_problems(root: Path, planned: Planner, profile: str | None) -> list[str]:
    """The preflight for every training job of the study, before anything waits in a queue: one line per job
    whose estimated peak exceeds its profile's GPUs (inputs not made yet are bounded from above)."""
    problems = []
    for n in planned.nodes:
        if n.stage in ("pretrain", "retrain") and n.state in ("planned", "resume"):
            for r, shape, masked in _estimates(root, planned, [n]):
                problems += train.memory_problem(root, r, launch.resources(r.launch, profile), (shape, masked))
    return problems


def budgets(root: Path, planned: Planner) -> tuple[list[dict[str, Any]], list[str]]:
    """Per data range: the tokens it holds (estimated from its recipe until it is prepared) against the most any
    training run of the study reads from it; and one line per run whose budget exceeds its ranges."""
    from .artifacts import DataMeta

    holds_of: dict[str, tuple[dict[str, int] | None, bool]] = {
        n.ref: (recipes.resolve(n.source).data.estimated_tokens(), True)
        for n in planned.nodes if n.group == "data" and n.state != "reused"}

    def holds(ref: str) -> tuple[dict[str, int] | None, bool]:
        if ref not in holds_of:
            if ref.endswith("@vNNN"):
                holds_of[ref] = (None, True)
            else:
                try:
                    meta = DataMeta.read(store.resolve(root, ref).dir)
                except PrunectlError:  # not prepared (yet): the run's own check says so when it can
                    holds_of[ref] = (None, True)
                else:
                    holds_of[ref] = ({name: r.tokens for name, r in meta.ranges.items()}, False)
        return holds_of[ref]

    parent_data = None
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    problems = []
    for n in planned.nodes:
        if n.stage not in ("pretrain", "retrain") or n.group == "sweep":  # a sweep is checked by its full run
            continue
        r = recipes.resolve(n.source, n.overrides)
        data = getattr(r, "data", None) or parent_data
        parent_data = parent_data or data
        have, estimated = holds(data) if data else (None, True)
        if have is None or any(name not in have for name in r.train.data_ranges):
            continue  # unknown until prepared; the run's own check sees it
        if (problem := r.train.budget_problem(n.ref, data, have, estimated)) is not None:
            problems.append(problem)
        read, _ = r.train.reads(have)
        for name, tokens in read.items():
            row = rows.setdefault((data, name), {"data": data, "range": name, "holds": have[name],
                                                 "estimated": estimated, "reads": 0, "by": ""})
            if tokens > row["reads"] or (tokens == row["reads"] and not row["by"]):
                row.update(reads=tokens, by=n.ref)
    return list(rows.values()), problems


def one_budget_line(problems: list[str]) -> str:
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more run{'s' if more > 1 else ''} of this study; --dry-run shows the "
                          "token budgets)" if more else "")


def check_ready(root: Path, planned: Planner, profile: str | None) -> None:
    """Check now what can be checked (nodes whose inputs all exist); each job checks the rest when it starts."""
    from .stages import data as data_stage

    for n in planned.nodes:
        if n.group == "data" and n.state in ("planned", "resume"):
            data_stage.check(recipes.resolve(n.source))  # its sources and tokenizer: the start of each input
            continue
        if n.state == "planned" and n.group in ("parent", "prune", "retrain", "scratch") and \
                all(by.state == "reused" for by in planned.nodes if by.key in n.deps):
            each = recipes.resolve(n.source, n.overrides)
            STAGES[n.stage].check(root, each, launch.resources(each.launch, profile))


def _expected_inputs(node: Node) -> dict[str, str]:
    """The pinned inputs, shown by `prunectl status` until the job checks them."""
    fields = {"parent": "parent", "init": "init", "like": "like", "data": "data", "calibration.data": "calibration"}
    out = {}
    for o in node.pins:
        key, _, value = o.partition("=")
        if key in fields and "@" in value:
            out[fields[key]] = value
    return out


def _pin(recipe, field_name: str, ref: str | None, names: dict[str, str]) -> list[str]:
    """Override `field_name` with the exact version when it points at a run of this study."""
    current = recipe
    for part in field_name.split("."):
        current = getattr(current, part, None)
    if current is None:
        return []
    pinned = ref if ref is not None else names.get(str(current).split("@")[0])
    return [f"{field_name}={pinned}"] if pinned else []


# ---------------------------------------------------------------------------- submission


def method_refs(study, nodes: list[Node], study_file: Path) -> list[dict[str, Any]]:
    """Each method's P-R_N, S_N and S_total runs as the graph pinned them (what the compare reads)."""
    by_source: dict[tuple[str, str], str] = {}
    for n in nodes:
        if n.group in ("retrain", "scratch"):
            by_source[(n.group, str(n.source))] = n.ref
    def ref(group: str, entry: str) -> str | None:
        return by_source.get((group, recipe_path(study_file, entry)))

    return [{"label": m.label, "retrain": [ref("retrain", e) for e in m.retrain],
             "scratch": [ref("scratch", e) for e in m.scratch], "total": ref("scratch", m.total) if m.total else None}
            for m in study.methods]


def _submit_data(root: Path, nodes: list[Node], executor: str, profile: str | None, echo) -> None:
    """Each data node's phases (local: run here, one after another); its finalize job is the one others wait on."""
    from .submission import data_jobs

    for n in nodes:
        r = recipes.resolve(n.source)
        jobs = data_jobs(store.Run.of(root, n.ref), r, executor, launch.resources(r.launch, profile),
                         lambda line, ref=n.ref: echo(f"data {ref} {line}"))
        n.job = str(jobs[-1].job_id)
        echo(f"submitted data {n.ref} as job {n.job} (its finalize job)")


def submit(planner: Planner, executor: str, profile: str | None, echo, follow) -> store.Run:
    """Record the graph, then submit each group as one job array depending on its inputs' jobs."""
    root, study, nodes = planner.root, planner.study, planner.nodes
    study_run = store.allocate(root, study.name)
    recipes.write_run_recipe(study_run, study)
    study_run.write_manifest(store.Manifest(name=study.name, version=study_run.version, stage="study", executor=executor))
    graph = StudyGraph(study_file=str(planner.study_file), executor=executor,
                       eval=planner.eval_config().model_dump(mode="json"),
                       methods=method_refs(study, nodes, planner.study_file), nodes=nodes)
    graph.write(study_run.dir)
    with lifecycle.running(study_run):
        by_key = {n.key: n for n in nodes}
        # Slurm: one array per group. Here: retrains and scratch twins share waves (both need only the prune runs).
        levels = [[g] for g in GROUPS] if executor == "slurm" else \
            [["data"], ["parent"], ["prune"], ["sweep"], ["retrain", "scratch"], ["eval"], ["compare"]]
        for level in levels:
            group = level[0]
            todo = [n for n in nodes if n.group in level and n.state in ("new", "resume")]
            if group == "data":
                _submit_data(root, todo, executor, profile, echo)
                graph.write(study_run.dir)
                continue
            if executor != "slurm":
                todo = [n for n in todo if _inputs_ready(root, n, by_key)]
                _run_here(root, study, study_run, graph, [(res, n) for res, b in _buckets(todo, profile, planner) for n in b],
                          echo, follow)
                continue
            for res, bucket in _buckets(todo, profile, planner):
                deps = sorted({by_key[d].job for n in bucket for d in n.deps
                               if by_key[d].job and by_key[d].state in ("new", "resume", "in-flight")})
                dependency = f"afterany:{':'.join(deps)}" if deps else None
                jobs = launch.submit(executor, res, f"{study.name}-{group}", [_job(n, res, study_run) for n in bucket],
                                     study_run.dir / "logs" / group if len(bucket) > 1 else _folder(root, bucket[0]),
                                     dependency=dependency, link_logs=_log_links(root, bucket))
                _record(root, bucket, jobs, echo, dependency)
                graph.write(study_run.dir)
    # The study's own run records one submission; its nodes' runs carry the progress.
    lifecycle.complete(study_run, note=f"submitted; `prunectl status {study.name}` follows it")
    return study_run


def _run_here(root: Path, study, study_run: store.Run, graph: StudyGraph, items: list, echo, follow) -> None:
    """No scheduler: start jobs while their CPUs fit in this machine's cores, follow the wave, repeat."""
    cores = os.cpu_count() or 1
    while items:
        wave, used = [], 0
        while items and (not wave or used + items[0][0].cpus_per_task * items[0][0].tasks_per_node <= cores):
            res, n = items.pop(0)
            used += res.cpus_per_task * res.tasks_per_node
            wave.append((n, launch.submit("local", res, f"{study.name}-{n.group}", [_job(n, res, study_run)],
                                          _folder(root, n))[0]))
        _record(root, [n for n, _ in wave], [job for _, job in wave], echo, None)
        graph.write(study_run.dir)
        follow(wave)


def _inputs_ready(root: Path, node: Node, by_key: dict[str, Node]) -> bool:
    """Local executor: a node whose inputs failed is marked failed here instead of starting a process for it."""
    missing = [by_key[d].ref for d in node.deps if not _node_complete(root, by_key[d])]
    if node.group == "compare" or not missing:
        return True
    if node.group != "eval":
        lifecycle.fail(store.Run.of(root, node.ref), f"inputs did not complete: {', '.join(missing)}")
    node.state = "skipped"
    return False


def _node_complete(root: Path, node: Node) -> bool:
    if node.group == "eval":
        return bool(node.results) and Path(node.results).exists()
    manifest = store.Run.of(root, node.ref).manifest()
    return manifest is not None and manifest.status == "complete"


def _record(root: Path, nodes: list[Node], jobs: list, echo, dependency: str | None) -> None:
    for n, job in zip(nodes, jobs):
        n.job = str(job.job_id)
        if n.group != "eval":
            run = store.Run.of(root, n.ref)
            run.update(job_ids=[*run.manifest().job_ids, n.job])
        echo(f"submitted {n.group} {n.ref} as job {n.job}"
             + (f" (after jobs {dependency.removeprefix('afterany:').replace(':', ', ')})" if dependency else ""))


def _job(node: Node, res: launch.Resources, study_run: store.Run):
    """What a node's job runs: its stage after checking its inputs; an eval of its run; the compare."""
    if node.group == "eval":
        return EvalNodeJob(str(run_dir(study_run.root, node.ref)), recipes.resolve(node.source, node.overrides))
    if node.group == "compare":
        return functools.partial(compare.run_study, run_dir(study_run.root, node.ref), study_run.dir)
    return NodeJob(node.stage, str(run_dir(study_run.root, node.ref)), node.source, node.overrides, res.model_dump())


def _log_links(root: Path, bucket: list[Node]) -> list[Path]:
    return [run_dir(root, n.ref) for n in bucket if n.group not in ("eval", "compare")]


def _folder(root: Path, node: Node) -> Path:
    """A single job's logs: in its run (an eval's beside its results)."""
    return run_dir(root, node.ref) / ("eval/logs" if node.group == "eval" else "logs")


def _buckets(todo: list[Node], profile: str | None, planner: Planner):
    """Nodes of one group that share a stage and resources go out as one array."""
    out: list[tuple[Any, list[Node]]] = []
    for n in todo:
        if n.group == "compare":
            res = launch.resources(planner.study.launch, profile)
        else:
            res = launch.resources(recipes.resolve(n.source, n.overrides).launch, profile)
        for have, bucket in out:
            if have == res and bucket[0].stage == n.stage:
                bucket.append(n)
                break
        else:
            out.append((res, [n]))
    return out


def newest_graph(root: Path, name: str) -> tuple[store.Run, StudyGraph] | None:
    """The newest submission of the study `name` and its graph."""
    submitted = [run for run in store.versions(root, name) if (run.dir / StudyGraph.FILE).exists()]
    return (submitted[-1], StudyGraph.read(submitted[-1].dir)) if submitted else None


# ---------------------------------------------------------------------------- inside a study's job


@dataclass
class NodeJob:
    """A study node's job: check its inputs (they exist only now), pick the swept LR, then run its stage."""

    stage: str
    run_dir: str
    source: str
    overrides: list[str]
    res: dict[str, Any]

    def __call__(self) -> Any:
        run = store.Run.at(Path(self.run_dir))
        start(self.stage, run, self.source, self.overrides, launch.Resources.model_validate(self.res))
        return STAGES[self.stage].run(run, recipes.load_run_recipe(run.dir))


@dataclass
class EvalNodeJob:
    """A study's eval of one run, once that run's job has ended (it must have completed)."""

    target_dir: str
    recipe: Any  # EvalRecipe

    def __call__(self) -> Any:
        eval_.check_target(Path(self.target_dir))
        return eval_.run(self.recipe, Path(self.target_dir))


def start(stage: str, run: store.Run, source: str, overrides: list[str], res: launch.Resources) -> None:
    """A study node's first act: check its (now existing) inputs, pick the swept LR, record them.

    Every rank computes the same answer; rank 0 writes it and the others wait to read it back."""
    rank = distributed.rank()
    try:
        r = recipes.load_run_recipe(run.dir)
        choice = None
        if getattr(r, "sweep", None) is not None:
            choice = train.choose_lr(run.root, source, overrides, r)
            r = recipes.resolve(source, [*overrides, f"optimizer.lr={choice.chosen_lr!r}"])
        inputs = STAGES[stage].check(run.root, r, res)
    except PrunectlError as err:
        if rank == 0:
            lifecycle.fail(run, err)
        raise
    if rank == 0:
        if choice is not None:
            recipes.write_run_recipe(run, r)
        changes = {"inputs": inputs, "note": None}
        if choice is not None:
            changes["lr_sweep"] = choice.model_dump()
        run.update(**changes)
        return
    for _ in range(600):
        if run.manifest().inputs == inputs:
            return
        time.sleep(1)
    raise PrunectlError(f"{run.ref}: rank 0 did not record the checked inputs within 10 minutes")


# ---------------------------------------------------------------------------- status


def node_state(root: Path, node: Node) -> tuple[str, str]:
    """(state, note) now, from the node's run (or results file); 'unknown' while Slurm does not answer."""
    try:
        return _node_state(root, node)
    except launch.SlurmUnreachable:
        return "unknown", "Slurm did not answer"


def _node_state(root: Path, node: Node) -> tuple[str, str]:
    if node.group == "eval":
        if node.results and Path(node.results).exists():
            return ("reused" if node.state == "reused" else "complete"), ""
        if node.state == "skipped":
            return "skipped", "its run did not complete"
        live = launch.slurm_state(node.job) if node.job else None
        if live:
            return live.lower(), ""
        target = store.Run.of(root, node.ref).manifest() if not node.ref.endswith("@vNNN") else None
        if target is not None and target.status == "failed":
            return "failed", f"{node.ref} failed"
        return ("failed", "no results; see its log") if node.job else (node.state if node.state == "planned" else "pending", "")
    if node.ref is None or node.ref.endswith("@vNNN"):
        return node.state, ""
    manifest = store.Run.of(root, node.ref).manifest()
    if manifest is None:
        return "missing", ""
    state = manifest.status
    if state in ("pending", "running") and not job_alive(manifest):
        state = f"{state} (lost)"
    if state == "complete" and node.state == "reused":
        state = "reused"
    return state, manifest.note or ""


"""Recipes: YAML files resolved into typed objects (extends, key=value overrides, every problem reported)."""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, Field, TypeAdapter, ValidationError, field_validator, model_validator

from . import store
from .compare import CompareConfig
from .data import DataConfig, HeldOutConfig
from .distill import DistillConfig
from .errors import PrunectlError
from .evaluate.config import EvalConfig
from .launch import LaunchConfig
from .model import ModelConfig
from .prune.calibration import CalibrationConfig
from .prune.config import PruneConfig
from .schema import Strict
from .sweep import LRSweepConfig
from .train import OptimizerConfig, TrainConfig

RECIPES_ENV = "PRUNECTL_RECIPES"


def _run_name(value: str) -> str:
    if not store.NAME.match(value):
        raise ValueError(f"{value!r} is not a run name; a run name is {store.NAME_RULE}")
    return value


def _reference(value: str) -> str:
    try:
        store.parse_ref(value.removesuffix("@vNNN"))  # @vNNN: a version a study's dry run has yet to allocate
    except PrunectlError as err:
        raise ValueError(err.problems[0]) from None
    return value


RunName = Annotated[str, AfterValidator(_run_name), Field(description=f"the run directory's name: {store.NAME_RULE}")]
RunRef = Annotated[str, AfterValidator(_reference)]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: `2e6` and `3e-4` are floats (PyYAML's 1.1 rules read them as strings), and `2:4` is
    the string an N:M pattern is (YAML 1.1 reads it as the base-60 integer 124)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9][0-9_]*$|^0x[0-9a-fA-F_]+$|^0o[0-7_]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class DataRecipe(Strict):
    """`prunectl data prepare`: corpora -> tokenizer -> token shards and named disjoint ranges."""

    name: RunName
    stage: Literal["data"]
    description: str = ""
    data: DataConfig
    launch: LaunchConfig = LaunchConfig()  # each phase's job; the tokenize array has data.workers tasks


class PretrainRecipe(Strict):
    """`prunectl pretrain`: train a Llama from random initialisation on named data ranges.

    With `like: <prune run>` it is a scratch twin: the pruned architecture (and, for a sparse prune
    run, its mask with the surviving weights drawn afresh, held through training). `twin: N` is S_N,
    on data the parent never saw; `twin: total` is S_total, on the parent's ranges plus the retrain ones.
    """

    name: RunName
    stage: Literal["pretrain"]
    description: str = ""
    data: RunRef = Field(description="prepared data run, as name, name@latest or name@vNNN")
    model: ModelConfig | None = Field(None, description="the architecture; omit it when `like` names a prune run")
    like: RunRef | None = Field(None, description="prune run name@version whose architecture (and sparse mask) to train from scratch")
    twin: Literal["N", "total"] = Field("N", description="with like: S_N (unseen data only) or S_total (parent's data too)")
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig
    sweep: LRSweepConfig | None = Field(None, description="peak-LR sweep (`--sweep lr`); its winner replaces optimizer.lr")
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _architecture(self) -> PretrainRecipe:
        if (self.model is None) == (self.like is None):
            raise ValueError("give exactly one of model (an architecture) or like (a prune run to copy it from)")
        if self.model is not None and self.train.seq_len > self.model.max_position:
            raise ValueError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_position={self.model.max_position}"
            )
        return self


class RetrainRecipe(Strict):
    """`prunectl retrain`: continue training a pruned (or any complete) run on a named data range (R_N in P-R_N)."""

    name: RunName
    stage: Literal["retrain"]
    description: str = ""
    init: RunRef = Field(description="run to initialise from, name@latest or name@vNNN (normally a prune run)")
    data: RunRef | None = Field(None, description="prepared data run; default: the one the init run used")
    distill: DistillConfig | None = Field(None, description="knowledge distillation from a frozen teacher")
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig
    sweep: LRSweepConfig | None = Field(None, description="peak-LR sweep (`--sweep lr`); its winner replaces optimizer.lr")
    launch: LaunchConfig = LaunchConfig()


class PruneRecipe(Strict):
    """`prunectl prune`: a parent (run or Hugging Face directory) pruned by one method to a ratio."""

    name: RunName
    stage: Literal["prune"]
    description: str = ""
    parent: str = Field(description="name@latest / name@vNNN of a pretrain run, or a local Hugging Face model directory")
    data: RunRef | None = Field(None, description="prepared data run for calibration and held-out loss; default: the parent's")
    prune: PruneConfig
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="sheared-llama: the weights' optimizer while masks are learned")
    calibration: CalibrationConfig = CalibrationConfig()
    heldout: HeldOutConfig = HeldOutConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _calibration_never_reads_evaluation_data(self) -> PruneRecipe:
        if self.calibration.range in ("validation", self.heldout.range) and self.calibration.data is None:
            raise ValueError(
                f"calibration.range '{self.calibration.range}' is read by evaluation; calibrate on another range "
                "(e.g. calibration) or another data run (calibration.data)"
            )
        return self


class EvalRecipe(Strict):
    """`prunectl eval`: held-out loss, perplexity and zero-shot accuracy of one complete run's final model."""

    name: RunName
    stage: Literal["eval"]
    description: str = ""
    run: RunRef = Field(description="the model version to evaluate: name@latest or name@vNNN (override run=..., or --array run=a,b)")
    eval: EvalConfig = EvalConfig()
    launch: LaunchConfig = LaunchConfig()


class CompareRecipe(Strict):
    """`prunectl compare`: the paper's tables and figures for named P-R_N runs and their twins."""

    name: RunName
    stage: Literal["compare"]
    description: str = ""
    eval: str | EvalConfig = Field(description="the eval recipe (file or name) whose stored results are compared")
    compare: CompareConfig
    launch: LaunchConfig = LaunchConfig()


class StudyMethod(Strict):
    """One method of a study: its prune recipe, the retrains (one per budget) and their scratch twins."""

    label: str = Field(description="row label in the tables, e.g. Minitron-D")
    prune: str = Field(description="prune recipe (path relative to the study file, or a recipe name)")
    retrain: list[str] = Field(min_length=1, description="retrain recipes, one per budget N (P-R_N)")
    scratch: list[str] = Field(default_factory=list, description="S_N twin recipes, paired with retrain by position")
    total: str | None = Field(None, description="S_total twin recipe")


class StudyRecipe(Strict):
    """`prunectl study`: parent, prune runs, retrains, scratch twins, evals and the compare, in one submission.

    Entries are recipe files relative to this one (or recipe names); the study pins each stage's
    inputs to the exact versions it runs, whatever `@latest` the stage recipes name."""

    name: RunName
    stage: Literal["study"]
    description: str = ""
    data: list[str] = Field(default_factory=list, description="data recipes (token stream, calibration sets), "
                            "prepared on this machine before anything is submitted")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value
    parent: str = Field(description="pretrain recipe of the parent")
    methods: list[StudyMethod] = Field(min_length=1)
    eval: str = Field(description="eval recipe run on the parent and every P-R_N, S_N and S_total run")
    perplexity: str | None = Field(None, description="corpus of the summary's perplexity column; default: the eval's first")
    launch: LaunchConfig = Field(LaunchConfig(tasks_per_node=1, cpus_per_task=1, time_min=30),
                                 description="the compare job's resources")


Recipe = Annotated[Union[DataRecipe, PretrainRecipe, PruneRecipe, RetrainRecipe, EvalRecipe, CompareRecipe, StudyRecipe],
                   Field(discriminator="stage")]
_RECIPE = TypeAdapter(Recipe)
_BY_STAGE: dict[str, type[Strict]] = {"data": DataRecipe, "pretrain": PretrainRecipe, "prune": PruneRecipe,
                                      "retrain": RetrainRecipe, "eval": EvalRecipe, "compare": CompareRecipe,
                                      "study": StudyRecipe}


def load_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run directory stores (written by the CLI before submission)."""
    return _RECIPE.validate_python(yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()))


def write_run_recipe(run: store.Run, recipe: Recipe) -> None:
    store.write_atomic(run.dir / "recipe.yaml", dump(recipe))


# Keys that say how a run's work is split and where it runs, not what it makes: a data run's bytes are the same
# with any number of tokenize tasks on any nodes (tests/test_data_scale.py), so a rerun with another
# data.workers or launch resumes (or reuses) it instead of starting a new version. A training run reads the
# same sequences in the same steps on any number of ranks, and resumes on another number from its checkpoint
# (checkpoints.py, tests/test_resume_world.py): its launch is not its identity either.
NOT_IDENTITY = {"data": (("data", "workers"), ("launch",)), "pretrain": (("launch",),), "retrain": (("launch",),)}


def identity(text: str) -> str:
    """A resolved recipe's dump without the keys that do not change what its run makes."""
    raw = yaml.safe_load(text)
    drop = NOT_IDENTITY.get(raw.get("stage")) if isinstance(raw, dict) else None
    if not drop:
        return text
    for *parents, key in drop:
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return yaml.safe_dump(raw, sort_keys=False)


def same_recipe(run: store.Run, recipe: Recipe | str) -> bool:
    """A run's identity is its resolved recipe: the stored recipe.yaml is this one (up to NOT_IDENTITY)."""
    text = recipe if isinstance(recipe, str) else dump(recipe)
    path = run.dir / "recipe.yaml"
    if not path.exists():
        return False
    stored = path.read_text()
    return stored == text or identity(stored) == identity(text)


def runs_of(root: Path, recipe: Recipe, complete: bool = False) -> list[store.Run]:
    """The versions of this exact recipe (oldest first); only complete ones with `complete`."""
    text = dump(recipe)
    return [run for run in store.versions(root, recipe.name)
            if same_recipe(run, text) and (not complete or run.is_complete())]


def recipes_root() -> Path:
    return Path(os.environ.get(RECIPES_ENV, "recipes"))


def find_recipe(ref: str) -> Path:
    """A recipe path, or a recipe name looked up under the recipes root."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise PrunectlError(f"{ref}: no such recipe file")
        return path
    for candidate in list_recipe_files():
        if _raw_name(candidate) == ref:
            return candidate
    names = [_raw_name(p) for p in list_recipe_files()]
    hint = difflib.get_close_matches(ref, names, n=1)
    suffix = f"; did you mean '{hint[0]}'?" if hint else "; `prunectl recipes ls` lists them"
    raise PrunectlError(f"{ref}: no recipe file or recipe name under {recipes_root()}/{suffix}")


def list_recipe_files() -> list[Path]:
    """Every shipped recipe; files starting with '_' are partials meant for `extends:`."""
    root = recipes_root()
    return sorted(p for p in root.rglob("*.yaml") if not p.name.startswith("_"))


def _raw_name(path: Path) -> str:
    try:
        raw = load_raw(path)
    except PrunectlError:
        return default_name(path)
    return str(raw.get("name") or default_name(path))


def default_name(path: Path) -> str:
    return f"{path.parent.name}-{path.stem}"


def read(path: Path) -> str:
    """A recipe file's text, or one line saying why it is not one."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise PrunectlError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise PrunectlError(f"{path}: is a directory; give a recipe file (.yaml)") from None
    except UnicodeDecodeError:
        raise PrunectlError(f"{path}: is not a text file; a recipe is YAML text") from None
    except OSError as err:
        raise PrunectlError(f"{path}: cannot be read ({err.strerror or err})") from None


def load_raw(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """YAML with `extends:` (a path relative to the file) merged underneath, recursively."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise PrunectlError(f"extends: cycle {chain}; remove one of the extends")
    try:
        raw = _yaml(read(path)) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PrunectlError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise PrunectlError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    base_ref = raw.pop("extends", None)
    if base_ref is None:
        return raw
    base = load_raw(path.parent / str(base_ref), (*_seen, path))
    return deep_merge(base, raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` with value parsed as YAML (so 3e-4, true, [1, 2] keep their types)."""
    raw = dict(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{item}: an override is key.path=value, e.g. train.tokens=1000000")
            continue
        try:
            value = _yaml(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None:
                    problems.append(f"{'.'.join(parts[: i + 1])}: is not a mapping, cannot set {key}")
                    break
                child = {}
            node[part] = child = dict(child)
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise PrunectlError(*problems)
    return raw


def resolve(ref: str, overrides: list[str] = ()) -> Recipe:
    """Load, merge, override and validate a recipe; every problem in one PrunectlError."""
    path = find_recipe(ref)
    raw = apply_overrides(load_raw(path), list(overrides))
    raw.setdefault("name", default_name(path))
    try:
        return _RECIPE.validate_python(raw)
    except ValidationError as err:
        raise PrunectlError(*_describe(err, raw)) from None


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _describe(err: ValidationError, raw: dict[str, Any]) -> list[str]:
    stage_cls = _BY_STAGE.get(str(raw.get("stage")))
    lines = []
    for item in err.errors():
        loc = list(item["loc"])
        if item["type"] == "union_tag_invalid" or (item["type"] == "union_tag_not_found"):
            lines.append(f"stage: must be one of {', '.join(_BY_STAGE)} (got {raw.get('stage')!r})")
            continue
        if loc and loc[0] in _BY_STAGE:  # discriminated union prefixes the tag
            loc = loc[1:]
        path = _dotted(loc) or "(recipe)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown key{_suggest(stage_cls, loc)}"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif "input" in item and item["type"] not in ("model_type",) and not isinstance(item["input"], dict):
            message = f"{message} (got {item['input']!r})"
        lines.append(f"{path}: {message}")
    return lines


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _suggest(model: type | None, loc: list[Any]) -> str:
    """Walk the schema along loc[:-1] and propose the closest field name to loc[-1]."""
    for part in loc[:-1]:
        if model is None:
            return ""
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        model = _model_in(field.annotation) if field else None
    fields = list(getattr(model, "model_fields", {}) or [])
    match = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else (f"; expected one of {', '.join(fields)}" if fields else "")


def _model_in(annotation: Any) -> type | None:
    if isinstance(annotation, type) and issubclass(annotation, Strict):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None

"""Recipes: which stages make up a family, and each stage's config.

A recipe is `flows/recipes/<name>.yaml` (or any path):

    name: tiny
    seed: 0
    device: auto            # auto | cpu | cuda
    stages:                 # every stage of the family, in reading order
      crawl: {source: pydoc, max_pages: 400}
      pretrain: {d_model: 128, n_layers: 4}
    modules:                # optional: stages defined outside stages/ (module path)
      my_stage: mypkg.my_stage
    launch:                 # optional: run a stage under torchrun with N processes
      pretrain: {nproc: 2}
    register:               # optional: outputs registered in MLflow as <recipe>-<member>
      base: base
      grpo: chat
    runner: dask            # optional: the data stages' shards on Dask (flows/dask_runner.py); default local

`extends: tiny` (a recipe name or a path relative to this file) starts from another recipe: its
stages keep their fields unless this file sets them, stages it lacks are appended, and the other
top-level keys are taken from this file where given (`register`, `modules`, `launch` are merged).

A stage module may declare `OPTIONAL_INPUTS`: inputs it reads when some stage of the recipe produces
them and does without otherwise (the evaluate stage reads every member the recipe builds and shows
the others as absent); they are wired like any input, so rebuilding one rebuilds the stage.

`--set stage.field=value` overrides one field (the value is read as YAML). Everything is validated
before anything runs: an unknown stage or field, a value of the wrong type, or an input that no
stage of the recipe produces is one line naming which and where.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.contract import ConfigError, build_config, check_type, config_to_json, stage_inputs

RECIPES_DIR = Path(__file__).parent / "recipes"
STAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # also the stage's folder: `../x` must not escape the home
TOP_LEVEL = {"name", "description", "seed", "device", "stages", "modules", "launch", "experiment", "register", "extends",
             "runner"}
MERGED = ("modules", "launch", "register")  # mappings an extending recipe adds to


class RecipeError(ConfigError):
    pass


LOCAL_WORKERS = 2


@dataclass(frozen=True)
class RunnerSpec:
    kind: str = "local"  # local | dask
    workers: int = LOCAL_WORKERS  # LocalCluster worker processes (one thread each)
    address: str = ""  # an existing scheduler; empty: start a LocalCluster

    def describe(self) -> str:
        if self.kind == "local":
            return "in process"
        return f"Dask scheduler {self.address}" if self.address else f"Dask LocalCluster of {self.workers} workers"


def parse_runner(value: Any, where: str) -> RunnerSpec:
    """The recipe's `runner:` value (local, dask, {dask: {workers: N}}, {dask: ADDRESS}; flows/dask_runner.py)."""
    if value is None or value == "local":
        return RunnerSpec()
    if value == "dask":
        return RunnerSpec("dask")
    if isinstance(value, dict) and set(value) == {"dask"}:
        inner = value["dask"]
        if isinstance(inner, str) and inner.strip():
            return RunnerSpec("dask", address=inner.strip())
        if isinstance(inner, dict) and set(inner) <= {"workers", "address"}:
            workers = inner.get("workers", LOCAL_WORKERS)
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
                raise RecipeError(f"{where}: runner.dask.workers must be an integer >= 1, got {workers!r}")
            return RunnerSpec("dask", workers=workers, address=str(inner.get("address") or ""))
    raise RecipeError(f"{where}: runner must be local, dask, {{dask: {{workers: N}}}} or {{dask: tcp://HOST:PORT}}, got {value!r:.80}")


@dataclass
class StageSpec:
    name: str
    module_name: str
    module: types.ModuleType
    config: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nproc: int = 1

    @property
    def config_json(self) -> dict[str, Any]:
        return config_to_json(self.config)

    @property
    def gpu(self) -> bool:
        return bool(getattr(self.module, "GPU", False))

    @property
    def network(self) -> bool:
        return bool(getattr(self.module, "NETWORK", False))


@dataclass
class Recipe:
    name: str
    path: Path
    seed: int
    device: str
    experiment: str
    stages: dict[str, StageSpec]  # topological order
    producers: dict[str, str]  # artifact name -> stage
    overrides: list[str] = field(default_factory=list)
    description: str = ""
    register: dict[str, str] = field(default_factory=dict)  # output name -> family member name
    runner: RunnerSpec = field(default_factory=RunnerSpec)  # where the data stages map their shards

    def upstream(self, stage: str) -> list[str]:
        return [self.producers[i] for i in self.stages[stage].inputs]

    def downstream(self, stage: str) -> list[str]:
        """`stage` and every stage that depends on it, in order."""
        out = {stage}
        for name in self.stages:
            if any(u in out for u in self.upstream(name)):
                out.add(name)
        return [s for s in self.stages if s in out]

    def ancestors(self, stage: str) -> list[str]:
        """`stage` and every stage it depends on, in order."""
        out = {stage}
        for name in reversed(list(self.stages)):
            if name in out:
                out.update(self.upstream(name))
        return [s for s in self.stages if s in out]


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_path(recipe: str | Path) -> Path:
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file {p} not found")
        return p.resolve()
    candidate = RECIPES_DIR / f"{recipe}.yaml"
    if not candidate.is_file():
        close = difflib.get_close_matches(str(recipe), available(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"unknown recipe {recipe!r}: {hint}built-in recipes: {', '.join(available())}")
    return candidate


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected STAGE.FIELD=VALUE (for example --set pretrain.max_steps=200)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _import_stage(stage: str, module_name: str, where: str) -> types.ModuleType:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise RecipeError(f"{where}: stage {stage!r} has no module {module_name!r}") from None
        raise
    for attr in ("Config", "INPUTS", "OUTPUTS", "run"):
        if not hasattr(module, attr):
            raise RecipeError(f"{where}: module {module_name} does not follow the stage contract (no {attr})")
    return module


def read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe file as a mapping, with `extends:` resolved (base first, this file on top)."""
    if path in seen:
        raise RecipeError(f"{path}: extends itself through {' -> '.join(p.name for p in seen)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever the YAML parser says
        raise RecipeError(f"{path}{at}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with a 'stages' key")
    unknown = set(raw) - TOP_LEVEL
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {sorted(unknown)} (allowed: {sorted(TOP_LEVEL)})")
    parent_ref = raw.pop("extends", None)
    if parent_ref is None:
        return raw
    if not isinstance(parent_ref, str) or not parent_ref.strip() or len(parent_ref) > 255:
        raise RecipeError(f"{path}: extends must name one recipe (a name or a path), got {parent_ref!r:.60}")
    local = path.parent / str(parent_ref)
    try:
        parent_path = local.resolve() if local.is_file() else resolve_path(str(parent_ref))
    except RecipeError as e:
        raise RecipeError(f"{path}: extends: {e}") from None
    base = read_raw(parent_path, (*seen, path))
    stages = {k: dict(v or {}) for k, v in (base.get("stages") or {}).items()}
    for stage, values in (raw.get("stages") or {}).items():
        stages[stage] = {**stages.get(stage, {}), **(values or {})}
    merged = {**base, **{k: v for k, v in raw.items() if k not in MERGED}, "stages": stages}
    for key in MERGED:
        merged[key] = {**(base.get(key) or {}), **(raw.get(key) or {})}
    if "name" not in raw:
        merged["name"] = path.stem
    if "description" not in raw:
        merged.pop("description", None)
    return merged


def load_recipe(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = resolve_path(recipe)
    raw = read_raw(path)
    stages_raw = raw.get("stages") or {}
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise RecipeError(f"{path}: 'stages' must map stage names to their config")
    for k, v in stages_raw.items():
        if v is not None and not isinstance(v, dict):
            raise RecipeError(f"{path}: stages.{k} must be a mapping of config fields (or empty), got {type(v).__name__} {v!r:.40}")
    stages_raw = {k: dict(v or {}) for k, v in stages_raw.items()}
    origin: dict[tuple[str, str], str] = {}
    top = {k: raw.get(k) for k in ("seed", "device", "runner")}

    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] in top:
            top[keys[0]] = value
            continue
        if len(keys) != 2:
            raise RecipeError(f"--set {text}: expected STAGE.FIELD=VALUE or seed=N / device=cpu / runner=dask")
        stage, fld = keys
        if stage not in stages_raw:
            close = difflib.get_close_matches(stage, list(stages_raw), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"--set {text}: recipe {path.stem} has no stage {stage!r}; {hint}stages: {', '.join(stages_raw)}")
        stages_raw[stage][fld] = value
        origin[(stage, fld)] = f"--set {stage}.{fld}"

    modules = raw.get("modules") or {}
    launch = raw.get("launch") or {}
    specs: dict[str, StageSpec] = {}
    for stage, values in stages_raw.items():
        if not STAGE_NAME.fullmatch(str(stage)):  # a stage name is a directory name in the home
            raise RecipeError(f"{path}: stage name {stage!r} must be lowercase letters, digits and _ (starting with a letter)")
        module_name = modules.get(stage, f"stages.{stage}")
        module = _import_stage(stage, module_name, f"{path}: stages.{stage}")
        # validate field by field so the message names the --set or the recipe line that was wrong
        for fld, value in values.items():
            where = origin.get((stage, fld), f"{path.name}: stages.{stage}")
            build_config_field(module.Config, fld, value, where)
        cfg = build_config(module.Config, values, f"{path.name}: stages.{stage}")
        nproc = int((launch.get(stage) or {}).get("nproc", 1))
        specs[stage] = StageSpec(stage, module_name, module, cfg, stage_inputs(module, cfg), tuple(module.OUTPUTS), nproc)

    producers: dict[str, str] = {}
    for spec in specs.values():
        for out in spec.outputs:
            if out in producers:
                raise RecipeError(f"{path}: output {out!r} is produced by both {producers[out]} and {spec.name}")
            producers[out] = spec.name
    for spec in specs.values():  # inputs a stage reads when the recipe builds them (evaluate: every member)
        optional = [i for i in getattr(spec.module, "OPTIONAL_INPUTS", ()) if i in producers and i not in spec.inputs]
        spec.inputs = tuple(spec.inputs) + tuple(optional)
    for spec in specs.values():
        for inp in spec.inputs:
            if inp not in producers:
                raise RecipeError(
                    f"{path}: stage {spec.name} needs input {inp!r}, which no stage of recipe {path.stem} produces"
                )
    ordered = _topological(specs, producers, path)
    seed = top["seed"] if top["seed"] is not None else 0
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"{path}: seed must be an integer, got {seed!r}")
    device = top["device"] or "auto"
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise RecipeError(f"{path}: device must be auto, cpu or cuda, got {device!r}")
    name = raw.get("name") or path.stem
    register = raw.get("register") or {}
    for out in register:
        if out not in producers:
            raise RecipeError(f"{path}: register: no stage of recipe {path.stem} produces {out!r}")
    return Recipe(
        name=name,
        path=path,
        seed=seed,
        device=device,
        experiment=raw.get("experiment") or f"family-{name}",
        stages=ordered,
        producers=producers,
        overrides=list(overrides),
        description=raw.get("description", ""),
        register={str(k): str(v) for k, v in register.items()},
        runner=parse_runner(top["runner"], str(path)),
    )


def build_config_field(config_cls: type, fld: str, value: Any, where: str) -> None:
    names = {f.name for f in dataclasses.fields(config_cls)}
    if fld not in names:
        close = difflib.get_close_matches(fld, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (fields: {', '.join(sorted(names))})"
        raise RecipeError(f"{where}: unknown field {fld!r}{hint}")
    check_type(value, typing.get_type_hints(config_cls)[fld], f"{where}.{fld}" if not where.startswith("--set") else where)


def _topological(specs: dict[str, StageSpec], producers: dict[str, str], path: Path) -> dict[str, StageSpec]:
    order: list[str] = []
    done: set[str] = set()
    remaining = list(specs)
    while remaining:
        for name in remaining:
            if all(producers[i] in done for i in specs[name].inputs):
                order.append(name)
                done.add(name)
                remaining.remove(name)
                break
        else:
            raise RecipeError(f"{path}: stages {remaining} depend on each other in a cycle")
    return {n: specs[n] for n in order}

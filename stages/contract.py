"""The stage contract: what every stage module exports and what it is given.

A stage module exports

    Config                      a frozen dataclass of plain values with good defaults
    INPUTS, OUTPUTS             tuples of artifact names (the DAG is wired by these names)
    run(cfg, inputs, ctx) -> StageResult

and optionally `INPUT_FILES`, the names of Config fields that hold paths of user files (a recipe's
WARC files, word lists, datasets): their content goes into the stage's fingerprint, so editing such
a file rebuilds the stage, `NETWORK = True` (retried on network errors), `GPU = True`, and
`inputs(cfg)`, the inputs this config uses (a subset of INPUTS) when some are needed only by some
configs: the DAG then leaves the others out, so rebuilding them does not rebuild this stage.
`OPTIONAL_INPUTS` (a subset of INPUTS) are wired only when the recipe builds a stage that makes
them and left out otherwise (stages/evaluate.py reads every member the recipe builds and shows the
rest as absent): a change of any wired one still changes this stage's fingerprint.

A data stage that maps a pure function over shards of its input calls `ctx.mapper(fn, items)` when
it is set (the flow's Dask task runner: one Prefect task per item on the cluster's workers), and its
own in-process path (a process pool) when it is None; either way the results come back in order, so
the output bytes do not depend on where they were computed.

`run` reads only its inputs' paths, writes only under `ctx.run_dir` (one file or directory per
output name), logs only through `ctx.tracker`, and reports progress through `ctx.progress`. It may
keep checkpoints in `ctx.checkpoint_dir`; they survive a crash and are removed once the artifact is
published. It never imports prefect or another stage.

Every stage also runs without Prefect, which is how `torchrun` launches it:

    python -m stages.<name> --config c.json --inputs i.json --run-dir DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from storage.artifacts import Artifact
from storage.tracking import NullTracker, Tracker, tracker_from_env

SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 3e-5, 1E4: numbers YAML 1.1 leaves as strings


class StageError(Exception):
    """An error the user can fix (bad input, bad config, nothing left to train on).

    Reported as one line naming the stage and what to do, without a traceback.
    """


class ConfigError(StageError):
    pass


# -- progress ------------------------------------------------------------------------------------


class Progress(Protocol):
    def __call__(self, done: float, total: float, desc: str = "", **metrics: float) -> None: ...


class TqdmProgress:
    """A progress bar on stderr; the default outside Prefect."""

    def __init__(self, name: str = ""):
        self.name = name
        self._bar = None
        self._desc = None

    def __call__(self, done: float, total: float, desc: str = "", **metrics: float) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or desc != self._desc or self._bar.total != total:
            if self._bar is not None:
                self._bar.close()
            label = f"{self.name}: {desc}" if desc else self.name
            self._bar = tqdm(total=total, desc=label, leave=False, dynamic_ncols=True, mininterval=0.5)
            self._desc = desc
        if metrics:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        self._bar.update(done - self._bar.n)  # update() honours mininterval; refresh() would not
        if done >= total:
            self._bar.close()
            self._bar = None


class FileProgress:
    """Appends progress as JSON lines to a file, for a parent process to follow (torchrun)."""

    def __init__(self, path: str | Path, also: Progress | None = None, min_interval_s: float = 1.0):
        self.path = Path(path)
        self.also = also
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def __call__(self, done: float, total: float, desc: str = "", **metrics: float) -> None:
        if self.also is not None:
            self.also(done, total, desc, **metrics)
        now = time.monotonic()
        if now - self._last < self.min_interval_s and done < total:
            return
        self._last = now
        with open(self.path, "a") as f:
            f.write(json.dumps({"done": done, "total": total, "desc": desc, "metrics": metrics}) + "\n")


def null_progress(done: float, total: float, desc: str = "", **metrics: float) -> None:
    return None


# -- context and result ----------------------------------------------------------------------------


@dataclass
class StageContext:
    stage: str
    run_dir: Path  # outputs go here, one entry per output name
    checkpoint_dir: Path  # survives a crash; removed after publishing
    state_dir: Path  # persists across runs in the home (e.g. the dedupe index)
    tracker: Tracker = field(default_factory=NullTracker)
    progress: Progress = null_progress
    device: str = "cpu"
    seed: int = 0
    fingerprint: str = ""
    rank: int = 0
    world_size: int = 1
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("family"))
    # fn(item) for each item, results in order, on another engine; None: the stage's in-process path
    mapper: Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]] | None = None

    def output(self, name: str) -> Path:
        """Path where output `name` must be written."""
        return self.run_dir / name

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class StageResult:
    """Pointers and numbers only: per-output meta, headline metrics, a short markdown summary, and
    warnings a user must see (a safety cap that ended training early: `family status` shows them)."""

    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StageResult":
        return cls(
            outputs=d.get("outputs", {}),
            metrics=d.get("metrics", {}),
            summary=d.get("summary", ""),
            tables=d.get("tables", {}),
            warnings=d.get("warnings", []),
        )


# -- config validation -----------------------------------------------------------------------------


def check_type(value: Any, tp: Any, where: str) -> Any:
    """Return `value` coerced to `tp` (int->float, list->tuple) or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_config(config_cls: type, values: dict[str, Any], where: str) -> Any:
    """Build a stage Config from plain values, naming the bad field and where it came from."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (fields: {', '.join(sorted(fields))})"
            raise ConfigError(f"{where}: unknown field {key!r}{hint}")
    coerced = {k: check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    cfg = config_cls(**coerced)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return cfg


def config_to_json(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# -- running a stage outside Prefect ---------------------------------------------------------------


def check_result(module: types.ModuleType, result: StageResult, run_dir: Path) -> None:
    missing = [o for o in module.OUTPUTS if o not in result.outputs]
    if missing:
        raise RuntimeError(f"{module.__name__}.run returned no entry for outputs {missing}")
    for name in result.outputs:
        if not (run_dir / name).exists():
            raise RuntimeError(f"{module.__name__}.run declared output {name!r} but {run_dir / name} does not exist")


def stage_inputs(module: types.ModuleType, cfg: Any) -> tuple[str, ...]:
    """The inputs a stage reads under `cfg`: module.inputs(cfg) where the module defines it, else INPUTS."""
    chosen = tuple(module.inputs(cfg)) if hasattr(module, "inputs") else tuple(module.INPUTS)
    unknown = set(chosen) - set(module.INPUTS)
    if unknown:
        raise ConfigError(f"{module.__name__}.inputs() names {sorted(unknown)}, which are not in INPUTS")
    return chosen


def main(module: types.ModuleType, argv: list[str] | None = None) -> int:
    """`python -m stages.<name> --config c.json --inputs i.json --run-dir DIR`."""
    spec = getattr(module, "__spec__", None)  # under `python -m`, __name__ is "__main__"
    name = (spec.name if spec is not None else module.__name__).rsplit(".", 1)[-1]
    p = argparse.ArgumentParser(
        prog=f"python -m stages.{name}",
        description=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
        epilog="inputs.json maps each input name to a path or to an artifact object {kind, path, fingerprint, meta}.",
    )
    p.add_argument("--config", help="JSON file with Config fields (defaults for the rest)")
    p.add_argument("--inputs", help=f"JSON file mapping {list(module.INPUTS)} (those the config uses) to paths")
    p.add_argument("--run-dir", required=True, help="directory to write the outputs into")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default: RUN_DIR.ckpt, next to RUN_DIR)")
    p.add_argument("--state-dir", help="persistent state (default: RUN_DIR.state, next to RUN_DIR)")
    p.add_argument("--device", default=os.environ.get("FAMILY_DEVICE", "cpu"))
    p.add_argument("--seed", type=int, default=int(os.environ.get("FAMILY_SEED", "0")))
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        values = json.loads(Path(args.config).read_text()) if args.config else {}
        cfg = build_config(module.Config, values, f"stages.{name}")
        raw_inputs = json.loads(Path(args.inputs).read_text()) if args.inputs else {}
        inputs = {
            k: Artifact.from_json(v) if isinstance(v, dict) else Artifact(k, str(Path(v).resolve()), "", {})
            for k, v in raw_inputs.items()
        }
        missing = [i for i in stage_inputs(module, cfg) if i not in inputs]
        if missing:
            raise ConfigError(f"stages.{name}: missing inputs {missing} in {args.inputs}")
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # next to the run dir, named after it: two runs in one folder never resume from each other's checkpoints
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else run_dir.with_name(run_dir.name + ".ckpt")
    state = Path(args.state_dir) if args.state_dir else run_dir.with_name(run_dir.name + ".state")
    progress_file = os.environ.get("FAMILY_PROGRESS_FILE")
    progress: Progress = TqdmProgress(name) if rank == 0 else null_progress
    if progress_file and rank == 0:
        progress = FileProgress(progress_file, also=progress)
    ctx = StageContext(
        stage=name,
        run_dir=run_dir,
        checkpoint_dir=ckpt,
        state_dir=state,
        tracker=tracker_from_env() if rank == 0 else NullTracker(),
        progress=progress,
        device=args.device,
        seed=args.seed,
        fingerprint=os.environ.get("FAMILY_FINGERPRINT", ""),
        rank=rank,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )
    for d in (ckpt, state):
        d.mkdir(parents=True, exist_ok=True)
    try:
        result = module.run(cfg, inputs, ctx)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        check_result(module, result, run_dir)
        (run_dir.parent / "result.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
    return 0

"""Run tracking: one MLflow parent run per `family run`, one child run per executed stage.

The backend is the home's SQLite database (`<home>/mlflow.db`) with artifacts under
`<home>/mlartifacts`; experiments are created with that absolute artifact root so a run never writes
relative to the current directory. Stages see only the small `Tracker` interface, so they log the
same way under Prefect, from `python -m stages.<name>`, or into a `NullTracker` in tests.
A child process (torchrun rank 0) reattaches to its stage's run through FAMILY_MLFLOW_* variables.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

ENV_URI = "FAMILY_MLFLOW_URI"
ENV_RUN = "FAMILY_MLFLOW_RUN_ID"


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...


class NullTracker:
    """Keeps what was logged in memory: the tracker for tests and for runs without MLflow."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.tags: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.artifacts: list[str] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(path))

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def log_dict(self, obj: Any, name: str) -> None:
        self.texts[name] = json.dumps(obj, default=str)

    def history(self, run_id: str, keep: Callable[[str], Any] | None = None) -> dict[str, list[tuple[int, float]]]:
        """No other runs are kept in memory: {} (the evaluate stage then reads the curves stages recorded)."""
        return {}


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits, _ - . / and spaces: `dropped/gopher:min_words` -> `dropped/gopher.min_words`."""
    return re.sub(r"[^\w\-./ ]", ".", name)[:250]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker:
    """Logs into one existing MLflow run through the client API (thread- and process-safe)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)  # keys as metric keys: a gate on `ndcg@10` is the param `gates.embedder.ndcg.10.min`
        items = [Param(metric_key(k), str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(metric_key(k), float(v), ts, step or 0)
            for k, v in metrics.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        for i in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics a batch (evaluate logs hundreds)
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def history(self, run_id: str, keep: Callable[[str], Any] | None = None) -> dict[str, list[tuple[int, float]]]:
        """The metric histories of another run of this backend (a stage's curves, for the family
        report): {key: [(step, value), ...]} in step order, for the keys `keep` accepts."""
        keys = [k for k in self.client.get_run(run_id).data.metrics if keep is None or keep(k)]
        return {k: sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, k)) for k in sorted(keys)}


def tracker_from_env() -> Tracker:
    uri, run = os.environ.get(ENV_URI), os.environ.get(ENV_RUN)
    if uri and run:
        return MlflowTracker(uri, run)
    return NullTracker()


def git_revision(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        rev = out.stdout.strip()
        if rev:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


class Lineage:
    """Creates the experiment, the parent run of a `family run` and its stage child runs."""

    def __init__(self, tracking_uri: str, artifact_root: Path, experiment: str):
        from mlflow.tracking import MlflowClient

        # Explicit clients only: `mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI to the whole
        # process, which would send the next run's lineage (another home) to this home's database.
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # a tracking server decides where artifacts go (its --artifacts-destination: S3, ...)
            remote = tracking_uri.startswith(("http://", "https://"))
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=None if remote else (artifact_root / experiment).resolve().as_uri()
            )
        else:
            self.experiment_id = exp.experiment_id

    def start_parent(self, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def start_child(self, parent_id: str, stage: str, tags: dict[str, str]) -> MlflowTracker:
        tags = {"mlflow.parentRunId": parent_id, "stage": stage, **tags}
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        return MlflowTracker(self.uri, run.info.run_id)

    def register(self, model_name: str, run_id: str, model_dir: Path, tags: dict[str, str]) -> str:
        """Log a model directory to a run and register it as a new version of `model_name`.

        MLflow reserves the alias `latest`: `models:/<name>/latest` always resolves to the newest
        version, which is this one. Gates set `champion` (stages/evaluate.py; the flow calls set_alias).
        """
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(run_id, str(model_dir), "model")
        try:
            self.client.create_registered_model(model_name)
        except MlflowException:  # already registered
            pass
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(model_name, source, run_id=run_id, tags=tags)
        return version.version

    def set_alias(self, model_name: str, alias: str, fingerprint: str) -> str | None:
        """Point `alias` (e.g. `champion`) at the newest version of `model_name` registered from the
        stage artifact `fingerprint`; its version, or None when no such version is registered (a
        member built with --no-track, or a registry that lost it)."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{model_name}'")
        except MlflowException:
            return None
        match = [v for v in versions if (v.tags or {}).get("fingerprint") == fingerprint]
        if not match:
            return None
        version = max(match, key=lambda v: int(v.version)).version
        self.client.set_registered_model_alias(model_name, alias, version)
        return str(version)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run_url(self, ui: str, run_id: str) -> str:
        return f"{ui.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"


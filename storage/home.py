"""Where everything of one family lives: the home directory and its fixed layout.

    <home>/artifacts/<stage>/<fingerprint>/   published outputs (manifest.json written last)
    <home>/work/<stage>/<fingerprint>/        in-progress outputs, checkpoints, the stage lease
    <home>/mlflow.db, <home>/mlartifacts/     the embedded MLflow backend
    <home>/prefect/                           PREFECT_HOME: the Prefect SQLite database
    <home>/state/                             small persistent state (dedupe index, last plan)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = ".family"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None) -> "Home":
        """`--home` wins, then FAMILY_HOME, then ./.family."""
        raw = home or os.environ.get("FAMILY_HOME") or DEFAULT_HOME
        return cls(Path(raw).expanduser().resolve())

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def logs(self) -> Path:
        """Tracebacks of internal errors, one file per failure (`family logs STAGE`)."""
        return self.root / "logs"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_uri(self) -> str:
        """The home's SQLite backend, unless MLFLOW_TRACKING_URI points at a shared server."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def stage_dir(self, stage: str, fingerprint: str) -> Path:
        return self.artifacts / _name(stage) / _name(fingerprint)

    def work_dir(self, stage: str, fingerprint: str) -> Path:
        return self.work / _name(stage) / _name(fingerprint)

    def ensure(self) -> "Home":
        for d in (self.artifacts, self.work, self.state, self.prefect_home, self.mlflow_artifacts):
            d.mkdir(parents=True, exist_ok=True)
        return self


def _name(part: str) -> str:
    """A stage name or fingerprint used as one folder name: never a path that leaves the home."""
    if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
        raise ValueError(f"{part!r} is not a stage name or fingerprint")
    return part

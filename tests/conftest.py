"""Shared fixtures: a stage context in a temporary directory, and the shared test data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.contract import StageContext
from storage.artifacts import Artifact
from storage.tracking import NullTracker

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FAMILY_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set FAMILY_SHARED)")
    return SHARED_DATA


def make_ctx(root: Path, stage: str = "test", seed: int = 0) -> StageContext:
    run_dir, ckpt, state = root / "out", root / "ckpt", root / "state"
    for d in (run_dir, ckpt, state):
        d.mkdir(parents=True, exist_ok=True)
    return StageContext(stage=stage, run_dir=run_dir, checkpoint_dir=ckpt, state_dir=state, tracker=NullTracker(), seed=seed)


def artifact(kind: str, path: Path | str, meta: dict | None = None) -> Artifact:
    return Artifact(kind=kind, path=str(path), fingerprint="test", meta=meta or {})


@pytest.fixture
def stage_ctx(tmp_path: Path) -> StageContext:
    return make_ctx(tmp_path / "stage")

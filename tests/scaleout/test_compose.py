"""deploy/docker-compose.yml describes the set-up tests/scaleout/test_services.py starts for real:
Prefect and MLflow servers on PostgreSQL, MLflow's artifacts in an S3-compatible store, Redis for
dedupe's shared index, a Dask scheduler and workers, and a worker that sees only the URLs a user sets."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.scaleout
COMPOSE = REPO / "deploy" / "docker-compose.yml"


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_wires_prefect_and_mlflow_to_postgres_and_s3():
    svc = services()
    assert {"postgres", "redis", "minio", "prefect-server", "mlflow", "worker", "dask-scheduler", "dask-worker"} <= set(svc)
    prefect_db = svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and "@postgres:5432/prefect" in prefect_db
    assert "prefecthq/prefect:3.8.8" in svc["prefect-server"]["image"]  # the client's version: skew answers 422
    mlflow = " ".join(svc["mlflow"]["command"].split())
    assert "--backend-store-uri postgresql://" in mlflow and "@postgres:5432/mlflow" in mlflow
    assert "--artifacts-destination s3://" in mlflow and svc["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "v3.17.2" in svc["mlflow"]["image"]
    assert "CREATE DATABASE mlflow" in (REPO / "deploy" / "initdb" / "mlflow.sql").read_text()
    worker = svc["worker"]["environment"]
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api" and worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["FAMILY_DEDUPE_INDEX"].startswith("redis://redis:6379/")
    assert "tcp://dask-scheduler:8786" in svc["dask-worker"]["command"]
    for name, s in svc.items():  # every published port is on 127.0.0.1 only
        assert all(str(p).startswith("127.0.0.1:") for p in s.get("ports", [])), name
        for dep in s.get("depends_on", []):
            assert dep in svc, f"{name} depends on unknown service {dep}"


def test_docker_compose_config_accepts_it():
    if shutil.which("docker") is None:
        pytest.skip("docker not installed: the file is checked by the parser test only")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker has no compose plugin here: the file is checked by the parser test only")
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

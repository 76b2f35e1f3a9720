"""The family against shared servers: Prefect on PostgreSQL, MLflow on PostgreSQL with S3 artifacts.

This test starts, on 127.0.0.1 at free ports: a PostgreSQL 15 cluster from Debian's package (initdb,
databases `prefect` and `mlflow`), moto's S3-compatible server with a bucket `mlflow`, `prefect server
start` (with its services) on the `prefect` database (asyncpg), and `mlflow server` on the `mlflow` database (psycopg2)
with `--artifacts-destination s3://mlflow`. Then `family run` sees only the two variables a user sets,
PREFECT_API_URL and MLFLOW_TRACKING_URI.

The whole micro family, every stage (a second full micro run beside tests/flows/test_micro.py's,
~2-3 min on 2 cores): every backend path a user's run takes, Prefect task runs and artifacts, MLflow
parent/child runs, metrics, params, artifacts in S3 and the registered members.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from flows.processes import free_port, stop_group
from tests.conftest import REPO
from tests.scaleout.servers import moto_s3, postgres_server, start, wait_http

pytestmark = [pytest.mark.scaleout, pytest.mark.services, pytest.mark.slow]

S3 = {"AWS_ACCESS_KEY_ID": "family", "AWS_SECRET_ACCESS_KEY": "family-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def test_micro_family_on_prefect_and_mlflow_servers_backed_by_postgres_and_s3(tmp_path):
    pytest.importorskip("psycopg2", reason="psycopg2-binary not installed (pip install -e '.[test]')")
    import boto3
    import psycopg2

    with postgres_server(tmp_path / "pg", ("prefect", "mlflow")) as pg, moto_s3(tmp_path / "s3", "mlflow") as s3_url:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        prefect_port, mlflow_port = free_port(), free_port()
        prefect_env = dict(base, PREFECT_HOME=str(tmp_path / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                           PREFECT_API_DATABASE_CONNECTION_URL=pg.replace("postgresql://", "postgresql+asyncpg://") + "/prefect",
                           PREFECT_UI_ENABLED="false")
        # with its services: task runs reach the database through the task run recorder
        prefect = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                        tmp_path / "prefect.log", env=prefect_env)
        mlflow_env = dict(base, MLFLOW_S3_ENDPOINT_URL=s3_url, **S3)
        mlflow = start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                        "--backend-store-uri", f"{pg}/mlflow", "--artifacts-destination", "s3://mlflow", "--workers", "1"],
                       tmp_path / "mlflow.log", env=mlflow_env)
        try:
            api, tracking = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
            wait_http(f"{api}/health", prefect, tmp_path / "prefect.log", timeout_s=180)
            wait_http(f"{tracking}/health", mlflow, tmp_path / "mlflow.log", timeout_s=180)

            # what a user sets: the two URLs (and a home); nothing of the servers' own settings
            env = dict(base, PREFECT_API_URL=api, MLFLOW_TRACKING_URI=tracking, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
            home = tmp_path / "home"
            proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--recipe", "micro", "--home", str(home)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert not (home / "mlflow.db").exists() and not (home / "prefect" / "prefect.db").exists(), "a local backend was used"

            # Prefect: the flow run and its stage task runs are rows of the Postgres database
            from flows.recipe import load_recipe

            want = set(load_recipe("micro").stages)
            deadline = time.monotonic() + 60  # the recorder writes task runs from their events, a moment later
            while True:
                with psycopg2.connect(f"{pg}/prefect") as con, con.cursor() as cur:
                    cur.execute("select state_type from flow_run where name like 'micro-%'")
                    flow_states = [r[0] for r in cur.fetchall()]
                    cur.execute("select name from task_run where state_type = 'COMPLETED'")
                    tasks = {r[0] for r in cur.fetchall()}
                if want <= tasks or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert flow_states == ["COMPLETED"]
            assert want <= tasks, tasks

            # MLflow: the parent run and one child per stage in Postgres, their artifacts in the S3 bucket
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking)
            exp = client.get_experiment_by_name("family-micro")
            runs = client.search_runs([exp.experiment_id])
            stages = {r.data.tags.get("stage") for r in runs} - {None}
            assert want <= stages, want - stages
            pretrain = next(r for r in runs if r.data.tags.get("stage") == "pretrain")
            assert len(client.get_metric_history(pretrain.info.run_id, "train/loss")) >= 10
            with psycopg2.connect(f"{pg}/mlflow") as con, con.cursor() as cur:
                cur.execute("select count(*) from runs")
                assert cur.fetchone()[0] == len(runs)
            s3 = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in S3.items() if k != "AWS_DEFAULT_REGION"},
                              region_name="us-east-1")
            keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow") for o in page.get("Contents", [])]
            assert any(pretrain.info.run_id in k and k.endswith("manifest.json") for k in keys), keys[:20]
            assert any(k.endswith(".md") and "samples" in k for k in keys)
            # the registered members: versions in Postgres, their model directories in S3
            registered = {m.name for m in client.search_registered_models()}
            assert {"micro-chat", "micro-embed", "micro-vl"} <= registered, registered
            version = client.search_model_versions("name = 'micro-chat'")[0]
            assert version.source and any(version.run_id in k and k.endswith("model.safetensors") for k in keys)
        finally:
            stop_group(mlflow)
            stop_group(prefect)

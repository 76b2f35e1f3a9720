"""deploy/prefect.yaml, as an operator uses it: deployed with `prefect deploy` to a Prefect server
started here on 127.0.0.1, and one run of its nightly deployment executed by a real `prefect worker`
on a `process` work pool (the run's parameters point it at the toy recipe, so it takes seconds)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.processes import free_port
from storage.artifacts import ArtifactStore
from storage.home import Home

pytestmark = [pytest.mark.schedule, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TOY = str(Path(__file__).parent / "toy" / "toy.yaml")
PREFECT = str(Path(sys.executable).parent / "prefect")


def api(url: str, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.skipif(shutil.which(PREFECT) is None and not Path(PREFECT).exists(), reason="the prefect CLI is not installed")
def test_prefect_yaml_deploys_and_a_process_worker_runs_it(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "home"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", FAMILY_FORGE_DIR=str(REPO), FAMILY_HOME=str(home), PYTHONPATH=str(REPO))
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("wb"), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                api(url, "/health")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)

        def prefect(*args: str, timeout: float = 300) -> str:
            proc = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            assert proc.returncode == 0, f"prefect {' '.join(args)}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
            return proc.stdout

        for pool in ("cpu-pool", "gpu-pool"):
            prefect("work-pool", "create", pool, "--type", "process")
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
        deployments = {d["name"]: d for d in api(url, "/deployments/filter", {})}
        assert set(deployments) == {"nightly", "small-gpu"}
        nightly = deployments["nightly"]
        assert nightly["work_pool_name"] == "cpu-pool" and nightly["schedules"], "the nightly cron schedule"
        assert nightly["job_variables"]["env"]["FAMILY_HOME"] == str(home)

        run = api(url, f"/deployments/{nightly['id']}/create_flow_run",
                  {"parameters": {"recipe": TOY, "refresh": ["source"], "track": False}})
        prefect("worker", "start", "--pool", "cpu-pool", "--run-once", timeout=300)
        state = api(url, f"/flow_runs/{run['id']}")["state"]
        assert state["type"] == "COMPLETED", state
        store = ArtifactStore(Home(home))
        assert set(store.stages()) == {"source", "square", "total"}
        assert json.loads(Path(store.history("total")[0].artifacts()["total"].path).read_text())["total"] == 285
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

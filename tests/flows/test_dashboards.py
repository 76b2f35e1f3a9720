"""The dashboards as a user sees them: `family ui` on a home with a finished `family run`, rendered
in headless Chromium. The Prefect UI shows the family's flow run with one task run per stage and
its artifacts; MLflow's model-training view shows the stage runs with their metrics and the
registered models; `family ui` prints deep links to them."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TOY = str(Path(__file__).parent / "toy" / "toy.yaml")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(url: str, needles: list[str], timeout_s: float = 120.0) -> str:
    """The DOM text of `url` after its scripts ran, once every needle shows (polling with longer
    virtual-time budgets: the single-page apps fetch their data after the first paint)."""
    deadline, budget, dom = time.monotonic() + timeout_s, 5000, ""
    while time.monotonic() < deadline:
        proc = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               f"--virtual-time-budget={budget}", "--dump-dom", url], capture_output=True, text=True, timeout=120)
        dom = proc.stdout
        if all(n in dom for n in needles):
            return dom
        budget = min(budget * 2, 40000)
    missing = [n for n in needles if n not in dom]
    raise AssertionError(f"{url}: {missing} not shown after {timeout_s:.0f} s; page text: {re.sub(r'<[^>]+>', ' ', dom)[:2000]}")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)")
def test_family_ui_shows_the_run_in_both_dashboards(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ)
    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(k, None)
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--recipe", TOY, "--home", str(home)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]

    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--home", str(home), "--prefect-port", "0", "--mlflow-port", "0"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        links: dict[str, str] = {}
        deadline = time.monotonic() + 180
        while "registered models" not in links and time.monotonic() < deadline:
            line = ui.stdout.readline()
            if not line:
                raise AssertionError(f"family ui exited: {ui.stderr.read()[-2000:]}")
            m = re.match(r"\s*(latest flow run|MLflow runs|registered models)\s+(\S+)", line)
            if m:
                links[m.group(1)] = m.group(2)
        assert set(links) == {"latest flow run", "MLflow runs", "registered models"}, links
        assert "workflowType=machine_learning" in links["MLflow runs"]  # not MLflow 3's GenAI traces page

        # Prefect: the flow run, with one task run per stage, each task run by its stage's name, and the
        # stages' keyed artifacts (summary, MLflow link, progress)
        prefect = links["latest flow run"].split("/runs/")[0]
        dom = render(links["latest flow run"], ["Completed", "3 Task runs"])
        assert re.search(r"toy-\d{8}-\d{6}", dom), "the flow run's name"
        req = urllib.request.Request(f"{prefect}/api/task_runs/filter", data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            task_runs = {t["name"]: t["id"] for t in json.loads(r.read())}
        assert set(task_runs) == {"source", "square", "total"}
        for name, task_id in task_runs.items():
            render(f"{prefect}/runs/task-run/{task_id}", [f"Task Run: {name}"])
        render(f"{prefect}/artifacts", ["toy-source", "toy-square", "toy-total", "toy-run", "toy-square-mlflow"])

        # MLflow, model-training view: the family's experiment with the parent run and one run per stage;
        # a stage run's page with its metrics; the registered member
        dom = render(links["MLflow runs"], ["family-toy", "Model training", "matching runs"])
        assert re.search(r"toy-\d{8}-\d{6}", dom), "the run of `family run` (the stage runs are nested under it)"
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        exp = client.get_experiment_by_name("family-toy")
        square = client.search_runs([exp.experiment_id], "tags.stage = 'square'")[0]
        mlflow = links["MLflow runs"].split("/#/")[0]
        render(f"{mlflow}/#/experiments/{exp.experiment_id}/runs/{square.info.run_id}", ["square", "sum", "resumed_from"])
        render(links["registered models"], ["toy-total"])
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)

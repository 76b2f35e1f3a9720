"""Scheduled incremental runs, end to end: `family serve` on a recipe that crawls a real HTTP site
on 127.0.0.1 whose pages change between runs. The server's scheduler creates the runs (an ephemeral
API server has no scheduler: before, a served deployment never fired), the second scheduled run
fetches only the seed and the new page, the dedupe index carries the old documents, and exactly the
stages the new data changes rebuild; a third run with nothing new rebuilds nothing after the crawl."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.stages.web_server import Reply, SiteServer, html_page

pytestmark = [pytest.mark.schedule, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
WORDS = ("parser", "module", "function", "returns", "string", "value", "object", "default", "argument", "list")


def prose(topic: str, n: int = 80) -> str:
    """Enough distinct sentences that the filter keeps the page and the dedupe keeps it apart."""
    return " ".join(f"The {topic} {WORDS[i % 10]} number {i} takes the {WORDS[(i * 7) % 10]} and gives a result."
                    for i in range(n))


def recipe_file(tmp_path: Path, seed: str) -> Path:
    micro = yaml.safe_load((REPO / "flows" / "recipes" / "micro.yaml").read_text())
    stages = {
        "crawl": {"source": "web", "seeds": [seed], "allow_hosts": ["127.0.0.1"], "per_host_delay_s": 0.0,
                  "use_sitemaps": False, "timeout_s": 5.0},
        "extract": micro["stages"]["extract"], "dedupe": {}, "filter": micro["stages"]["filter"],
    }
    path = tmp_path / "sched.yaml"
    path.write_text(yaml.safe_dump({"name": "sched", "seed": 0, "device": "cpu", "stages": stages}))
    return path


def api(url: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def completed_runs(url: str) -> list[dict]:
    try:
        runs = api(url, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                              "sort": "EXPECTED_START_TIME_ASC"})
    except OSError:  # a busy server (SQLite under a running flow): ask again on the next poll
        return []
    return [r for r in runs if r.get("deployment_id")]


def wait_for(cond, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"family serve exited ({proc.returncode}) while waiting for {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def stage_states(home: Path) -> dict[str, dict]:
    report = json.loads((home / "state" / "last_report.json").read_text())
    return {s: r["status"] for s, r in report["stages"].items()}


def test_scheduled_runs_fire_and_rebuild_only_what_new_pages_change(tmp_path):
    pages = {"/": html_page("/a", "/b", text=prose("index")), "/a": html_page(text=prose("alpha")),
             "/b": html_page(text=prose("beta")), "/robots.txt": Reply(status=404)}
    site = SiteServer(pages)
    try:
        home = tmp_path / "home"
        env = dict(os.environ, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1", PREFECT_RUNNER_POLL_FREQUENCY="1",
                   PREFECT_HOME=str(tmp_path / "prefect"))
        env.pop("PREFECT_API_URL", None)
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--recipe", str(recipe_file(tmp_path, site.url("/"))),
                                 "--home", str(home), "--interval", "15", "--name", "sched"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            info_file = home / "prefect" / "serve.json"
            info = json.loads(wait_for(lambda: info_file.is_file() and info_file.read_text(), 120, "the server", proc))
            url = info["api_url"]

            runs = wait_for(lambda: completed_runs(url), 150, "the first scheduled run", proc)
            assert runs[0]["auto_scheduled"], "created by the scheduler, not by hand"
            assert set(stage_states(home).values()) == {"built"}
            first = [p for _, p in site.log]
            assert {"/", "/a", "/b"} <= set(first)

            # the site changes: a new page, linked from the seed
            site.routes["/"] = html_page("/a", "/b", "/c", text=prose("index"))
            site.routes["/c"] = html_page(text=prose("gamma"))
            n_seen = len(site.log)
            runs = wait_for(lambda: len(completed_runs(url)) >= 2 and completed_runs(url), 120, "the second run", proc)
            second = [p for _, p in site.log[n_seen:]]
            assert sorted(set(second) - {"/robots.txt"}) == ["/", "/c"], "only the seed and the new page are fetched"
            assert stage_states(home) == {"crawl": "built", "extract": "built", "dedupe": "built", "filter": "built"}
            dedupe = json.loads(next((home / "artifacts" / "dedupe").glob("*/result.json")).read_text())
            assert dedupe["metrics"]

            # nothing new: the crawl reruns (refresh), writes the same pages, and everything after it is reused
            wait_for(lambda: len(completed_runs(url)) >= 3, 120, "the third run", proc)
            assert stage_states(home) == {"crawl": "built", "extract": "reused", "dedupe": "reused", "filter": "reused"}
            assert all(r["auto_scheduled"] for r in completed_runs(url))
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        site.close()

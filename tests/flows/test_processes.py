"""`family run` as a user runs it, in real processes on the ephemeral Prefect server of the home:
kill -9 mid-stage then resume; the Prefect database in the home; two concurrent runs on one home."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore
from storage.home import Home

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TOY = str(Path(__file__).parent / "toy" / "toy.yaml")


def family(home: Path, *args: str, calls: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, FAMILY_HOME=str(home), TOY_CALLS_LOG=str(calls), PYTHONPATH=str(REPO))
    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(k, None)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--recipe", TOY, *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def processes_of(home: Path) -> list[int]:
    """Live processes started for this home (found by FAMILY_HOME in their environment)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"FAMILY_HOME={home}\0".encode() in env.read_bytes():
                found.append(int(env.parent.name))
        except OSError:
            pass
    return found


def test_kill_9_mid_stage_then_resume(tmp_path):
    home, calls = tmp_path / "home", tmp_path / "calls.log"
    slow = ["--set", "square.steps=40", "--set", "square.step_sleep_s=0.25"]
    p = family(home, *slow, calls=calls)
    work = Home(home).work / "square"
    deadline = time.monotonic() + 120
    while not list(work.glob("*/ckpt/step-0000000[3-9]")):  # a few checkpoints in
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "square never started"
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 10
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(home) == [], "the run's API server died with it"

    store = ArtifactStore(Home(home))
    assert store.history("source"), "the finished upstream stage stays published"
    assert store.history("square") == [] and store.history("total") == [], "nothing half-written is visible"
    assert list(work.glob("*/out/squares/squares.json")), "the half-written output exists only in the work dir"

    p = family(home, *slow, calls=calls)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert "resumes from checkpoint" in err
    assert calls.read_text().split() == ["source", "square", "total"]  # source ran once, before the kill
    square = store.history("square")[0]
    assert square.result["metrics"]["resumed_from"] >= 3  # continued, not restarted
    assert json.loads(Path(square.artifacts()["squares"].path, "squares.json").read_text())[3] == 9

    # the runs and their artifacts are in the home's own Prefect database
    db = sqlite3.connect(Home(home).prefect_home / "prefect.db")
    states = [r[0] for r in db.execute("select state_type from flow_run")]
    assert states.count("COMPLETED") == 1 and len(states) == 2
    keys = {r[0] for r in db.execute("select key from artifact where key is not null")}
    assert {"toy-square", "toy-square-mlflow", "toy-square-progress", "toy-run"} <= keys
    tasks = {r[0] for r in db.execute("select name from task_run")}
    assert {"source", "square", "total"} <= tasks


def test_two_concurrent_runs_never_build_one_stage_twice(tmp_path):
    home, calls = tmp_path / "home", tmp_path / "calls.log"
    slow = ["--set", "square.steps=6", "--set", "square.step_sleep_s=0.5", "--no-track"]
    a = family(home, *slow, calls=calls)
    time.sleep(1.0)
    b = family(home, *slow, calls=calls)
    for p in (a, b):
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    ran = calls.read_text().split()
    assert sorted(ran) == ["source", "square", "total"], f"each stage body ran once, got {ran}"
    assert len(ArtifactStore(Home(home)).history("square")) == 1


SERVER_ONLY = """
import sys
from pathlib import Path
from flows.prefect_env import api_server, configure
from storage.home import Home
home = Home(Path(sys.argv[1]))
configure(home, use_server=False)
with api_server(home) as url:
    print(url)
"""


def test_three_api_servers_starting_at_once_on_a_fresh_home(tmp_path):
    """Each starting server migrates the home's SQLite database; started together they used to race
    ("Application startup failed"). They now start one at a time and all come up."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["PYTHONPATH"] = str(REPO)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # no migrated template yet: each server would migrate
    procs = [subprocess.Popen([sys.executable, "-c", SERVER_ONLY, str(tmp_path / "home")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and out.startswith("http://127.0.0.1:"), err


def test_a_fresh_home_starts_its_server_from_the_users_migrated_database(tmp_path):
    """The first server on a fresh home migrates its database (~8 s) and keeps a copy in the user's
    cache; the next fresh home starts from that copy: Prefect's schema and block types, no runs. A
    damaged copy is dropped, not copied."""
    import importlib.metadata

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / "cache"))
    template = tmp_path / "cache" / "family-forge" / f"prefect-{importlib.metadata.version('prefect')}.db"

    def serve(name: str) -> Path:
        p = subprocess.run([sys.executable, "-c", SERVER_ONLY, str(tmp_path / name)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0 and p.stdout.startswith("http://127.0.0.1:"), p.stderr[-2000:]
        return Home(tmp_path / name).prefect_home / "prefect.db"

    def revision_and_runs(db: Path) -> tuple[str, int, int]:
        con = sqlite3.connect(db)
        try:
            return (con.execute("select version_num from alembic_version").fetchone()[0],
                    con.execute("select count(*) from flow_run").fetchone()[0],
                    con.execute("select count(*) from block_type").fetchone()[0])
        finally:
            con.close()

    def block_ids(db: Path) -> set[str]:
        con = sqlite3.connect(db)
        try:
            return {r[0] for r in con.execute("select id from block_type")}
        finally:
            con.close()

    first = serve("a")
    assert template.is_file()
    revision, runs, block_types = revision_and_runs(template)
    assert runs == 0 and block_types > 0 and revision_and_runs(first)[0] == revision
    second = serve("b")
    assert revision_and_runs(second) == (revision, 0, block_types)
    assert block_ids(second) == block_ids(template) == block_ids(first), "b started from a's copy"

    # a damaged copy is dropped, not copied into a home (the server then migrates and saves a new one)
    from flows.prefect_env import seed_database
    good = template.read_bytes()
    template.write_bytes(good[:4096])  # a truncated database
    fresh = tmp_path / "c" / "prefect.db"
    fresh.parent.mkdir()
    assert not seed_database(fresh, template) and not template.exists() and not fresh.exists()
    template.write_bytes(good)
    assert seed_database(fresh, template) and block_ids(fresh) == block_ids(first)
    assert not seed_database(fresh, template), "a home with a database keeps it"

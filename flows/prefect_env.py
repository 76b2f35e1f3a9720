"""Point Prefect at the home before it is imported: its database lives in `<home>/prefect`.

With no server running, `family run` starts a temporary API server on the home's SQLite database
(what Prefect calls the ephemeral server, but started by us so that it dies with the run, even on
SIGKILL), so `family ui` later shows every past run. If `family ui` is running for this home, its
API URL is recorded in `<home>/prefect/server.json` and runs talk to it instead (no start-up cost).
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flows.processes import die_with_parent, free_port, stop_group
from storage.home import Home


def server_url(home: Home) -> str | None:
    """The API URL of a live `family ui` Prefect server for this home, if any."""
    info = home.prefect_home / "server.json"
    if not info.exists():
        return None
    try:
        url = json.loads(info.read_text())["api_url"]
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return url if r.status == 200 else None
    except (OSError, ValueError, KeyError):
        return None


def configure(home: Home, use_server: bool = True) -> None:
    home.ensure()
    os.environ["PREFECT_HOME"] = str(home.prefect_home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
    url = server_url(home) if use_server else None
    if url:
        os.environ["PREFECT_API_URL"] = url


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            if log_file is not None:
                lines = log_file.read_text(errors="replace").strip().splitlines() if log_file.exists() else []
            else:
                lines = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
            cause = next((ln for ln in reversed(lines) if "Error" in ln and "startup failed" not in ln), lines[-1] if lines else "")
            raise RuntimeError(f"Prefect API server exited with code {proc.returncode}: {cause.strip()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Prefect API server not healthy after {timeout_s:.0f} s")
        time.sleep(0.1)


def db_template() -> Path | None:
    """Where this user keeps a migrated, empty Prefect database for the installed Prefect version,
    or None when the server's database is not the home's SQLite file (a connection URL is set).

    A server starting on a fresh home spends ~8 of its ~13 s migrating an empty SQLite database
    through every revision; a copy of one already migrated starts in ~5 s. The copy holds only the
    schema and Prefect's own block types (taken right after the first server came up, before any
    run), so a home started from it is the same as one that migrated itself."""
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "family-forge"
    return cache / f"prefect-{importlib.metadata.version('prefect')}.db"


def seed_database(db: Path, template: Path | None) -> bool:
    """Copy the template into a home that has no database yet; whether it did (best effort: a
    failed copy leaves no file and the server migrates as before)."""
    if template is None or db.exists() or not template.is_file():
        return False
    try:  # a template that is not a migrated database is dropped (the server then migrates, and saves a new one)
        con = sqlite3.connect(f"file:{template}?mode=ro", uri=True)
        try:
            ok = con.execute("pragma quick_check").fetchone()[0] == "ok" and con.execute(
                "select count(*) from alembic_version").fetchone()[0] == 1
        finally:
            con.close()
    except sqlite3.Error:
        ok = False
    if not ok:
        template.unlink(missing_ok=True)
        return False
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, tmp)
        os.replace(tmp, db)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def save_template(db: Path, template: Path) -> None:
    """A consistent copy of the just-migrated database (SQLite's backup API: the server is live),
    written beside the template and renamed into place; best effort."""
    tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        src, dst = sqlite3.connect(f"file:{db}?mode=ro", uri=True), sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        os.replace(tmp, template)
    except (OSError, sqlite3.Error):
        tmp.unlink(missing_ok=True)


@contextmanager
def api_server(home: Home, timeout_s: float = 120.0, services: bool = False) -> Iterator[str]:
    """The API URL of a Prefect server for this home: `family ui`'s if live, else a temporary one.

    A temporary server is ephemeral (no background services) unless `services`: a schedule needs
    the scheduler service to create its flow runs, which an ephemeral server does not run (a served
    deployment then shows an active schedule and never fires).
    """
    url = os.environ.get("PREFECT_API_URL") or server_url(home)
    if url:
        os.environ["PREFECT_API_URL"] = url
        yield url
        return
    port = free_port()
    app_dir = Path(importlib.util.find_spec("prefect").submodule_search_locations[0]).parent
    env = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT__SERVER_FINAL="1")
    if not services:
        env["PREFECT__SERVER_EPHEMERAL"] = "1"
    cmd = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    # One server starts at a time per home: a starting server migrates the SQLite database, and two
    # runs starting together (each with its own server) would otherwise race on the migration.
    home.prefect_home.mkdir(parents=True, exist_ok=True)
    with open(home.prefect_home / "server-start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # the server's own log goes to a file: a pipe nobody reads fills up (64 KiB) and then blocks the
        # server mid-request (a server with services logs enough to get there within minutes)
        log_file = home.prefect_home / "api-server.log"
        # the server's database: Prefect's default, prefect.db in PREFECT_HOME (configure() sets it to the home's)
        db, template = Path(os.environ.get("PREFECT_HOME") or home.prefect_home) / "prefect.db", db_template()
        fresh = not db.exists()
        seeded = seed_database(db, template)
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_healthy(proc, url, timeout_s, log_file)
        except BaseException:
            stop_group(proc)
            if seeded and template is not None:  # a bad template must not break the next fresh home
                template.unlink(missing_ok=True)
            raise
        if fresh and not seeded and template is not None and not template.exists():
            save_template(db, template)
    try:
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        drain_api_logs()
        os.environ.pop("PREFECT_API_URL", None)
        stop_group(proc)


def drain_api_logs(timeout_s: float = 10.0) -> None:
    """Send the log records still queued for the API before the server goes away (else Prefect's
    log worker prints `--- Error logging to API --- All connection attempts failed` at exit)."""
    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.logging.handlers import APILogWorker

    try:
        APILogWorker.drain_all(timeout=timeout_s)
    except Exception:  # a log that cannot be sent must not fail a finished run
        pass

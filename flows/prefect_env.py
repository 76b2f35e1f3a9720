"""Point Prefect at the home before it is imported: its database lives in `<home>/prefect`.

With no server running, `family run` starts a temporary API server on the home's SQLite database
(what Prefect calls the ephemeral server, but started by us so that it dies with the run, even on
SIGKILL), so `family ui` later shows every past run. If `family ui` is running for this home, its
API URL is recorded in `<home>/prefect/server.json` and runs talk to it instead (no start-up cost).
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
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
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_healthy(proc, url, timeout_s, log_file)
        except BaseException:
            stop_group(proc)
            raise
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

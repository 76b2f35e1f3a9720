"""Point Prefect at the home before it is imported: its database lives in `<home>/prefect`.

With no server running, each `family run` starts Prefect's ephemeral server on the home's SQLite
database, so `family ui` later shows every past run. If `family ui` is running for this home, its
API URL is recorded in `<home>/prefect/server.json` and runs talk to it instead (no start-up cost).
"""
from __future__ import annotations

import json
import os
import urllib.request

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
    elif os.environ.get("PREFECT_API_URL", "").startswith("http://127.0.0.1") and not use_server:
        del os.environ["PREFECT_API_URL"]

"""Real servers for the scale-out tests, started from the machine's packages on 127.0.0.1 at a free port.

Each helper skips its test with the reason when the binary is absent (`.ci/run` installs them from
Debian's packages: redis-server, postgresql), and stops what it started, process group and all.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from flows.processes import free_port, stop_group


def binary(name: str, *extra_dirs: str) -> str:
    found = shutil.which(name) or next((p for d in extra_dirs for p in sorted(glob.glob(f"{d}/{name}")) if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip(f"{name} not installed (as root, .ci/run installs it: apt-get install redis-server postgresql)")
    return found


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.args[0]} did not listen on 127.0.0.1:{port} in {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not healthy in {timeout_s:.0f} s: {log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict | None = None, user: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            user=user)


@contextmanager
def redis_server(root: Path) -> Iterator[str]:
    """redis-server without persistence; yields its redis:// URL."""
    exe = binary("redis-server")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "redis.log"
    proc = start([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)], log)
    try:
        wait_port(port, proc, log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_group(proc)


@contextmanager
def postgres_server(root: Path, databases: tuple[str, ...]) -> Iterator[str]:
    """A fresh PostgreSQL cluster (initdb) listening on 127.0.0.1 only; yields postgresql://family@127.0.0.1:PORT.

    postgres refuses to run as root: as root the cluster belongs to the `postgres` user that
    Debian's package creates."""
    bindirs = ("/usr/lib/postgresql/*/bin",)
    initdb, postgres, createdb = binary("initdb", *bindirs), binary("postgres", *bindirs), binary("createdb", *bindirs)
    user = None
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        user = "postgres"
    if user:  # pytest's tmp folders are root's alone (0700): the cluster gets a folder postgres can enter
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="family-pg-"))
        shutil.chown(root, user)
    root.mkdir(parents=True, exist_ok=True)
    data, log = root / "pgdata", root / "postgres.log"
    init = subprocess.run([initdb, "-D", str(data), "-U", "family", "--auth=trust", "-E", "UTF8", "--no-sync"],
                          capture_output=True, text=True, user=user)
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
    port = free_port()
    proc = start([postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(root), "-c", "fsync=off",
                  "-c", "max_connections=200"], log, user=user)
    try:
        wait_port(port, proc, log)
        for db in databases:
            subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "family", db], check=True, capture_output=True)
        yield f"postgresql://family@127.0.0.1:{port}"
    finally:
        stop_group(proc)
        if user:
            shutil.rmtree(root, ignore_errors=True)


@contextmanager
def moto_s3(root: Path, bucket: str) -> Iterator[str]:
    """moto's S3-compatible server; yields its endpoint URL with `bucket` created."""
    pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[test]')")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "moto.log"
    proc = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/", proc, log, timeout_s=60)
        boto3.client("s3", endpoint_url=url, aws_access_key_id="family", aws_secret_access_key="family-secret",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield url
    finally:
        stop_group(proc)

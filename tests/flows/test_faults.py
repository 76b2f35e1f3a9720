"""The fault matrix, as a user meets it: `kill -9` of `family run`'s process group at a random point of
every stage of the `micro` recipe, then the same command again; and a disk that fills up while a
stage writes and publishes. (Two concurrent runs on one home: tests/flows/test_processes.py.)

After every kill, nothing half-written is visible (every published artifact matches its manifest to
the byte); the rerun completes; and the family is the same as an uninterrupted run's: every stage
has the same fingerprint and every output the same content hash (data stages byte-identical outputs,
training stages identical weights and model directories)."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.prefect_env import api_server
from storage.artifacts import ArtifactStore
from storage.home import Home

pytestmark = [pytest.mark.faults, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
TOY = str(Path(__file__).parent / "toy" / "toy.yaml")


def env_for(home: Path, api: str | None = None) -> dict[str, str]:
    env = dict(os.environ, FAMILY_HOME=str(home), PYTHONPATH=str(REPO))
    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(k, None)
    if api:
        env["PREFECT_API_URL"] = api
    return env


@contextlib.contextmanager
def one_api_server(root: Path):
    """One Prefect API server for every run of a test, as a user with `family ui` open has: each
    `family run` then talks to it instead of starting its own (~11 s a process, twenty times here).
    The server is the test's child, outside the run's process group, so it outlives every kill."""
    saved = {k: os.environ.pop(k, None) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    home = Home(root)
    os.environ["PREFECT_HOME"] = str(home.prefect_home)
    try:
        with api_server(home) as url:
            yield url
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def start(home: Path, *args: str, api: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *args, "--home", str(home), "--no-track"],
                            cwd=REPO, env=env_for(home, api), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def contents(home: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """stage -> (fingerprint, {output: content hash}) of the newest published artifact of each stage."""
    store = ArtifactStore(Home(home))
    out = {}
    for stage in store.stages():
        pub = store.history(stage)[0]
        out[stage] = (pub.fingerprint, {o: v["content"] for o, v in pub.manifest["outputs"].items()})
    return out


def assert_nothing_half_written(home: Path) -> None:
    store = ArtifactStore(Home(home))
    for stage in store.stages():
        for pub in store.history(stage):
            assert pub.problems(deep=True) == [], f"{stage}: a published artifact does not match its manifest"


def test_kill_9_at_a_random_point_of_every_stage_then_rerun(tmp_path):
    with one_api_server(tmp_path / "server") as api:
        kill_every_stage_then_rerun(tmp_path, api)


def kill_every_stage_then_rerun(tmp_path: Path, api: str) -> None:
    ref = tmp_path / "ref"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--recipe", "micro", "--home", str(ref), "--no-track"],
                          cwd=REPO, env=env_for(ref, api), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = contents(ref)
    seconds = {s: json.loads((ref / "artifacts" / s / fp / "result.json").read_text()).get("seconds", 1.0)
               for s, (fp, _) in expected.items()}

    home, rng = tmp_path / "faulted", random.Random(0)
    killed: list[str] = []
    for attempt in range(len(expected) + 5):
        p = start(home, "--recipe", "micro", api=api)
        running: list[str] = []

        def follow() -> None:
            for line in p.stderr:  # "  > sft        running (...)", maybe after a progress bar's "\r"
                running.extend(re.findall(r"(?:^|\r)\s+> (\w+)\s+running", line))

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        target, deadline = None, time.monotonic() + 600
        while p.poll() is None and time.monotonic() < deadline:
            fresh = [s for s in running if s not in killed]
            if fresh:
                target = fresh[0]
                time.sleep(rng.uniform(0.0, 1.2 * seconds.get(target, 1.0)))  # anywhere in the stage, or just after
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    killed.append(target)
                break
            time.sleep(0.05)
        p.wait(timeout=120)
        reader.join(timeout=10)
        assert_nothing_half_written(home)
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, f"attempt {attempt}: exit {p.returncode} without a kill"
    else:
        raise AssertionError(f"never completed; killed during {killed}")
    assert len(killed) >= len(expected) - 2, f"killed during {killed} of {list(expected)}"  # very short stages may end first
    got = contents(home)
    assert got == expected, {s: (got.get(s), expected[s]) for s in expected if got.get(s) != expected[s]}


def test_a_full_disk_while_publishing_is_one_line_and_keeps_what_was_published(tmp_path):
    """The artifacts and work folders of the home live on a 1 MiB tmpfs: a stage whose output does not
    fit fails with one line naming the device; the artifacts published before stay intact and usable."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        home = tmp_path / "home"
        home.mkdir()
        for d in ("artifacts", "work"):
            (disk / d).mkdir()
            (home / d).symlink_to(disk / d)
        ok = start(home, "--recipe", TOY)
        assert ok.wait(timeout=300) == 0, ok.stderr.read()[-2000:]
        before = contents(home)

        p = start(home, "--recipe", TOY, "--set", "source.n=400000")  # ~1.6 MB of Parquet: does not fit
        assert p.wait(timeout=300) == 1
        err = p.stderr.read()
        lines = [line for line in err.splitlines() if "no space left" in line]
        assert len(lines) == 1 and "source" in lines[0] and "Traceback" not in err, err[-3000:]
        assert contents(home) == before
        assert_nothing_half_written(home)
        assert (Path(ArtifactStore(Home(home)).history("total")[0].artifacts()["total"].path)).read_text()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)

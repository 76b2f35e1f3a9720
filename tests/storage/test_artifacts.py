"""The artifact store: atomic publish, manifest last, leases that survive nothing but their holder."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from storage.artifacts import ArtifactStore, LeaseBusy
from storage.home import Home


def _build(store: ArtifactStore, stage: str, fp: str, payload: str):
    with store.lease(stage, fp) as work:
        out = work / "out"
        out.mkdir(exist_ok=True)
        (out / "data").write_text(payload)
        return store.publish(stage, fp, out, {"data": {"n": 1}}, {"config": {}}, {"metrics": {"m": 1.0}}, {"up": "x"})


def test_publish_writes_manifest_last_with_hashes(tmp_path):
    store = ArtifactStore(Home(tmp_path).ensure())
    assert store.published("s", "fp1") is None
    pub = _build(store, "s", "fp1", "hello")
    again = store.published("s", "fp1")
    assert again is not None and again.manifest["upstream"] == {"up": "x"}
    files = {f["path"]: f for f in again.manifest["files"]}
    assert files["data"]["bytes"] == 5 and len(files["data"]["sha256"]) == 64
    assert {"config.json", "result.json"} <= set(files)
    assert again.artifacts()["data"].path == str(pub.dir / "data")
    assert again.result["metrics"] == {"m": 1.0}


def test_directory_without_manifest_does_not_exist(tmp_path):
    home = Home(tmp_path).ensure()
    store = ArtifactStore(home)
    d = home.stage_dir("s", "fp1")
    d.mkdir(parents=True)
    (d / "data").write_text("half")  # as if killed between rename and manifest
    assert store.published("s", "fp1") is None and store.history("s") == []
    _build(store, "s", "fp1", "full")  # the leftover is replaced
    assert (d / "data").read_text() == "full"


def test_moved_home_keeps_artifacts(tmp_path):
    store = ArtifactStore(Home(tmp_path / "a").ensure())
    _build(store, "s", "fp1", "x")
    os.rename(tmp_path / "a", tmp_path / "b")
    moved = ArtifactStore(Home(tmp_path / "b"))
    pub = moved.published("s", "fp1")
    assert pub is not None and open(pub.artifacts()["data"].path).read() == "x"


def _hold_lease(home_root, ready, release):
    store = ArtifactStore(Home.resolve(home_root))
    with store.lease("s", "fp"):
        ready.set()
        release.wait(10)


def test_lease_is_exclusive_across_processes_and_dies_with_holder(tmp_path):
    home = Home(tmp_path).ensure()
    store = ArtifactStore(home)
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lease, args=(str(tmp_path), ready, release))
    p.start()
    assert ready.wait(10)
    assert store.is_leased("s", "fp")
    with pytest.raises(LeaseBusy, match=f"pid {p.pid}"):
        with store.lease("s", "fp", wait_s=0.3):
            pass
    os.kill(p.pid, signal.SIGKILL)  # the kernel drops the flock with its holder
    p.join()
    t0 = time.monotonic()
    with store.lease("s", "fp", wait_s=5):
        assert time.monotonic() - t0 < 2
    assert not store.is_leased("s", "fp")

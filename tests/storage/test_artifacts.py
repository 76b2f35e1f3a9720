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


def _published_with(tmp_path, files: dict[str, bytes]):
    store = ArtifactStore(Home(tmp_path / "home").ensure())
    with store.lease("s", "fp1") as work:
        out = work / "out"
        (out / "model").mkdir(parents=True)
        for name, data in files.items():
            (out / "model" / name).write_bytes(data)
        return store, store.publish("s", "fp1", out, {"model": {}}, config={}, result={}, upstream={})


def test_an_intact_artifact_has_no_problems(tmp_path):
    _, pub = _published_with(tmp_path, {"a.bin": b"x" * 10, "b.json": b"{}"})
    assert pub.problems() == [] and pub.problems(deep=True) == []


@pytest.mark.parametrize("damage, says", [
    ("delete", "model/a.bin is missing"),
    ("truncate", "model/a.bin has 3 bytes, its manifest says 10"),
    ("same_size", "model/a.bin does not match its manifest's sha256"),
])
def test_problems_name_the_damaged_file(tmp_path, damage, says):
    _, pub = _published_with(tmp_path, {"a.bin": b"x" * 10, "b.json": b"{}"})
    f = pub.dir / "model" / "a.bin"
    pub.problems()  # checked once while intact: the cache must not hide a later change
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(b"xxx")
    else:
        time.sleep(0.01)
        f.write_bytes(b"y" * 10)
    (problem,) = pub.problems()
    assert problem.endswith(says) and str(pub.dir) in problem


def test_large_files_are_hashed_only_deep(tmp_path, monkeypatch):
    import storage.artifacts as artifacts

    monkeypatch.setattr(artifacts, "SMALL_FILE", 4)
    _, pub = _published_with(tmp_path, {"big.bin": b"x" * 10})
    (pub.dir / "model" / "big.bin").write_bytes(b"y" * 10)  # same size, other bytes
    assert pub.problems() == []  # cheap check: existence and size only
    assert pub.problems(deep=True) == [f"{pub.dir / 'model' / 'big.bin'} does not match its manifest's sha256"]


def test_a_manifest_that_does_not_parse_is_no_artifact(tmp_path):
    store, pub = _published_with(tmp_path, {"a.bin": b"x"})
    (pub.dir / "manifest.json").write_text("{trunc")
    assert store.published("s", "fp1") is None


def test_the_temporary_files_of_a_killed_attempt_are_not_published(tmp_path):
    """`.<name>.tmp-<pid>` is how every atomic write here starts; one left by an attempt killed before
    its rename must not become part of the artifact (it made a resumed tokenizer's `tokens` differ)."""
    store = ArtifactStore(Home(tmp_path / "home").ensure())
    with store.lease("s", "fp1") as work:
        out = work / "out"
        (out / "tokens").mkdir(parents=True)
        (out / "tokens" / "train.bin").write_bytes(b"12345")
        (out / "tokens" / ".train.bin.tmp-4242").write_bytes(b"123")  # from the killed attempt
        (out / "tokens" / ".keep").write_bytes(b"")  # a dotfile that is no temporary stays
        pub = store.publish("s", "fp1", out, {"tokens": {}}, config={}, result={}, upstream={})
    assert sorted(f["path"] for f in pub.manifest["files"] if f["path"].startswith("tokens/")) == ["tokens/.keep", "tokens/train.bin"]
    assert not (pub.dir / "tokens" / ".train.bin.tmp-4242").exists() and pub.problems(deep=True) == []

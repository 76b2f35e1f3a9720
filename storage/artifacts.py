"""The artifact store: content-addressed stage outputs, published atomically.

A stage's outputs are built in `<home>/work/<stage>/<fp>/out/`, then the directory is renamed to
`<home>/artifacts/<stage>/<fp>/` and `manifest.json` (files, sizes, sha256, upstream fingerprints)
is written last through a temporary file and `os.replace`. Readers trust only directories that hold a
manifest, so a crash at any point leaves either nothing visible or a complete artifact.

Two runs on one home never build the same stage at once: building takes an exclusive `flock` on
`<home>/work/<stage>/<fp>/lease`. The kernel drops the lock when its process dies (even by
SIGKILL), so a crashed run never leaves a stale lease behind.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from storage.home import Home

MANIFEST = "manifest.json"
SMALL_FILE = 1 << 20  # files up to this size are hashed on every check; larger ones by `family verify`
_VERIFIED: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) -> sha256 already checked


@dataclass(frozen=True)
class Artifact:
    """A pointer to one published output: never the bytes themselves."""

    kind: str  # the output's name, e.g. "docs_clean", "tokenizer", "base"
    path: str  # absolute path of the file or directory
    fingerprint: str  # fingerprint of the stage that produced it
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Artifact":
        return cls(kind=d["kind"], path=d["path"], fingerprint=d["fingerprint"], meta=d.get("meta", {}))


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(files: list[dict[str, Any]], output: str) -> str:
    """Hash of one output's bytes: its files' relative paths and sha256s (names, not locations)."""
    h = hashlib.sha256()
    for f in files:
        if f["path"] == output or f["path"].startswith(output + "/"):
            h.update(f"{f['path']}\0{f['sha256']}\n".encode())
    return h.hexdigest()[:16]


class LeaseBusy(RuntimeError):
    pass


@dataclass
class Published:
    """A stage artifact directory that has its manifest."""

    stage: str
    fingerprint: str
    dir: Path
    manifest: dict[str, Any]

    @property
    def result(self) -> dict[str, Any]:
        p = self.dir / "result.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @property
    def config(self) -> dict[str, Any]:
        p = self.dir / "config.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def problems(self, deep: bool = False) -> list[str]:
        """What no longer matches the manifest, one line per file ("" -> intact): a file missing, of
        another size, or (files up to SMALL_FILE bytes always, every file when `deep`) whose bytes
        hash differently. A file checked once is not hashed again while its size, mtime and inode
        stay the same."""
        found = []
        for f in self.manifest.get("files", []):
            path = self.dir / f["path"]
            try:
                st = path.stat()
            except OSError:
                found.append(f"{path} is missing")
                continue
            if st.st_size != f["bytes"]:
                found.append(f"{path} has {st.st_size} bytes, its manifest says {f['bytes']}")
                continue
            if deep or st.st_size <= SMALL_FILE:
                key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
                if _VERIFIED.get(key) != f["sha256"]:
                    if sha256_file(path) != f["sha256"]:
                        found.append(f"{path} does not match its manifest's sha256")
                        continue
                    _VERIFIED[key] = f["sha256"]
        return found

    def artifacts(self) -> dict[str, Artifact]:
        """Output name -> Artifact whose fingerprint is the hash of that output's content.

        Downstream stages key on content, not on the producer's fingerprint: a producer that reruns
        and writes the same bytes (a nightly crawl that found nothing new) rebuilds nothing after it.
        Paths are stored relative to the artifact directory, so a moved home keeps working.
        """
        return {
            name: Artifact(name, str(self.dir / o["path"]), o.get("content", self.fingerprint), o.get("meta", {}))
            for name, o in self.manifest.get("outputs", {}).items()
        }


class ArtifactStore:
    def __init__(self, home: Home):
        self.home = home

    # -- reading ---------------------------------------------------------------------------------

    def published(self, stage: str, fingerprint: str) -> Published | None:
        """The artifact of (stage, fingerprint) if its manifest exists (a manifest that does not parse
        counts as none). Its files are not checked here: see Published.problems."""
        d = self.home.stage_dir(stage, fingerprint)
        m = d / MANIFEST
        if not m.is_file():
            return None
        try:
            manifest = json.loads(m.read_text())
        except (OSError, ValueError):
            return None
        return Published(stage, fingerprint, d, manifest)

    def history(self, stage: str) -> list[Published]:
        """Every published artifact of a stage, newest first (none for a name that is no stage's)."""
        try:
            root = self.home.stage_dir(stage, "_").parent
        except ValueError:
            return []
        if not root.is_dir():
            return []
        found = [p for d in root.iterdir() if (p := self.published(stage, d.name)) is not None]
        return sorted(found, key=lambda p: p.manifest.get("published_at", 0), reverse=True)

    def stages(self) -> list[str]:
        root = self.home.artifacts
        return sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []

    # -- building --------------------------------------------------------------------------------

    @contextmanager
    def lease(self, stage: str, fingerprint: str, wait_s: float | None = None) -> Iterator[Path]:
        """Hold the exclusive right to build (stage, fingerprint); yields its work directory.

        Waits up to `wait_s` seconds (forever if None) for another holder, then raises LeaseBusy.
        """
        work = self.home.work_dir(stage, fingerprint)
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(work / "lease", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = None if wait_s is None else time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if deadline is not None and time.monotonic() > deadline:
                        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                        raise LeaseBusy(f"{stage} ({fingerprint}) is being built by another run (pid {holder})")
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield work
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def is_leased(self, stage: str, fingerprint: str) -> bool:
        lease = self.home.work_dir(stage, fingerprint) / "lease"
        if not lease.exists():
            return False
        fd = os.open(lease, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def publish(
        self,
        stage: str,
        fingerprint: str,
        out_dir: Path,
        outputs: dict[str, dict[str, Any]],
        config: dict[str, Any],
        result: dict[str, Any],
        upstream: dict[str, str],
    ) -> Published:
        """Move `out_dir` to its published place and write the manifest last.

        `outputs` maps output name -> meta; each output must exist as `out_dir/<name>` (file or dir).
        Call only while holding the lease.
        """
        for name in outputs:
            if not (out_dir / name).exists():
                raise FileNotFoundError(f"stage {stage} declared output {name!r} but wrote no {out_dir / name}")
        final = self.home.stage_dir(stage, fingerprint)
        if final.exists():  # left by a crash between rename and manifest: never visible, safe to drop
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", config)
        write_json_atomic(out_dir / "result.json", result)
        os.rename(out_dir, final)
        for stale in [p for p in final.rglob(".*") if ".tmp-" in p.name and p.is_file()]:
            stale.unlink()  # an atomic write of an attempt killed before its rename: never part of the artifact
        files = []
        for p in sorted(final.rglob("*")):
            if p.is_file():
                files.append({"path": str(p.relative_to(final)), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
        content = {name: content_hash(files, name) for name in outputs}
        manifest = {
            "stage": stage,
            "fingerprint": fingerprint,
            "published_at": time.time(),
            "upstream": upstream,
            "outputs": {name: {"path": name, "content": content[name], "meta": meta} for name, meta in outputs.items()},
            "files": files,
        }
        write_json_atomic(final / MANIFEST, manifest)
        return Published(stage, fingerprint, final, manifest)

"""Fingerprints: what decides whether a published artifact can be reused.

fingerprint(stage) = sha256 of
    {stage name, code hash, resolved config, {input name: upstream fingerprint}}

The code hash covers the stage's module and, transitively, every project module it imports from
`stages/`, `models/` and `storage/` (and from the stage's own top-level package, for user stages) (found by reading `import` statements, not by executing them). It
hashes the parsed syntax tree, so comments and formatting do not invalidate a cache but any change in
behaviour does. Nothing machine-specific (absolute paths, host names) goes in: moving the home or the
checkout keeps every cache.

Parsing ~80 modules costs ~1.7 s, which every `family` command that plans would pay: `use_digest_cache`
keeps each module's digest and imports in a JSON file (the home's state/code_digests.json), reused
while the file's inode, size, mtime and ctime are unchanged (a write to a file always moves its ctime,
which no tool can set back). As git does with its index ("racy git"), a file changed in the last two
seconds is not cached: file times tick in milliseconds, so a second write in the same tick could
otherwise keep the first write's times.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

PROJECT_PACKAGES = ("stages", "models", "storage")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@lru_cache(maxsize=None)
def _module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, AttributeError, ValueError):  # `from pkg.mod import name`: name is not a module
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from models import gpt`
    return found


# module -> [path, inode, size, mtime_ns, ctime_ns, digest, imported modules]: see use_digest_cache
_disk: dict[str, list] = {}
_disk_path: Path | None = None
_disk_dirty = False
RACY_NS = 2_000_000_000  # a file changed this recently (ns) is parsed every time, not cached


def use_digest_cache(path: Path) -> None:
    """Read (once per path) and from now on keep module digests in `path`; a missing or damaged file
    is an empty cache. `save_digest_cache` writes it back."""
    global _disk, _disk_path, _disk_dirty
    if _disk_path == path:
        return
    _disk_path, _disk_dirty = path, False
    try:
        loaded = json.loads(path.read_text())
        _disk = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        _disk = {}


def save_digest_cache() -> None:
    """Write the digest cache if it learned something: atomically (a concurrent writer's entries may
    be lost, never mixed), and silently not at all where its folder is missing or read-only."""
    global _disk_dirty
    if _disk_path is None or not _disk_dirty or not _disk_path.parent.is_dir():
        return
    tmp = _disk_path.with_name(f"{_disk_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(_disk, sort_keys=True))
        os.replace(tmp, _disk_path)
        _disk_dirty = False
    except OSError:
        tmp.unlink(missing_ok=True)


def _parsed(module: str, path: Path, package: str) -> tuple[str, list[str]]:
    """(sha256 of the syntax tree, every module it imports), from the digest cache when the file is
    unchanged."""
    global _disk_dirty
    st = path.stat()
    key = [str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    hit = _disk.get(module)
    if isinstance(hit, list) and len(hit) == 7 and hit[:5] == key and isinstance(hit[5], str) and isinstance(hit[6], list):
        return hit[5], [m for m in hit[6] if isinstance(m, str)]
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = sorted(_imported_modules(tree, package))
    digest = hashlib.sha256(ast.dump(tree).encode()).hexdigest()
    if _disk_path is not None and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
        _disk[module] = [*key, digest, imported]
        _disk_dirty = True
    return digest, imported


@lru_cache(maxsize=None)
def _module_digest(module: str) -> tuple[str, frozenset[str]]:
    path = _module_file(module)
    if path is None:
        return "", frozenset()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    digest, imported = _parsed(module, path, package)
    # project code, plus the module's own top-level package (a user stage's helper modules); the root
    # test comes first because find_spec imports a module's parents
    roots = set(PROJECT_PACKAGES) | {module.split(".")[0]}
    return digest, frozenset(m for m in imported if m.split(".")[0] in roots and _module_file(m))


def code_hash(module: str) -> str:
    """Hash of a module and every project module it imports, transitively."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        digest, deps = _module_digest(m)
        seen[m] = digest
        todo.extend(deps - seen.keys())
    return hashlib.sha256(canonical_json(sorted(seen.items())).encode()).hexdigest()[:16]


def code_modules(module: str) -> list[str]:
    """The modules `code_hash` covers (for explanations and tests)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_module_digest(m)[1] - seen)
    return sorted(seen)


def files_hash(paths: list[str]) -> str:
    """Content hash of user files named in a config (a directory: every file under it)."""
    h = hashlib.sha256()
    for raw in sorted(paths):
        p = Path(raw.split("::", 1)[0]).expanduser()  # "path::format" specs name a file too
        found = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        h.update(f"{raw}\0{len(found)}\n".encode())
        for f in found:
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0".encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest()[:16]


def fingerprint(stage: str, code: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    payload = {"stage": stage, "code": code, "config": config, "inputs": inputs}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def clear_cache() -> None:
    _module_digest.cache_clear()
    _module_file.cache_clear()

"""Fingerprints: what decides whether a published artifact can be reused.

fingerprint(stage) = sha256 of
    {stage name, code hash, resolved config, {input name: upstream fingerprint}}

The code hash covers the stage's module and, transitively, every project module it imports from
`stages/`, `models/` and `storage/` (and from the stage's own top-level package, for user stages) (found by reading `import` statements, not by executing them). It
hashes the parsed syntax tree, so comments and formatting do not invalidate a cache but any change in
behaviour does. Nothing machine-specific (absolute paths, host names) goes in: moving the home or the
checkout keeps every cache.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
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


@lru_cache(maxsize=None)
def _module_digest(module: str) -> tuple[str, frozenset[str]]:
    path = _module_file(module)
    if path is None:
        return "", frozenset()
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    # project code, plus the module's own top-level package (a user stage's helper modules)
    roots = set(PROJECT_PACKAGES) | {module.split(".")[0]}
    deps = {m for m in _imported_modules(tree, package) if m.split(".")[0] in roots and _module_file(m)}
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest(), frozenset(deps)


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

"""Fingerprints change exactly when config, inputs or code change, and never with the home's path."""
from __future__ import annotations

import shutil
import sys

import pytest

from storage import fingerprint as fpmod
from storage.fingerprint import code_hash, code_modules, fingerprint


def test_fingerprint_depends_on_config_inputs_code_only():
    base = fingerprint("sft", "code1", {"lr": 1e-3, "steps": 10}, {"base": "abc"})
    assert fingerprint("sft", "code1", {"steps": 10, "lr": 1e-3}, {"base": "abc"}) == base  # key order irrelevant
    assert fingerprint("sft", "code1", {"lr": 2e-3, "steps": 10}, {"base": "abc"}) != base
    assert fingerprint("sft", "code1", {"lr": 1e-3, "steps": 10}, {"base": "abd"}) != base
    assert fingerprint("sft", "code2", {"lr": 1e-3, "steps": 10}, {"base": "abc"}) != base
    assert fingerprint("dpo", "code1", {"lr": 1e-3, "steps": 10}, {"base": "abc"}) != base


@pytest.fixture
def fake_pkg(tmp_path, monkeypatch):
    """A throwaway top-level package `fakestage` with a stage module importing a helper module."""
    pkg = tmp_path / "fakestage"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("def f(x):\n    return x + 1\n")
    (pkg / "stage.py").write_text("from fakestage.helper import f\nfrom storage.parquet import read_table\n\ndef run():\n    return f(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fpmod.clear_cache()
    yield pkg
    fpmod.clear_cache()
    for m in [m for m in sys.modules if m.startswith("fakestage")]:
        del sys.modules[m]


def test_code_hash_follows_imports_and_ignores_comments(fake_pkg):
    mods = code_modules("fakestage.stage")
    assert "fakestage.helper" in mods and "storage.parquet" in mods and "storage.schemas" in mods
    h0 = code_hash("fakestage.stage")

    (fake_pkg / "stage.py").write_text((fake_pkg / "stage.py").read_text() + "\n# a comment only\n")
    fpmod.clear_cache()
    assert code_hash("fakestage.stage") == h0, "comments and formatting must not invalidate caches"

    (fake_pkg / "helper.py").write_text("def f(x):\n    return x + 2\n")
    fpmod.clear_cache()
    assert code_hash("fakestage.stage") != h0, "a change in an imported module must"


def test_code_hash_has_no_absolute_paths(fake_pkg, tmp_path, monkeypatch):
    h0 = code_hash("fakestage.stage")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(fake_pkg, moved / "fakestage")
    for m in [m for m in sys.modules if m.startswith("fakestage")]:
        del sys.modules[m]
    monkeypatch.syspath_prepend(str(moved))
    fpmod.clear_cache()
    assert code_hash("fakestage.stage") == h0

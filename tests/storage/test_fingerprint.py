"""Fingerprints change exactly when config, inputs or code change, and never with the home's path."""
from __future__ import annotations

import json
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


@pytest.fixture
def own_digest_cache(monkeypatch):
    """This test's own digest cache state (the process may hold a home's)."""
    monkeypatch.setattr(fpmod, "_disk_path", None)
    monkeypatch.setattr(fpmod, "_disk", {})
    monkeypatch.setattr(fpmod, "_disk_dirty", False)


def test_the_digest_cache_reuses_unchanged_files_and_reparses_changed_ones(fake_pkg, tmp_path, monkeypatch, own_digest_cache):
    h0 = code_hash("fakestage.stage")  # no cache
    monkeypatch.setattr(fpmod, "RACY_NS", -1)  # the fixture's files were written just now: cache them anyway
    cache = tmp_path / "code_digests.json"
    fpmod.clear_cache()
    fpmod.use_digest_cache(cache)
    assert code_hash("fakestage.stage") == h0
    fpmod.save_digest_cache()
    saved = json.loads(cache.read_text())
    assert {"fakestage.stage", "fakestage.helper", "storage.parquet"} <= saved.keys()

    # the next process reads the file back and trusts an entry while its file's stat is unchanged
    saved["fakestage.helper"][5] = "0" * 64  # a digest only the cache can give
    cache.write_text(json.dumps(saved))
    monkeypatch.setattr(fpmod, "_disk_path", None)
    fpmod.clear_cache()
    fpmod.use_digest_cache(cache)
    assert code_hash("fakestage.stage") != h0, "the entry of an unchanged file must be used"

    (fake_pkg / "helper.py").write_text("def f(x):\n    return x + 1\n\n")  # the same code, one more byte
    fpmod.clear_cache()
    assert code_hash("fakestage.stage") == h0, "a changed file must be parsed again"

    cache.write_text("{not json")  # a damaged cache is an empty one
    monkeypatch.setattr(fpmod, "_disk_path", None)
    fpmod.clear_cache()
    fpmod.use_digest_cache(cache)
    assert code_hash("fakestage.stage") == h0


def test_a_file_changed_in_the_last_seconds_is_not_cached(fake_pkg, tmp_path, own_digest_cache):
    """File times tick in milliseconds: a second write in the same tick as the first could keep its
    times, so a just-written file is parsed every time (git's "racy git" rule)."""
    fpmod.clear_cache()
    fpmod.use_digest_cache(tmp_path / "code_digests.json")
    code_hash("fakestage.stage")
    assert "fakestage.helper" not in fpmod._disk and "fakestage.stage" not in fpmod._disk

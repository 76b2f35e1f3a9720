"""Dedupe stage: URL, exact and near duplicates dropped with their reason, CJK, incremental runs.

Documents are windows of real text: Python standard-library source files, and the CJK sample texts
of the standard library's codec tests. Near-duplicates are made here by editing a few words of a
copy (there is no labelled near-duplicate set in shared/data, see its README).
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from stages import dedupe
from stages.contract import StageError
from stages.text.minhash import ShingleSpec, jaccard, parallel_text_keys, shingle_hashes, text_keys
from stages.text.normalize import simplify_text
from storage import parquet
from tests.conftest import artifact, make_ctx

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CJK_DIR = STDLIB / "test" / "cjkencodings"
SOURCES = ["argparse.py", "textwrap.py", "difflib.py", "inspect.py", "pathlib.py", "tarfile.py", "typing.py", "calendar.py"]


def window(name: str, words: int = 250, start: int = 400) -> str:
    """`words` consecutive words of a standard-library file, past its licence header."""
    return " ".join((STDLIB / name).read_text().split()[start : start + words])


def edit(text: str, every: int) -> str:
    """Replace every `every`-th word with a different word."""
    words = text.split()
    return " ".join(f"edited{i}" if i % every == every // 2 else w for i, w in enumerate(words))


def doc(url: str, text: str) -> dict:
    return {
        "id": hashlib.sha256(url.encode()).hexdigest(),
        "url": url,
        "source": "text",
        "title": "",
        "text": text,
        "lang": "en",
        "lang_score": 1.0,
        "n_chars": len(text),
        "n_words": len(text.split()),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "cluster": "",
    }


def run_dedupe(root: Path, docs: list[dict], **cfg):
    docs_dir = root / "docs"
    parquet.write_table(docs, docs_dir / "part-00000.parquet", "docs")
    ctx = make_ctx(root / "run")
    ctx.state_dir = root / "state"  # shared across calls with the same root: the persisted index
    result = dedupe.run(dedupe.Config(**cfg), {"docs": artifact("docs", docs_dir)}, ctx)
    kept = parquet.read_table(ctx.output("docs_dedup"), "docs").to_pylist()
    excluded = {r["url"]: r for r in parquet.read_table(ctx.output("dedupe_excluded"), "excluded").to_pylist()}
    return result, kept, excluded


def test_normalize_url_variants_share_a_key():
    key = dedupe.normalize_url("https://docs.python.org/3/library/json.html?b=2&a=1")
    for variant in (
        "HTTPS://Docs.Python.org:443/3/library/json.html?a=1&b=2#module-json",
        "https://docs.python.org/3/library/json.html?a=1&utm_source=x&b=2&utm_medium=y",
        "https://docs.python.org/3/library/json.html/?a=1&b=2&fbclid=abc",
    ):
        assert dedupe.normalize_url(variant) == key
    assert dedupe.normalize_url("http://h.org/a/index.html") == dedupe.normalize_url("http://h.org/a/")
    assert dedupe.normalize_url("http://h.org:8080/a") != dedupe.normalize_url("http://h.org/a")
    assert dedupe.normalize_url("http://h.org/a?x=1") != dedupe.normalize_url("http://h.org/a?x=2")


def test_simplify_text_folds_case_numbers_punctuation_and_accents():
    assert simplify_text("Déjà-vu, 3.14!") == "deja vu 0"
    assert simplify_text("Ångström  résumé\u00a01,000.50\t٣٤") == "angstrom resume 0 0 0"


def test_exact_duplicates_keep_the_first_row_and_name_the_earlier_run():
    hashes = ["a", "b", "a", "c", "b", "a", "d"]
    got = sorted(dedupe.exact_duplicates(hashes, {"c": "old-c", "d": "old-d"}, threads=1))
    assert got == [(2, 0, None), (3, 3, "old-c"), (4, 1, None), (5, 0, None), (6, 6, "old-d")]
    assert dedupe.exact_duplicates([], {}) == []


def test_shingle_hash_jaccard_is_the_string_jaccard():
    a, b = window("argparse.py"), edit(window("argparse.py"), 25)
    spec = ShingleSpec()

    def grams(t: str) -> set[str]:
        w = simplify_text(t).split()
        return {" ".join(w[i : i + 5]) for i in range(len(w) - 4)}

    ga, gb = grams(a), grams(b)
    assert shingle_hashes(a, spec).size == len(ga)  # no collisions among the 32-bit hashes
    assert jaccard(shingle_hashes(a, spec), shingle_hashes(b, spec)) == pytest.approx(len(ga & gb) / len(ga | gb))


def test_parallel_text_keys_equal_single_process():
    texts = [window(name, 120, start) for name in SOURCES for start in (400, 600, 800)]
    texts.append(texts[0].upper().replace(" ", "  "))  # an exact duplicate after normalisation
    spec = ShingleSpec()
    h1, sig1, sh1 = text_keys(texts, spec)
    h2, sig2, sh2 = parallel_text_keys(texts, spec, workers=2, chunk_size=5)
    assert sig1.shape == (len(texts), 112) and sig1.dtype == np.uint32
    assert h1 == h2 and h1[0] == h1[-1] == hashlib.md5(simplify_text(texts[0]).encode()).hexdigest()
    assert len(set(h1)) == len(texts) - 1
    np.testing.assert_array_equal(sig1, sig2)
    assert all(np.array_equal(a, b) for a, b in zip(sh1, sh2))


def test_url_exact_and_near_duplicates_dropped_with_reason(tmp_path):
    base = [doc(f"https://example.org/{name}", window(name)) for name in SOURCES[:4]]
    argparse_doc, textwrap_doc, difflib_doc = base[0], base[1], base[2]
    url_dup = doc("HTTPS://example.org/argparse.py?utm_source=feed#top", window("calendar.py"))
    exact_dup = doc("https://mirror.org/textwrap", textwrap_doc["text"].upper().replace(".", " . "))
    near_dup = doc("https://mirror.org/difflib", edit(difflib_doc["text"], 40))
    assert jaccard(shingle_hashes(near_dup["text"], ShingleSpec()), shingle_hashes(difflib_doc["text"], ShingleSpec())) > 0.8

    result, kept, excluded = run_dedupe(tmp_path, [*base, url_dup, exact_dup, near_dup], incremental=False)

    assert [d["url"] for d in kept] == [d["url"] for d in base]
    assert excluded[url_dup["url"]]["reason"] == "duplicate_url"
    assert excluded[url_dup["url"]]["detail"] == argparse_doc["id"]
    assert excluded[exact_dup["url"]]["reason"] == "exact_duplicate"
    assert excluded[exact_dup["url"]]["detail"] == textwrap_doc["id"]
    assert excluded[near_dup["url"]]["reason"] == "near_duplicate"
    assert excluded[near_dup["url"]]["detail"] == difflib_doc["id"]
    assert all(r["stage"] == "dedupe" for r in excluded.values())
    assert {d["id"]: d["cluster"] for d in kept}[difflib_doc["id"]] == difflib_doc["id"]
    assert result.metrics == pytest.approx(
        {"docs_in": 7, "docs_out": 4, "url_dups": 1, "exact_dups": 1, "near_dups": 1, "carried": 0, "candidate_pairs": 1, "index_size": 0}
    )
    assert [row["remaining"] for row in result.tables["funnel"]] == [7, 6, 5, 4]


def test_distinct_texts_are_all_kept(tmp_path):
    docs = [doc(f"https://example.org/{n}/{s}", window(n, 200, s)) for n in SOURCES for s in (300, 700)]
    _, kept, excluded = run_dedupe(tmp_path, docs, incremental=False)
    assert len(kept) == len(docs) and not excluded


@pytest.mark.skipif(not CJK_DIR.is_dir(), reason="this Python has no test/cjkencodings texts")
def test_cjk_near_duplicate_found_by_character_shingles(tmp_path):
    zh = (CJK_DIR / "gb18030-utf8.txt").read_text()
    ja = (CJK_DIR / "euc_jp-utf8.txt").read_text()
    zh_copy = zh.replace("强大", "强劲", 1).replace("稳定", "稳健", 1)
    spec = ShingleSpec()
    # word shingles would see a handful of space-separated "words" per line; characters it is
    assert shingle_hashes(zh, spec).size > 150
    assert jaccard(shingle_hashes(zh, spec), shingle_hashes(zh_copy, spec)) > 0.9

    _, kept, excluded = run_dedupe(
        tmp_path, [doc("https://zh.example/a", zh), doc("https://ja.example/a", ja), doc("https://zh.example/b", zh_copy)], incremental=False
    )
    assert [d["url"] for d in kept] == ["https://zh.example/a", "https://ja.example/a"]
    assert excluded["https://zh.example/b"]["reason"] == "near_duplicate"


def test_incremental_run_dedupes_against_the_persisted_index(tmp_path):
    first = [doc(f"https://example.org/{n}", window(n)) for n in SOURCES[:3]]
    _, kept1, _ = run_dedupe(tmp_path, first)
    assert len(kept1) == 3 and (tmp_path / "state" / dedupe.INDEX_FILE).exists()

    fresh = doc("https://example.org/new", window(SOURCES[5]))
    near_old = doc("https://other.org/near", edit(first[0]["text"], 40))
    exact_old = doc("https://other.org/exact", first[1]["text"] + "  ")
    result, kept2, excluded = run_dedupe(tmp_path, [*first, fresh, near_old, exact_old])

    assert [d["url"] for d in kept2] == [d["url"] for d in first] + [fresh["url"]]
    assert (excluded[near_old["url"]]["reason"], excluded[near_old["url"]]["detail"]) == ("near_duplicate", first[0]["id"])
    assert (excluded[exact_old["url"]]["reason"], excluded[exact_old["url"]]["detail"]) == ("exact_duplicate", first[1]["id"])
    assert result.metrics["carried"] == 3 and result.metrics["index_size"] == 4
    index = parquet.read_table(tmp_path / "state" / dedupe.INDEX_FILE, dedupe.INDEX_SCHEMA)
    assert sorted(index.column("id").to_pylist()) == sorted(d["id"] for d in [*first, fresh])


def test_index_built_with_other_settings_is_refused(tmp_path):
    run_dedupe(tmp_path, [doc("https://example.org/a", window(SOURCES[0]))])
    with pytest.raises(StageError, match="dedupe: the index at .* was built with"):
        run_dedupe(tmp_path, [doc("https://example.org/a", window(SOURCES[0]))], word_ngram=3)


def test_zero_docs_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="dedupe: no documents in"):
        run_dedupe(tmp_path, [])

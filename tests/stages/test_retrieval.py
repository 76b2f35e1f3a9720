"""Retrieval data stage: passages chunked by meaning from real pydoc pages, query kinds, the page
split, mined negatives, the overlap report and bad input."""
from __future__ import annotations

import pytest

from stages import retrieval
from stages.contract import StageError
from stages.search.corpus import cut, overlap, page_passages, page_queries, page_split, paraphrase
from storage.parquet import read_table, write_table
from tests.conftest import artifact, make_ctx
from tests.stages.retrieval_toy import built, html_text


@pytest.fixture(scope="module")
def json_page():
    return page_passages("d0", "http://pydoc.localhost/3.11/json.html", "Python: package json", html_text("json"), 400)


def test_a_pydoc_page_is_cut_by_function_class_and_docstring_section(json_page):
    by_title = {}
    for p in json_page:
        by_title.setdefault(p.title, p)  # an entry's first chunk
    dumps = by_title["json.dumps"]
    assert dumps.kind == "function" and dumps.url.endswith("json.html#-dumps")
    assert dumps.text.startswith("json.dumps(obj, *, skipkeys=False") and "Serialize" in dumps.text
    assert by_title["json.JSONDecoder"].kind == "class" and by_title["json.JSONDecoder"].url.endswith("#JSONDecoder")
    assert "Method resolution order" not in by_title["json.JSONDecoder"].text  # pydoc's member listing is not prose
    assert by_title["json"].kind == "module"
    assert any(p.kind == "section" and "Pretty printing" in p.title for p in json_page)
    assert all(len(p.text) <= 400 for p in json_page)
    # a long entry is several passages, each with its head line
    dump_chunks = [p for p in json_page if p.entry == "json.dump"]
    assert len(dump_chunks) > 1 and all(p.text.startswith("json.dump(") for p in dump_chunks)


def test_queries_of_several_kinds_with_their_relevant_passages(json_page):
    queries = page_queries(json_page)
    kinds = {q.kind for q in queries}
    assert kinds == {"signature", "heading", "first_sentence", "paraphrase"}
    sig = next(q for q in queries if q.kind == "signature")  # "json.detect_encoding(b)": short signatures only
    first = next(p for p in json_page if p.id == sig.positive)
    assert first.text.startswith(sig.text) and sig.relevant[first.id] == 2
    dump = [q for q in queries if q.positive == next(p for p in json_page if p.entry == "json.dump").id]
    assert all(set(q.relevant.values()) == {1, 2} for q in dump)  # the other chunks count as relevant 1
    para = [q for q in queries if q.kind == "paraphrase"]
    firsts = [q for q in queries if q.kind == "first_sentence"]
    text = {p.id: p.text for p in json_page}
    mean = lambda qs: sum(overlap(q.text, text[q.positive]) for q in qs) / len(qs)  # noqa: E731
    assert mean(para) < mean(firsts) - 0.2


def test_paraphrase_drops_the_entry_name_and_rewrites_words():
    assert paraphrase("Return the smallest item of the heap.", ("heapq", "nsmallest")) == "how to give back the least entry of the heap"
    assert "dumps" not in paraphrase("Serialize obj with dumps to a JSON formatted str.", ("json", "dumps"))


def test_cut_keeps_sentences_whole_and_caps_pieces():
    text = "One sentence here. Another one follows. " * 10
    pieces = cut(text, 60, 3)
    assert len(pieces) == 3 and all(len(p) <= 60 for p in pieces) and all(p.endswith(".") for p in pieces)


def test_page_split_is_stable_and_near_the_fractions():
    urls = [f"http://x/{i}.html" for i in range(2000)]
    splits = [page_split(u, 0.1, 0.2) for u in urls]
    assert splits == [page_split(u, 0.1, 0.2) for u in urls]
    assert abs(splits.count("test") / 2000 - 0.2) < 0.03 and abs(splits.count("val") / 2000 - 0.1) < 0.03


def test_stage_splits_by_page_mines_train_negatives_and_reports_overlap():
    paths = built()
    passages = {p["id"]: p for p in read_table(paths["passages"], "passages").to_pylist()}
    pairs = read_table(paths["pairs"], "pairs").to_pylist()
    qrels = read_table(paths["qrels"], "qrels").to_pylist()
    page = lambda pid: passages[pid]["url"].split("#")[0]  # noqa: E731
    split_of_page = {}
    for p in passages.values():
        assert split_of_page.setdefault(page(p["id"]), p["split"]) == p["split"]
    relevant = {(r["query_id"], r["doc_id"]) for r in qrels}
    for r in pairs:
        assert passages[r["positive"]]["split"] == r["split"]  # a query asks about a page of its own split
        assert (r["id"], r["positive"]) in relevant
        if r["split"] == "train":
            assert r["negatives"] and all(passages[n]["split"] == "train" for n in r["negatives"])
            assert not any((r["id"], n) in relevant for n in r["negatives"])
        else:
            assert r["negatives"] == []
    assert {r["split"] for r in pairs} == {"train", "val", "test"}
    assert sum(r["split"] == "test" for r in pairs) <= 40  # max_eval_queries


def test_stage_bad_input_empty_corpus_and_pages_without_passages(tmp_path):
    docs = tmp_path / "docs"
    row = dict(id="1", url="http://x/a.html", source="web", title="", text="", lang="en", lang_score=1.0, n_chars=0,
               n_words=0, sha256="", cluster="")
    write_table([row], docs / "part-00000.parquet", "docs")
    with pytest.raises(StageError, match="gave no passages"):
        retrieval.run(retrieval.Config(), {"docs_clean": artifact("docs_clean", docs)}, make_ctx(tmp_path / "s"))
    ctx = make_ctx(tmp_path / "s2")
    result = retrieval.run(retrieval.Config(**{"max_eval_queries": 40}), {"docs_clean": artifact("docs_clean", built()["docs"])}, ctx)
    assert result.metrics["pages_without_passages"] == 0 and result.metrics["passages"] > 100
    assert 0 < result.metrics["test_low_overlap_share"] < 1 and "overlap <= 0.5" in result.summary
    assert not list((tmp_path / "s" / "out").glob("*/*.parquet"))  # the failed run published nothing

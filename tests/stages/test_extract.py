"""Extract stage on real pages (shared/data/trafilatura_html, pydoc) and on broken input."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import pydoc
from pathlib import Path

import pytest
import trafilatura

from stages import extract
from stages.contract import StageError
from storage import parquet
from tests.conftest import artifact, make_ctx

FETCHED = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def page(url: str, body: bytes, content_type: str = "text/html", status: int = 200) -> dict:
    return {
        "url": url,
        "final_url": url,
        "status": status,
        "content_type": content_type,
        "fetched_at": FETCHED,
        "body": body,
        "sha256": hashlib.sha256(body).hexdigest(),
    }


def evaldata(shared_data: Path) -> dict[str, dict]:
    folder = shared_data / "trafilatura_html"
    return {v["file"]: v for v in json.loads((folder / "evaldata.subset.json").read_text()).values()}


def extract_one(p: dict, **cfg) -> tuple[dict | None, dict | None]:
    return extract.extract_page(p, extract.Config(**cfg))


def pydoc_page(module_name: str) -> str:
    module = pydoc.importlib.import_module(module_name)
    html = pydoc.HTMLDoc()
    return html.page(pydoc.describe(module), html.document(module, module_name))


def test_shared_pages_main_text_title_and_language(shared_data):
    folder = shared_data / "trafilatura_html"
    truth = evaldata(shared_data)
    found_with = found_without = n_with = n_without = 0
    langs = {}
    for name, entry in truth.items():
        doc, dropped = extract_one(page(f"https://pages.test/{name}", (folder / name).read_bytes()))
        assert dropped is None, (name, dropped)
        found_with += sum(s in doc["text"] for s in entry["with"])
        found_without += sum(s in doc["text"] for s in entry["without"])
        n_with, n_without = n_with + len(entry["with"]), n_without + len(entry["without"])
        langs[name] = (doc["lang"], doc["lang_score"])
        if name == "en.wikipedia.org.tsne.html":
            assert "t-distributed stochastic neighbor embedding" in doc["title"].lower()
            assert "Given a set of high-dimensional objects" in doc["text"]
            assert "Categories:" not in doc["text"]
        if name == "stackoverflow.com.rust.html":
            assert doc["title"] == entry["title"]
    # trafilatura's own figures on these pages: recall 0.975, 8 of 89 boilerplate snippets kept
    assert found_with / n_with >= 0.95
    assert found_without / n_without <= 0.12
    assert langs["en.wikipedia.org.tsne.html"][0] == "en" and langs["en.wikipedia.org.tsne.html"][1] > 0.9
    assert langs["simplyscience.ch.erdoel.html"][0] == "de" and langs["simplyscience.ch.erdoel.html"][1] > 0.9
    assert all(0.0 <= score <= 1.0 for _, score in langs.values())


def test_pydoc_pages_keep_more_text_with_favor_recall():
    ours, default = 0, 0
    for name in ("json", "heapq"):
        html = pydoc_page(name)
        doc, _ = extract_one(page(f"http://127.0.0.1/{name}.html", html.encode()))
        ours += doc["n_chars"]
        default += len(trafilatura.extract(html) or "")
        assert doc["title"].startswith("Python:")
    assert "dumps(obj" in extract_one(page("http://127.0.0.1/json.html", pydoc_page("json").encode()))[0]["text"]
    assert ours > 2 * default  # measured: json 18.3k vs 5.8k chars, heapq 3.4k vs 1.7k


def test_latin1_page_decoded_from_the_charset_header():
    text = "Café crème brûlée: ein schönes Beispiel für Umlaute, äöü und ß, in einem ganzen Satz."
    body = f"<html><body><article><p>{text}</p></article></body></html>".encode("latin-1")
    doc, _ = extract_one(page("https://latin1.test/", body, "text/html; charset=ISO-8859-1"))
    assert doc["text"] == text and doc["lang"] == "de"
    # no header: the <meta charset> decides
    meta = b'<html><head><meta charset="iso-8859-1"></head>' + body[len(b"<html>") :]
    doc, _ = extract_one(page("https://latin1.test/", meta, "text/html"))
    assert doc["text"] == text
    # neither: not UTF-8, so charset detection guesses a single-byte code page (on so little text it
    # may pick cp1250 over latin-1, as browsers do); the page is kept, not dropped
    doc, _ = extract_one(page("https://latin1.test/", body, "text/html"))
    assert "ein schönes Beispiel für Umlaute" in doc["text"]


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (bytes(range(256)) * 40, "application/octet-stream", "undecodable"),
        (bytes(range(256)) * 40, "text/html", "undecodable"),
        (b"", "text/html", "no_main_text"),
        (b"   \n ", "text/plain", "no_main_text"),
        (b"<html><head><title>t</title><script>var x = 1;</script></head><body></body></html>", "text/html", "no_main_text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png", "unsupported_type"),
    ],
)
def test_unusable_pages_dropped_with_reason(body, content_type, reason):
    doc, dropped = extract_one(page("https://bad.test/x", body, content_type))
    assert doc is None
    assert (dropped["stage"], dropped["reason"]) == ("extract", reason)


def test_http_error_dropped():
    doc, dropped = extract_one(page("https://bad.test/404", b"<p>not found</p>", status=404))
    assert doc is None and dropped["reason"] == "http_error"


def test_malformed_html_never_crashes():
    paragraph = b"Unclosed markup still carries a paragraph of real text that is worth keeping here. "
    for body in (
        b"<html><body><div><p>" + paragraph * 4 + b"<b><i></div></p></span></table>",
        b"<<<>>><div><<p>>" + paragraph * 3 + b"</p></div>",
        b"<html><body><p>" + paragraph + b"\x00\xff<p>" + paragraph,
        b"<?xml version='1.0' encoding='utf-8'?><html><body><p>" + paragraph * 3 + b"</p></body></html>",
    ):
        doc, dropped = extract_one(page("https://broken.test/", body))
        assert (doc is not None and "real text" in doc["text"]) or dropped["reason"] in ("no_main_text", "extraction_error")


def test_plain_text_and_markdown_pass_through():
    md = "# Title here\n\nSome   markdown text,\r\n\n\n\nwith    extra   spaces.\u00a0End.  \n"
    doc, _ = extract_one(page("https://md.test/readme.md", md.encode(), "text/markdown"))
    assert doc["source"] == "markdown" and doc["title"] == "Title here"
    assert doc["text"] == "# Title here\n\nSome markdown text,\n\nwith extra spaces. End."
    code = "def f(x):\n    return x  # indentation kept, inner runs collapsed\n"
    doc, _ = extract_one(page("https://py.test/f.py", code.encode(), "text/plain; charset=utf-8"))
    assert doc["text"] == "def f(x):\n    return x # indentation kept, inner runs collapsed"


def test_stage_writes_docs_and_excluded_in_parallel(shared_data, tmp_path):
    folder = shared_data / "trafilatura_html"
    pages = [page(f"https://pages.test/{f.name}", f.read_bytes()) for f in sorted(folder.glob("*.html"))[:10]]
    pages += [page("https://bad.test/bin", bytes(range(256)) * 8, ""), page("https://bad.test/empty", b"")]
    parquet.write_table(pages[:7], tmp_path / "pages" / "part-00000.parquet", "pages")
    parquet.write_table(pages[7:], tmp_path / "pages" / "part-00001.parquet", "pages")
    ctx = make_ctx(tmp_path / "stage")
    cfg = extract.Config(parallel_min_pages=8, pages_per_task=2)
    result = extract.run(cfg, {"pages": artifact("pages", tmp_path / "pages")}, ctx)

    docs = parquet.read_table(ctx.output("docs"), "docs").to_pylist()
    excluded = parquet.read_table(ctx.output("extract_excluded"), "excluded").to_pylist()
    assert len(docs) == 10 and {d["url"] for d in docs} == {p["url"] for p in pages[:10]}
    assert {(e["url"], e["reason"]) for e in excluded} == {("https://bad.test/bin", "undecodable"), ("https://bad.test/empty", "no_main_text")}
    assert all(d["id"] == hashlib.sha256(d["url"].encode()).hexdigest() for d in docs)
    assert all(d["sha256"] == hashlib.sha256(d["text"].encode()).hexdigest() and d["cluster"] == "" for d in docs)
    assert result.metrics == {"pages_in": 12, "docs": 10, "dropped": 2, "dropped_no_main_text": 1, "dropped_undecodable": 1}

    # a rerun finds both shards finished and reads their counts from the markers
    again = extract.run(cfg, {"pages": artifact("pages", tmp_path / "pages")}, ctx)
    assert again.metrics == result.metrics


def test_missing_pages_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="extract: cannot read pages at"):
        extract.run(extract.Config(), {"pages": artifact("pages", tmp_path / "nothing")}, make_ctx(tmp_path / "s"))

"""The default corpus is reproducible: the same pydoc pages, byte for byte, whatever the request order.

Before pydoc_server rendered every page up front, two crawls of the tiny corpus gave 413 and 403
pages: concurrent first-request imports raced (asyncio, unittest pages 404'd with "partially
initialized module"), and a package's page depended on which of its submodules had been fetched.
"""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from stages.crawl import PYDOC_FETCHED_AT, Config, run
from stages.web.pydoc_server import PydocServer, select_modules
from storage.parquet import files, read_table
from tests.conftest import make_ctx


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def fetch_pages(modules: list[str], order: list[str], threads: int, topics: bool = False) -> dict[str, tuple[int, str]]:
    """A fresh server for `modules`, its module pages asked for in `order`: module -> (status, sha256)."""
    with PydocServer(modules, topics=topics) as server, ThreadPoolExecutor(threads) as pool:
        replies = list(pool.map(lambda m: fetch(f"{server.url}{m}.html"), order))
    return {m: (status, hashlib.sha256(body).hexdigest()) for m, (status, body) in zip(order, replies)}


def test_package_page_does_not_depend_on_which_submodule_was_fetched_first():
    # importing curses.has_key rebinds the package attribute curses.has_key (a function) to the
    # submodule: with imports on first request the curses page lost has_key when fetched second
    pytest.importorskip("_curses")
    modules = ["curses", "curses.has_key"]
    assert fetch_pages(modules, modules, threads=1) == fetch_pages(modules, modules[::-1], threads=1)


def test_failed_import_is_the_same_404_every_time():
    modules = ["dbm.gnu", "json"]  # dbm.gnu needs _gdbm, missing from many builds
    with PydocServer(modules, topics=False) as server:
        first, again = fetch(f"{server.url}dbm.gnu.html"), fetch(f"{server.url}dbm.gnu.html")
        assert fetch(f"{server.url}json.html")[0] == 200
    assert first == again
    if first[0] == 404:
        assert b"dbm.gnu: ModuleNotFoundError" in first[1]


@pytest.mark.slow
def test_two_crawls_of_the_tiny_corpus_give_the_same_pages(tmp_path):
    # the tiny recipe's corpus (400 modules: every documentable one, xml, email, json,
    # concurrent, multiprocessing, asyncio, unittest, ...), crawled one request at a time and
    # eight at a time, then asked for in reverse order from a third server
    cfg = Config(pydoc_max_modules=400)
    crawls = []
    for name, concurrency in (("a", 1), ("b", 8)):
        ctx = make_ctx(tmp_path / name)
        result = run(Config(**{**cfg.__dict__, "concurrency": concurrency}), {}, ctx)
        pages = read_table(ctx.output("pages"), "pages").to_pylist()
        digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files(ctx.output("pages"))]
        crawls.append(({p["url"]: (p["status"], p["sha256"]) for p in pages}, result.tables["failures"], digests))
        assert {p["fetched_at"] for p in pages} == {PYDOC_FETCHED_AT}
    (a, failures_a, files_a), (b, failures_b, files_b) = crawls
    assert a == b and failures_a == failures_b
    assert files_a == files_b  # what the downstream fingerprints hash
    modules = select_modules((), 400)
    assert {"xml.dom.minidom.html", "email.message.html", "json.decoder.html", "concurrent.futures.process.html",
            "multiprocessing.pool.html", "asyncio.base_events.html", "unittest.mock.html"} <= {u.rsplit("/", 1)[1] for u in a}
    assert len(a) > 400 and {r["reason"] for r in failures_a} <= {"http_404"}  # modules of other platforms

    reverse = fetch_pages(modules, modules[::-1], threads=8, topics=True)  # as the crawl stage starts it
    crawled = {u.rsplit("/", 1)[1][:-5]: v for u, v in a.items() if u.endswith(".html") and "/topic-" not in u}
    assert {m: v for m, v in reverse.items() if v[0] == 200} == crawled

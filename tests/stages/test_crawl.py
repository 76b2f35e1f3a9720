"""The crawl stage against a real HTTP server on 127.0.0.1, the shared WARC files, local files and pydoc."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import crawl as crawl_stage
from stages.contract import StageError
from stages.crawl import PYDOC_FETCHED_AT, PYDOC_ORIGIN, Config, crawl_http, run
from stages.web.crawler import extract_links, parse_sitemap
from stages.web.fetch import blocked_reason
from stages.web.local import read_local
from stages.web.pydoc_server import PydocServer, select_modules
from stages.web.warc import read_warc
from storage.parquet import files, read_table
from tests.conftest import make_ctx
from tests.stages.web_server import Reply, SiteServer, html_page

FAST = dict(allow_hosts=("127.0.0.1",), per_host_delay_s=0.0, backoff_s=0.01, timeout_s=2.0)


@pytest.fixture
def site():
    servers: list[SiteServer] = []

    def start(routes):
        servers.append(SiteServer(routes))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def file_digests(path: Path) -> list[str]:
    """sha256 of every Parquet file of a dataset: what downstream fingerprints hash."""
    return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files(path)]


def web_crawl(server: SiteServer, root: Path, seed: str = "/", **cfg):
    """crawl_http over the test server: (CrawlResult, URL paths fetched OK)."""
    config = Config(source="web", seeds=(server.url(seed),), **{**FAST, **cfg})
    result = crawl_http(config, list(config.seeds), {}, make_ctx(root))
    return result, sorted(r["final_url"].split(str(server.port), 1)[1] for r in result.rows)


# -- robots.txt, politeness, sitemaps ----------------------------------------------------------------


def test_robots_disallowed_path_is_not_fetched(site, tmp_path):
    s = site({
        "/robots.txt": Reply(body=b"User-agent: *\nDisallow: /private\n", headers={"Content-Type": "text/plain"}),
        "/": html_page("/public", "/private/secret"),
        "/public": html_page(),
        "/private/secret": html_page(text="secret"),
    })
    result, fetched = web_crawl(s, tmp_path)
    assert fetched == ["/", "/public"]
    assert result.failures == Counter({"robots_disallowed": 1})
    assert "/private/secret" not in s.paths()


def test_robots_rules_for_our_user_agent_win(site, tmp_path):
    s = site({
        "/robots.txt": Reply(body=b"User-agent: family-forge\nDisallow: /\n\nUser-agent: *\nAllow: /\n", headers={"Content-Type": "text/plain"}),
        "/": html_page(),
    })
    result, fetched = web_crawl(s, tmp_path)
    assert fetched == [] and result.failures == Counter({"robots_disallowed": 1})


def test_crawl_delay_spaces_requests(site, tmp_path):
    s = site({
        "/robots.txt": Reply(body=b"User-agent: *\nCrawl-delay: 0.3\n", headers={"Content-Type": "text/plain"}),
        "/": html_page("/a", "/b", "/c"),
        **{f"/{p}": html_page() for p in "abc"},
    })
    _, fetched = web_crawl(s, tmp_path, use_sitemaps=False)
    assert fetched == ["/", "/a", "/b", "/c"]
    starts = [t for t, p in s.log if p != "/robots.txt"]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.28, gaps  # Crawl-delay 0.3 overrides per_host_delay_s=0


def test_sitemaps_from_robots_and_index_add_unlinked_pages(site, tmp_path):
    nested = b'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><url><loc>%s</loc></url></urlset>'
    s = site({})
    s.routes.update({
        "/robots.txt": Reply(body=f"Sitemap: {s.url('/sitemap-index.xml')}\n".encode(), headers={"Content-Type": "text/plain"}),
        "/sitemap-index.xml": Reply(body=f'<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><sitemap><loc>{s.url("/pages.xml.gz")}</loc></sitemap></sitemapindex>'.encode(), headers={"Content-Type": "application/xml"}),
        "/pages.xml.gz": Reply(body=gzip.compress(nested % s.url("/orphan").encode()), headers={"Content-Type": "application/gzip"}),
        "/": html_page(),
        "/orphan": html_page(text="only in the sitemap"),
    })
    result, fetched = web_crawl(s, tmp_path)
    assert fetched == ["/", "/orphan"]
    assert result.sitemap_urls == 1 and result.sitemap_files == 2


def test_default_sitemap_xml_is_read_without_robots(site, tmp_path):
    s = site({"/": html_page(), "/hidden": html_page()})
    s.routes["/sitemap.xml"] = Reply(body=f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><url><loc>{s.url("/hidden")}</loc></url></urlset>'.encode(), headers={"Content-Type": "application/xml"})
    _, fetched = web_crawl(s, tmp_path)
    assert fetched == ["/", "/hidden"]


def test_parse_sitemap_survives_garbage():
    assert parse_sitemap(b"<urlset><url><loc>", 1000) == ([], [])
    assert parse_sitemap(b"\x1f\x8b" + b"not gzip", 1000) == ([], [])


# -- the SSRF guard ----------------------------------------------------------------------------------


@pytest.mark.parametrize("address, reason", [
    ("10.0.0.1", "private"), ("192.168.1.1", "private"), ("127.0.0.1", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("169.254.1.1", "link_local"),
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("::ffff:10.0.0.1", "private"),
    ("100.64.0.1", "non_global"), ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_blocked_reason(address, reason):
    assert blocked_reason(address) == reason


def test_private_and_metadata_seeds_are_refused_without_connecting(tmp_path, monkeypatch):
    connects = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connects.append(a) or real(*a, **k))
    cfg = Config(source="web", seeds=("http://10.0.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/"), timeout_s=5.0)
    result = crawl_http(cfg, list(cfg.seeds), {}, make_ctx(tmp_path))
    assert result.failures == Counter({"blocked_private": 1, "blocked_metadata": 2})
    assert connects == []
    with pytest.raises(StageError, match=r"zero pages from source 'web'.*blocked_metadata x2"):
        run(cfg, {}, make_ctx(tmp_path / "run"))


def test_loopback_is_refused_unless_allowed(site, tmp_path):
    s = site({"/": html_page()})
    result, fetched = web_crawl(s, tmp_path, allow_hosts=())
    assert fetched == [] and result.failures == Counter({"blocked_loopback": 1})
    assert s.paths() == []  # not even robots.txt was asked for
    _, fetched = web_crawl(s, tmp_path)
    assert fetched == ["/"]


def test_connects_to_the_checked_address_with_the_host_name_in_host(site, tmp_path, monkeypatch):
    s = site({"/": html_page()})
    lookups = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or real("127.0.0.1" if host == "docs.test" else host, *a, **k))
    config = Config(source="web", seeds=(f"http://docs.test:{s.port}/",), **{**FAST, "allow_hosts": ("docs.test",)})
    result = crawl_http(config, list(config.seeds), {}, make_ctx(tmp_path))
    assert [r["url"] for r in result.rows] == [f"http://docs.test:{s.port}/"]
    assert set(s.hosts) == {f"docs.test:{s.port}"}
    assert set(lookups) == {"docs.test", "127.0.0.1"}  # the name is resolved by the guard; the connection uses the checked IP


def test_redirect_to_a_private_address_is_refused(site, tmp_path):
    s = site({
        "/": html_page("/to-metadata", "/to-local", "/moved"),
        "/to-metadata": Reply(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}),
        "/to-local": Reply(301, headers={"Location": "http://10.1.2.3/admin"}),
        "/moved": Reply(301, headers={"Location": "/new-home"}),
        "/new-home": html_page(),
    })
    result, fetched = web_crawl(s, tmp_path, same_host=False)
    assert fetched == ["/", "/new-home"]
    assert result.failures == Counter({"redirect_blocked_metadata": 1, "redirect_blocked_private": 1})


def test_redirect_loop_is_capped(site, tmp_path):
    s = site({"/": html_page("/r0"), **{f"/r{i}": Reply(302, headers={"Location": f"/r{i + 1}"}) for i in range(10)}})
    result, _ = web_crawl(s, tmp_path, max_redirects=3)
    assert result.failures == Counter({"too_many_redirects": 1})
    assert [p for p in s.paths() if re.fullmatch(r"/r\d+", p)] == ["/r0", "/r1", "/r2", "/r3"]


# -- retries, caps, timeouts -------------------------------------------------------------------------


def test_retries_on_500_then_success_and_permanent_500_counted(site, tmp_path):
    s = site({
        "/": html_page("/flaky", "/broken"),
        "/flaky": lambda n: html_page(text="ok") if n >= 2 else Reply(500, b"oops"),
        "/broken": Reply(500, b"down"),
    })
    result, fetched = web_crawl(s, tmp_path, retries=2)
    assert fetched == ["/", "/flaky"]
    assert result.failures == Counter({"http_500": 1})
    assert s.paths().count("/flaky") == 3 and s.paths().count("/broken") == 3  # 1 try + 2 retries


def test_size_cap_with_and_without_content_length(site, tmp_path):
    big = html_page(text="x" * 300_000)
    s = site({"/": html_page("/big", "/big-stream", "/small"), "/big": big, "/big-stream": Reply(body=big.body, send_length=False), "/small": html_page()})
    result, fetched = web_crawl(s, tmp_path, max_bytes=100_000)
    assert fetched == ["/", "/small"]
    assert result.failures == Counter({"too_large": 2})


def test_gzip_page_is_decoded_and_gzip_bomb_dropped(site, tmp_path):
    bomb = gzip.compress(b"\0" * 50_000_000)  # ~50 KB on the wire, 50 MB decompressed
    s = site({
        "/": html_page("/zipped", "/bomb"),
        "/zipped": Reply(body=gzip.compress(b"<html><body>hello gzip</body></html>"), headers={"Content-Type": "text/html", "Content-Encoding": "gzip"}),
        "/bomb": Reply(body=bomb, headers={"Content-Type": "text/html", "Content-Encoding": "gzip"}),
    })
    assert len(bomb) < 1_000_000
    result, fetched = web_crawl(s, tmp_path, max_bytes=1_000_000)
    assert fetched == ["/", "/zipped"]
    assert [r["body"] for r in result.rows if r["url"].endswith("/zipped")] == [b"<html><body>hello gzip</body></html>"]
    assert result.failures == Counter({"gzip_bomb": 1})


def test_content_type_not_allowed_is_counted(site, tmp_path):
    s = site({"/": html_page("/doc.pdf"), "/doc.pdf": Reply(body=b"%PDF-1.4", headers={"Content-Type": "application/pdf"})})
    result, fetched = web_crawl(s, tmp_path)
    assert fetched == ["/"] and result.failures == Counter({"content_type": 1})


def test_hanging_server_times_out(site, tmp_path):
    s = site({"/": html_page("/hang"), "/hang": Reply(body=b"late", delay_s=5.0)})
    start = time.monotonic()
    result, fetched = web_crawl(s, tmp_path, timeout_s=0.3, retries=1)
    assert fetched == ["/"]
    assert result.failures == Counter({"timeout": 1})
    assert time.monotonic() - start < 2.5  # two attempts of 0.3 s, not the server's 5 s


def test_unreachable_robots_disallows_the_origin(site, tmp_path):
    s = site({"/robots.txt": Reply(503, b"busy"), "/": html_page()})
    result, fetched = web_crawl(s, tmp_path, retries=0)
    assert fetched == [] and result.failures == Counter({"robots_http_503": 1})


# -- scope and caps ----------------------------------------------------------------------------------


def test_depth_cap(site, tmp_path):
    s = site({"/": html_page("/d1"), "/d1": html_page("/d2"), "/d2": html_page("/d3"), "/d3": html_page()})
    _, fetched = web_crawl(s, tmp_path, max_depth=2)
    assert fetched == ["/", "/d1", "/d2"]
    assert "/d3" not in s.paths()


def test_page_cap(site, tmp_path):
    s = site({"/": html_page(*[f"/p{i}" for i in range(10)]), **{f"/p{i}": html_page() for i in range(10)}})
    result, fetched = web_crawl(s, tmp_path, max_pages=4, concurrency=3)
    assert len(fetched) == 4 and len(result.rows) == 4
    assert len([p for p in s.paths() if p.startswith("/p")]) == 3  # nothing fetched past the cap


def test_scope_patterns_and_same_host(site, tmp_path):
    s = site({"/": html_page("/docs/a", "/docs/a.zip", "/blog/b", "http://example.invalid/x"), "/docs/a": html_page(), "/docs/a.zip": html_page(), "/blog/b": html_page()})
    _, fetched = web_crawl(s, tmp_path, include_patterns=(r"^/docs/",), exclude_patterns=(r"\.zip$",))
    assert fetched == ["/", "/docs/a"]  # the seed is in scope although it matches no pattern


def test_extract_links_resolves_and_filters():
    html = b"""<html><head><base href="/base/"></head><body>
      <a href="page.html#section">rel</a> <a href="http://Other.ORG:80/x?q=1#f">abs</a>
      <a href="mailto:a@b.c">mail</a> <a href="javascript:void(0)">js</a> <a href="skip" rel="nofollow">no</a>
      <a href="page.html">dup</a></body></html>"""
    assert extract_links(html, "http://host.test/dir/index.html") == ["http://host.test/base/page.html", "http://other.org/x?q=1"]
    assert extract_links(b'<meta name="robots" content="noindex, nofollow"><a href="/x">x</a>', "http://h.test/") == []


# -- incremental -------------------------------------------------------------------------------------


def test_second_crawl_fetches_only_new_pages_and_outputs_all(site, tmp_path):
    s = site({"/": html_page(*[f"/p{i}" for i in range(6)]), **{f"/p{i}": html_page(text=f"page {i}") for i in range(6)}})
    cfg = Config(source="web", seeds=(s.url("/"),), max_pages=3, concurrency=1, use_sitemaps=False, **FAST)
    first = run(cfg, {}, make_ctx(tmp_path / "a"))
    assert first.metrics["pages"] == 3
    s.log.clear()
    ctx = make_ctx(tmp_path / "b")
    ctx.state_dir = tmp_path / "a" / "state"  # the state persists across runs in the home
    second = run(Config(**{**cfg.__dict__, "max_pages": 10}), {}, ctx)
    assert second.metrics["pages_reused"] == 2 and second.metrics["pages_fetched"] == 5  # seed again + 4 new
    assert sorted(p for p in s.paths() if p != "/robots.txt") == ["/", "/p2", "/p3", "/p4", "/p5"]
    pages = read_table(ctx.output("pages"), "pages")
    assert pages.column("url").to_pylist() == sorted([s.url("/")] + [s.url(f"/p{i}") for i in range(6)])


def test_crawl_that_finds_nothing_new_writes_the_same_pages(site, tmp_path):
    s = site({"/": html_page("/a", "/b"), "/a": html_page(text="a"), "/b": html_page(text="b")})
    cfg = Config(source="web", seeds=(s.url("/"),), use_sitemaps=False, **FAST)
    first = make_ctx(tmp_path / "a")
    run(cfg, {}, first)
    time.sleep(0.01)  # a later fetch time for the seed, fetched again
    second = make_ctx(tmp_path / "b")
    second.state_dir = first.state_dir
    result = run(cfg, {}, second)
    assert result.metrics["pages_fetched"] == 1 and result.metrics["pages_reused"] == 2
    assert file_digests(second.output("pages")) == file_digests(first.output("pages"))  # the seed keeps its row


# -- WARC --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, urls, failures, skipped", [
    ("warcio_example.warc.gz", ["http://example.com/"], {}, {"warcinfo": 2, "request": 2, "revisit_duplicate": 1}),
    ("warcio_example.warc", ["http://example.com/"], {}, {"warcinfo": 2, "request": 2, "revisit_duplicate": 1}),
    ("warcio_post-test.warc.gz", [], {"content_type": 3}, {"request": 3}),
    ("pywb_example-wget-1-14.warc.gz", ["http://example.com/", "metadata://gnu.org/software/wget/warc/MANIFEST.txt",
     "metadata://gnu.org/software/wget/warc/wget_arguments.txt", "metadata://gnu.org/software/wget/warc/wget.log"], {}, {"warcinfo": 1, "request": 1}),
])
def test_each_shared_warc_file(shared_data, name, urls, failures, skipped):
    fails, skips = Counter(), Counter()
    rows = list(read_warc(shared_data / "warc" / name, fails, skips, content_types=("text/html", "text/plain"), max_bytes=1_000_000))
    assert [r["url"] for r in rows] == urls
    assert fails == Counter(failures) and skips == Counter(skipped)
    html = [r for r in rows if r["url"] == "http://example.com/"]
    assert all(r["status"] == 200 and r["content_type"].startswith("text/html") and b"Example Domain" in r["body"] for r in html)


def test_warc_folder_with_truncated_and_garbage_files(shared_data, tmp_path):
    warcs = tmp_path / "warcs"
    warcs.mkdir()
    plain = (shared_data / "warc" / "warcio_example.warc").read_bytes()
    (warcs / "truncated.warc").write_bytes(plain[:2000])  # ends inside the response record
    (warcs / "garbage.warc.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    (warcs / "text.warc").write_bytes(b"hello, not a warc\n")
    ctx = make_ctx(tmp_path / "run")
    result = run(Config(source="warc", paths=(str(shared_data / "warc"), str(warcs))), {}, ctx)
    failures = {r["reason"]: r["count"] for r in result.tables["failures"]}
    assert failures == {"content_type": 3, "truncated": 1, "not_warc": 2}
    pages = read_table(ctx.output("pages"), "pages").to_pylist()
    assert len(pages) == 4 and result.metrics["duplicates"] == 2 + 2  # 2 revisits, example.com in 2 more files
    assert pages[0]["url"] == "http://example.com/" and pages[0]["fetched_at"].year == 2014


# -- local files -------------------------------------------------------------------------------------


def test_local_files_of_each_type(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("plain text\n")
    (d / "b.md").write_text("# Title\n\nmarkdown body\n")
    (d / "c.html").write_bytes(b"<html><body><p>caf\xe9</p></body></html>")  # latin-1 html stays as bytes
    (d / "d.jsonl").write_text("\n".join([
        json.dumps({"text": "with url", "url": "https://example.org/x"}),
        json.dumps({"text": "with id", "id": "doc-7"}),
        json.dumps({"text": "bare"}),
        "{not json",
        json.dumps({"question": "no text field"}),
        json.dumps({"text": "   "}),
    ]) + "\n")
    pq.write_table(pa.table({"text": ["row one", "row two"], "id": ["r1", None]}), d / "e.parquet")
    (d / "f.txt").write_bytes(b"\xff\xfe\x00binary")
    (d / "g.pdf").write_bytes(b"%PDF")
    (d / "h.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": "zipped"}).encode() + b"\n"))
    (d / "i.parquet").write_bytes(b"PAR1 broken")
    ctx = make_ctx(tmp_path / "run")
    result = run(Config(source="local", paths=(str(d),)), {}, ctx)
    failures = {r["reason"]: r["count"] for r in result.tables["failures"]}
    assert failures == {"bad_json": 1, "no_text_field": 1, "empty": 1, "undecodable": 1, "unsupported_type": 1, "bad_parquet": 1}
    pages = {r["url"]: r for r in read_table(ctx.output("pages"), "pages").to_pylist()}
    base = d.resolve().as_uri()
    assert set(pages) == {
        f"{base}/a.txt", f"{base}/b.md", f"{base}/c.html", "https://example.org/x", f"{base}/d.jsonl#doc-7",
        f"{base}/d.jsonl#line-3", f"{base}/e.parquet#r1", f"{base}/e.parquet#row-2", f"{base}/h.jsonl.gz#line-1",
    }
    assert pages[f"{base}/c.html"]["content_type"] == "text/html" and pages[f"{base}/c.html"]["body"].endswith(b"</html>")
    assert pages[f"{base}/b.md"]["content_type"].startswith("text/plain")
    assert pages[f"{base}/e.parquet#row-2"]["body"] == b"row two"


def test_local_shared_html_folder(shared_data):
    fails = Counter()
    rows = [r for f in sorted((shared_data / "trafilatura_html").iterdir()) for r in read_local(f, fails, max_bytes=5_000_000)]
    assert len(rows) == 30 and all(r["content_type"] == "text/html" for r in rows)
    assert fails == Counter({"unsupported_type": 3})  # LICENSE, MANIFEST.tsv, evaldata json


def test_missing_path_and_bad_config_are_one_line_errors(tmp_path):
    with pytest.raises(StageError, match="no such file or folder"):
        run(Config(source="local", paths=(str(tmp_path / "nope"),)), {}, make_ctx(tmp_path))
    with pytest.raises(StageError, match="needs seeds"):
        run(Config(source="web"), {}, make_ctx(tmp_path))


# -- pydoc, the embedded default ---------------------------------------------------------------------


def test_pydoc_module_selection():
    picked = select_modules((), 40)
    assert len(picked) == 40 and all("." not in m for m in picked)  # top-level modules first
    assert picked[0] < "c" and picked[-1] > "w"  # spread over the alphabet
    everything = select_modules((), 10_000)
    for skipped in ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "asyncio.__main__", "encodings.cp1252"):
        assert skipped not in everything
    with pytest.raises(ValueError, match="antigravity"):
        select_modules(("json", "antigravity"), 10)


def test_pydoc_default_crawls_through_the_real_crawler(tmp_path):
    cfg = Config(pydoc_modules=("json", "textwrap", "colorsys"))
    assert cfg.source == "pydoc"
    ctx = make_ctx(tmp_path / "a")
    result = run(cfg, {}, ctx)
    pages = read_table(ctx.output("pages"), "pages").to_pylist()
    assert [p["url"] for p in pages] == [PYDOC_ORIGIN, f"{PYDOC_ORIGIN}colorsys.html", f"{PYDOC_ORIGIN}json.html", f"{PYDOC_ORIGIN}textwrap.html"]
    json_page = pages[2]["body"].decode()
    assert "JSONDecoder" in json_page and "Bob&nbsp;Ippolito" in json_page
    assert re.search(r"at(?: |&nbsp;)0x[1-9a-f]", json_page) is None  # object addresses are zeroed
    assert result.metrics["pages_failed"] == 0 and result.metrics["bytes"] > 20_000
    assert {p["fetched_at"] for p in pages} == {PYDOC_FETCHED_AT}
    # a second crawl, in a fresh home and in the same one, writes the same files (stable URLs, no
    # object addresses, no fetch times): what follows the crawl keeps its fingerprints
    same_home = make_ctx(tmp_path / "c")
    same_home.state_dir = ctx.state_dir  # the state persists across runs in the home
    for again in (make_ctx(tmp_path / "b"), same_home):
        run(cfg, {}, again)
        assert [p["sha256"] for p in read_table(again.output("pages"), "pages").to_pylist()] == [p["sha256"] for p in pages]
        assert file_digests(again.output("pages")) == file_digests(ctx.output("pages"))


def test_pydoc_server_stops(tmp_path):
    with PydocServer(["colorsys"], topics=False) as server:
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        proc = server.proc
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert proc.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_stage_module_shape():
    assert crawl_stage.INPUTS == () and crawl_stage.OUTPUTS == ("pages",) and crawl_stage.NETWORK is True

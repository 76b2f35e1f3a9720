"""Crawl: gather raw pages from the web, WARC files, local files, or this Python's own docs.

What: writes `pages` (schema `pages`: url, final_url, status, content_type, fetched_at, body,
sha256), one row per page, sorted by URL. Failed pages are not written; they are counted by
reason in the `failures` table (robots_disallowed, blocked_private, http_404, timeout, too_large,
gzip_bomb, content_type, ...).

Sources (`source`):
- web: an HTTP(S) crawl from `seeds` (stages/web/crawler.py, fetch.py): robots.txt (RFC 9309)
  with Crawl-delay and Sitemap lines, /sitemap.xml, per-host politeness, scope by host and path
  regexes, depth and page caps, capped redirects checked hop by hop, retries with exponential
  backoff, size caps that also stop gzip bombs, and an SSRF guard that refuses internal
  addresses after DNS resolution (loopback included) unless the host is in `allow_hosts`.
- pydoc (the default; `family run` with no arguments): this Python's standard-library docs,
  served by stages/web/pydoc_server.py on 127.0.0.1 in a subprocess and crawled by the same
  crawler with that host allowed. Its own server needs no politeness (delay 0) and its index
  links every page (depth 1). Page URLs are rewritten from the server's random port to the stable
  PYDOC_ORIGIN and fetched_at is the fixed PYDOC_FETCHED_AT, so two crawls on the same Python give
  the same `pages`, byte for byte (the server makes its pages deterministic, see its docstring),
  and what follows the crawl keeps its fingerprints. Nothing is reused from earlier crawls: the
  server renders every page at start anyway, and a page kept from a crawl of other modules
  could differ from this crawl's (a package's page depends on which of its submodules are loaded).
- warc: WARC/ARC files or folders of them (stages/web/warc.py).
- local: txt, md, html, jsonl, parquet files or folders (stages/web/local.py).

Incremental (web): pages fetched earlier are kept in ctx.state_dir/web/ as Parquet shards. A
rerun reuses a known page without fetching it (its links come from the stored body) unless
`refetch`; seeds are always fetched again, since that is where new links appear. A page fetched
again with the same bytes keeps its stored row, fetched_at included, so a crawl that found
nothing new writes the same `pages` and what follows it is reused (downstream fingerprints hash
the pages' bytes). The output holds every page this crawl reached, reused or new, so a later
crawl with more seeds or a larger max_pages outputs the old pages plus the new ones. `max_pages`
caps network fetches per crawl; reused pages do not count against it.

Deviations: robots.txt that cannot be fetched (5xx, timeout) disallows the whole origin, as the
RFC asks, rather than the "try again later" of large crawlers; no conditional requests
(If-Modified-Since): `refetch` is all or nothing.

Run:
    python -m stages.crawl --config c.json --run-dir DIR
    e.g. c.json = {"source": "web", "seeds": ["https://example.org/"], "max_pages": 100}
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from stages.contract import StageContext, StageError, StageResult, main
from stages.web.crawler import CrawlResult, RulesCache, Scope, crawl
from stages.web.fetch import FetchPolicy, Fetcher, normalize_url
from stages.web.local import local_files, read_local
from stages.web.pydoc_server import PydocServer, select_modules
from stages.web.warc import read_warc, warc_files
from storage.artifacts import Artifact
from storage.parquet import ShardWriter, files, read_table, write_table

INPUTS: tuple[str, ...] = ()
OUTPUTS = ("pages",)
NETWORK = True
INPUT_FILES = ("paths",)  # WARC and local sources: their content is part of the fingerprint

PYDOC_ORIGIN = f"http://pydoc.localhost/{sys.version_info.major}.{sys.version_info.minor}/"
# pydoc pages are a function of the Python and the module list, not of the time they were fetched
PYDOC_FETCHED_AT = datetime(1970, 1, 1, tzinfo=timezone.utc)
ROWS_PER_SHARD = 500  # pages are up to max_bytes each: keep a shard to a few tens of MB


@dataclass(frozen=True)
class Config:
    source: Literal["pydoc", "web", "warc", "local"] = "pydoc"
    seeds: tuple[str, ...] = ()  # web: start URLs
    paths: tuple[str, ...] = ()  # warc, local: files or folders
    # scope (web)
    allow_hosts: tuple[str, ...] = ()  # host names exempt from the SSRF guard (e.g. an intranet mirror)
    include_patterns: tuple[str, ...] = ()  # regexes on path?query; a link must match one (when given)
    exclude_patterns: tuple[str, ...] = ()  # regexes on path?query; a link matching one is skipped
    same_host: bool = True  # follow links only to the seeds' hosts
    max_depth: int = 3  # link hops from a seed
    max_pages: int = 1000  # pages fetched per crawl (web, pydoc) or read (warc, local)
    # fetching
    max_bytes: int = 5_000_000  # per page, on the wire and after decompression
    timeout_s: float = 20.0  # per attempt: connect, headers and body
    retries: int = 2  # on 5xx, 429, timeouts, dropped connections
    backoff_s: float = 0.5  # wait backoff_s * 2**attempt before retrying
    concurrency: int = 4  # requests in flight, over all hosts
    per_host_delay_s: float = 1.0  # between requests to one host; robots.txt Crawl-delay wins when larger
    max_redirects: int = 5
    user_agent: str = "family-forge/0.1 (+https://github.com/family-forge)"
    respect_robots: bool = True
    use_sitemaps: bool = True
    allowed_content_types: tuple[str, ...] = ("text/html", "application/xhtml+xml", "text/plain")
    refetch: bool = False  # fetch pages again although an earlier crawl has them
    # pydoc: the modules to document (default: pydoc_max_modules of them, plus the language topics)
    pydoc_modules: tuple[str, ...] = ()
    pydoc_max_modules: int = 120

    def validate(self) -> None:
        if self.source == "web":
            if not self.seeds:
                raise ValueError("source 'web' needs seeds (start URLs), e.g. seeds: [https://example.org/]")
            bad = [s for s in self.seeds if normalize_url(s) is None]
            if bad:
                raise ValueError(f"seeds {bad} are not http(s) URLs")
        if self.source in ("warc", "local") and not self.paths:
            raise ValueError(f"source {self.source!r} needs paths (files or folders)")
        for name in ("include_patterns", "exclude_patterns"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{name}: {pattern!r} is not a regex ({e})") from None
        for name in ("max_pages", "max_bytes", "concurrency", "pydoc_max_modules"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_depth", "retries", "max_redirects", "backoff_s", "per_host_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.allowed_content_types:
            raise ValueError("allowed_content_types is empty: no page could be kept")


# -- incremental state -----------------------------------------------------------------------------


class PageStore:
    """Pages of earlier crawls in one folder of Parquet shards; a later shard's row for a URL wins.

    Each crawl appends one shard with the pages it fetched; when superseded rows outnumber the live
    ones the store is rewritten as a single shard.
    """

    def __init__(self, directory: Path):
        self.dir = directory
        self.n_rows = 0

    def load(self) -> dict[str, dict[str, Any]]:
        if not self.dir.is_dir() or not files(self.dir):
            return {}
        table = read_table(self.dir, "pages")
        self.n_rows = table.num_rows
        return {row["url"]: row for row in table.to_pylist()}  # shards are read in name order

    def append(self, rows: list[dict[str, Any]], known: dict[str, dict[str, Any]]) -> None:
        """Add this crawl's fetched pages (`known` is what `load` returned)."""
        if not rows:
            return
        old = files(self.dir) if self.dir.is_dir() else []
        name = self.dir / f"part-{int(old[-1].stem.split('-')[1]) + 1 if old else 0:05d}.parquet"
        merged = {**known, **{r["url"]: r for r in rows}}
        if self.n_rows + len(rows) <= 2 * len(merged):
            write_table(rows, name, "pages")
            return
        write_table(sorted(merged.values(), key=lambda r: r["url"]), name, "pages")
        for shard in old:  # the new shard holds every live row: the old ones are superseded
            shard.unlink()


def _unchanged(row: dict[str, Any], known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The stored row for a page fetched again with the same response, else the new row."""
    old = known.get(row["url"])
    same = old is not None and all(old[k] == row[k] for k in ("final_url", "status", "content_type", "sha256"))
    return old if same else row


def _rebase(row: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """The row with URLs under `old` moved under `new` (the pydoc server's port changes per run)."""
    def move(url: str) -> str:
        return new + url[len(old):] if url.startswith(old) else url

    return {**row, "url": move(row["url"]), "final_url": move(row["final_url"])}


# -- sources ---------------------------------------------------------------------------------------


def crawl_http(cfg: Config, seeds: list[str], known: dict[str, dict[str, Any]], ctx: StageContext, *, extra_allowed: tuple[str, ...] = ()) -> CrawlResult:
    """Run the crawler of stages/web under `cfg` from `seeds`, reusing `known` pages."""
    seeds = [normalize_url(s) for s in seeds]
    allow = frozenset(h.strip("[]").lower() for h in cfg.allow_hosts + extra_allowed)
    scope = Scope(
        hosts=frozenset(urlsplit(s).hostname for s in seeds) if cfg.same_host else None,
        include=tuple(re.compile(p) for p in cfg.include_patterns),
        exclude=tuple(re.compile(p) for p in cfg.exclude_patterns),
    )
    policy = FetchPolicy(cfg.user_agent, cfg.timeout_s, cfg.retries, cfg.backoff_s, cfg.max_redirects, cfg.max_bytes, allow)
    fetcher = Fetcher(policy)
    rules = RulesCache(fetcher, cfg.user_agent, cfg.respect_robots, cfg.per_host_delay_s)
    fetcher.check_hop = lambda url: scope.refuse(url) or rules.refuse(url)  # every redirect hop
    return crawl(
        seeds, fetcher, rules, scope,
        max_depth=cfg.max_depth, max_pages=cfg.max_pages, concurrency=cfg.concurrency,
        content_types=tuple(t.lower() for t in cfg.allowed_content_types), use_sitemaps=cfg.use_sitemaps,
        known=known, refetch=cfg.refetch,
        progress=lambda done, total: ctx.progress(done, max(total, 1), "pages"),
    )


def crawl_pydoc(cfg: Config, ctx: StageContext) -> CrawlResult:
    """Serve the standard-library docs on 127.0.0.1 and crawl them with the real crawler."""
    try:
        modules = select_modules(cfg.pydoc_modules, cfg.pydoc_max_modules)
    except ValueError as e:
        raise StageError(f"crawl: pydoc_modules: {e}; pick names from `python -c 'help(\"modules\")'`") from None
    # our own server: no politeness delay, and its index links every page (depth 1)
    local = replace(cfg, per_host_delay_s=0.0, max_depth=min(cfg.max_depth, 1), same_host=True)
    ctx.logger.info("crawl: starting the pydoc server for %d modules (it renders every page first)", len(modules))
    with PydocServer(modules, topics=not cfg.pydoc_modules) as server:
        ctx.logger.info("crawl: pydoc server at %s", server.url)
        result = crawl_http(local, [server.url], {}, ctx, extra_allowed=("127.0.0.1",))
    result.rows = [{**_rebase(r, server.url, PYDOC_ORIGIN), "fetched_at": PYDOC_FETCHED_AT} for r in result.rows]
    return result


def read_files(cfg: Config, ctx: StageContext) -> tuple[list[dict[str, Any]], Counter, Counter]:
    """Pages of the WARC or local files in cfg.paths: (rows, failures by reason, skipped by kind)."""
    missing = [p for p in cfg.paths if not Path(p).exists()]
    if missing:
        raise StageError(f"crawl: no such file or folder {missing[0]!r} in paths; fix crawl.paths in the recipe")
    found = warc_files(list(cfg.paths)) if cfg.source == "warc" else local_files(list(cfg.paths))
    types = tuple(t.lower() for t in cfg.allowed_content_types)
    rows: list[dict[str, Any]] = []
    failures: Counter = Counter()
    skipped: Counter = Counter()
    seen: set[str] = set()
    for i, path in enumerate(found):
        if cfg.source == "warc":
            pages = read_warc(path, failures, skipped, content_types=types, max_bytes=cfg.max_bytes)
        else:
            pages = read_local(path, failures, max_bytes=cfg.max_bytes)
        for row in pages:
            if row["url"] in seen:  # the same URL captured again (another WARC, a copied file)
                skipped["duplicate_url"] += 1
                continue
            seen.add(row["url"])
            rows.append(row)
            if len(rows) >= cfg.max_pages:
                break
        ctx.progress(i + 1, len(found), "files", pages=len(rows))
        if len(rows) >= cfg.max_pages:
            break
    return rows, failures, skipped


# -- the stage -------------------------------------------------------------------------------------


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    try:
        cfg.validate()
    except ValueError as e:
        raise StageError(f"crawl: {e}") from None
    started = time.monotonic()
    skipped: Counter = Counter()
    reused: list[dict[str, Any]] = []
    if cfg.source == "web":
        store = PageStore(ctx.state_dir / "web")
        known = store.load()
        result = crawl_http(cfg, list(cfg.seeds), known, ctx)
        fetched = [_unchanged(r, known) for r in result.rows]
        reused, failures, sitemap_urls = result.reused, result.failures, result.sitemap_urls
    elif cfg.source == "pydoc":
        result = crawl_pydoc(cfg, ctx)
        fetched, failures, sitemap_urls = result.rows, result.failures, result.sitemap_urls
    else:
        sitemap_urls = 0
        fetched, failures, skipped = read_files(cfg, ctx)
    seconds = time.monotonic() - started
    rows = fetched + reused
    n_failed = sum(failures.values())
    if not rows:
        top = ", ".join(f"{r} x{n}" for r, n in failures.most_common(3)) or "nothing found"
        where = {"web": f"seeds {list(cfg.seeds)}", "warc": f"paths {list(cfg.paths)}", "local": f"paths {list(cfg.paths)}", "pydoc": "the pydoc server"}[cfg.source]
        raise StageError(f"crawl: zero pages from source {cfg.source!r} at {where} ({top}); check the scope, allowed_content_types and the failures table")

    rows.sort(key=lambda r: r["url"])
    out = ctx.output("pages")
    if out.exists():  # shards of an interrupted earlier attempt must not mix with this one's
        shutil.rmtree(out)
    with ShardWriter(out, "pages", rows_per_shard=ROWS_PER_SHARD) as writer:
        writer.write_many(rows)
    if cfg.source == "web":
        store.append(fetched, known)  # after the output, so a failed write leaves the state as it was
    total_bytes = sum(len(r["body"]) for r in rows)
    metrics = {
        "pages": float(len(rows)),
        "pages_fetched": float(len(fetched)),
        "pages_reused": float(len(reused)),
        "pages_failed": float(n_failed),
        "bytes": float(total_bytes),
        "bytes_fetched": float(sum(len(r["body"]) for r in fetched)),
        "seconds": seconds,
        "pages_per_s": len(fetched) / max(seconds, 1e-9),
        "duplicates": float(skipped["revisit_duplicate"] + skipped["duplicate_url"]),
        "records_skipped": float(sum(skipped.values())),
        "sitemap_urls": float(sitemap_urls),
    }
    ctx.tracker.log_metrics(metrics)
    failure_rows = [{"reason": r, "count": n} for r, n in sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))]
    summary = "\n".join([
        f"### crawl ({cfg.source})",
        f"{len(rows)} pages ({len(fetched)} {'fetched' if cfg.source in ('web', 'pydoc') else 'read'}, {len(reused)} reused), {total_bytes / 1e6:.2f} MB, "
        f"{n_failed} failed, {seconds:.1f} s ({metrics['pages_per_s']:.1f} pages/s)",
        "",
        *(["| failure | pages |", "|---|---|", *(f"| {r['reason']} | {r['count']} |" for r in failure_rows)] if failure_rows else ["no failures"]),
        *([f"\nskipped records: {', '.join(f'{k} x{v}' for k, v in sorted(skipped.items()))}"] if skipped else []),
    ])
    return StageResult(
        outputs={"pages": {"rows": len(rows), "bytes": total_bytes, "source": cfg.source}},
        metrics=metrics,
        summary=summary,
        tables={"failures": failure_rows},
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

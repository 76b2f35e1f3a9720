"""The HTTP crawler: a breadth-first frontier over hosts, polite and capped.

- Scope: the seeds' hosts (when same_host) or any host, then include/exclude regexes on the URL
  path (and query). Seeds are always in scope; links and redirect targets must pass.
- robots.txt (RFC 9309, via urllib.robotparser) is fetched once per origin before any of its
  pages: a 4xx means no rules, an unreachable robots.txt (5xx, timeout) means "disallow all" as
  the RFC asks, and a refused address refuses every page of the origin. Its Crawl-delay raises
  the politeness delay when it is larger; its Sitemap lines and /sitemap.xml add pages.
- Politeness: with a delay > 0 an origin has one request in flight and requests start at least
  `delay` seconds apart; `concurrency` threads work across origins. A delay of 0 (our own
  pydoc server) lets all threads work on one origin.
- Caps: `max_depth` link hops from a seed (sitemap pages count as depth 1), `max_pages` network
  fetches per crawl. Links are only parsed from pages below max_depth.
- Incremental: `known` maps URL -> the page row kept from earlier crawls. A known page is reused
  without touching the network (its links come from the stored body) unless `refetch`; seeds are
  always fetched again, since new links appear there.
"""
from __future__ import annotations

import gzip
import io
import re
import threading
import time
import xml.etree.ElementTree as ET
import zlib
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit
from urllib.robotparser import RobotFileParser

from stages.web.fetch import FetchError, Fetcher, Response, media_type, normalize_url, origin
from stages.web.page import page_row

HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_SITEMAP_FILES = 20  # sitemap documents read per origin (an index can point to many)


# -- scope -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    hosts: frozenset[str] | None  # None: any host
    include: tuple[re.Pattern, ...] = ()
    exclude: tuple[re.Pattern, ...] = ()

    def refuse(self, url: str) -> str | None:
        """Why `url` is out of scope, or None."""
        parts = urlsplit(url)
        if self.hosts is not None and parts.hostname not in self.hosts:
            return "out_of_scope"
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        if self.include and not any(p.search(path) for p in self.include):
            return "not_included"
        if any(p.search(path) for p in self.exclude):
            return "excluded"
        return None


# -- links -----------------------------------------------------------------------------------------


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.hrefs: list[str] = []
        self.nofollow = False  # <meta name="robots" content="nofollow">

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("a", "area") and a.get("href") and "nofollow" not in a.get("rel", "").lower():
            self.hrefs.append(a["href"])
        elif tag == "base" and self.base is None and a.get("href"):
            self.base = a["href"]
        elif tag == "meta" and a.get("name", "").lower() == "robots" and "nofollow" in a.get("content", "").lower():
            self.nofollow = True


def charset(content_type: str) -> str:
    m = re.search(r"charset=[\"']?([\w.:-]+)", content_type, re.I)
    return m.group(1) if m else "utf-8"


def extract_links(body: bytes, base_url: str, content_type: str = "text/html") -> list[str]:
    """Absolute, normalized http(s) links of an HTML page, fragments dropped, in page order."""
    enc = charset(content_type)
    try:
        text = body.decode(enc, errors="replace")
    except LookupError:  # an unknown charset name
        text = body.decode("utf-8", errors="replace")
    parser = _LinkParser()
    try:
        parser.feed(text)
        parser.close()
    except (AssertionError, ValueError):  # html.parser gives up on some malformed markup
        pass
    if parser.nofollow:
        return []
    base = urljoin(base_url, parser.base) if parser.base else base_url
    links = (normalize_url(urljoin(base, h)) for h in parser.hrefs)
    return list(dict.fromkeys(u for u in links if u is not None))


# -- robots.txt and sitemaps -----------------------------------------------------------------------


@dataclass
class OriginRules:
    robots: RobotFileParser | None  # None: no rules (404, or robots not respected)
    delay: float  # seconds between requests to this origin
    sitemaps: list[str]
    refused: str | None = None  # every page of the origin fails with this reason


class RulesCache:
    """robots.txt per origin, fetched once even when several threads ask at the same time."""

    def __init__(self, fetcher: Fetcher, user_agent: str, respect_robots: bool, base_delay: float):
        self.fetcher = fetcher
        self.user_agent = user_agent
        self.respect_robots = respect_robots
        self.base_delay = base_delay
        self._rules: dict[str, OriginRules] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, org: str) -> OriginRules:
        with self._guard:
            lock = self._locks.setdefault(org, threading.Lock())
        with lock:
            if org not in self._rules:
                self._rules[org] = self._load(org)
            return self._rules[org]

    def _load(self, org: str) -> OriginRules:
        if not self.respect_robots:
            return OriginRules(None, self.base_delay, [])
        try:
            resp = self.fetcher.get(f"{org}/robots.txt", follow_checks=False)
        except FetchError as e:
            if e.reason.startswith("blocked_") or e.reason == "dns_error":
                return OriginRules(None, self.base_delay, [], refused=e.reason)
            if e.reason.startswith("http_4"):  # no robots.txt: everything allowed
                return OriginRules(None, self.base_delay, [])
            return OriginRules(None, self.base_delay, [], refused=f"robots_{e.reason}")
        lines = resp.body.decode("utf-8", errors="replace").splitlines()
        parser = RobotFileParser()
        parser.parse(lines)
        delay = crawl_delay(lines, self.user_agent)
        return OriginRules(parser, max(self.base_delay, delay), list(parser.site_maps() or []))

    def refuse(self, url: str) -> str | None:
        """Why robots.txt (or the address guard behind it) refuses `url`, or None."""
        rules = self.get(origin(url))
        if rules.refused:
            return rules.refused
        if rules.robots is not None and not rules.robots.can_fetch(self.user_agent, url):
            return "robots_disallowed"
        return None


def crawl_delay(lines: list[str], user_agent: str) -> float:
    """Crawl-delay of the group naming our product token, else of `*`; 0 when none.

    urllib.robotparser reads only whole seconds ("Crawl-delay: 0.5" is dropped), so it is read here.
    """
    token = user_agent.split("/", 1)[0].lower()
    delays: dict[str, float] = {}
    agents: list[str] = []
    in_rules = False  # a User-agent line after rules starts a new group
    for line in lines:
        key, _, value = line.split("#", 1)[0].partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            if in_rules:
                agents, in_rules = [], False
            agents.append(value.lower())
        elif key in ("allow", "disallow", "crawl-delay"):
            in_rules = True
            if key == "crawl-delay":
                try:
                    delays.update({a: float(value) for a in agents})
                except ValueError:
                    pass
    mine = next((d for a, d in delays.items() if a != "*" and a in token), None)
    return max(0.0, mine if mine is not None else delays.get("*", 0.0))


def parse_sitemap(body: bytes, max_bytes: int) -> tuple[list[str], list[str]]:
    """(page URLs, nested sitemap URLs) of a sitemap or sitemap index, gzipped or not."""
    if body[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
                body = f.read(max_bytes + 1)  # capped: a sitemap can be a gzip bomb too
        except (OSError, EOFError, zlib.error):
            return [], []
        if len(body) > max_bytes:
            return [], []
    try:
        root = ET.fromstring(body)  # expat refuses external entities and caps entity expansion
    except ET.ParseError:
        return [], []
    locs = [el.text.strip() for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "loc" and el.text]
    if root.tag.rsplit("}", 1)[-1] == "sitemapindex":
        return [], locs
    return locs, []


def sitemap_pages(fetcher: Fetcher, org: str, listed: list[str]) -> tuple[list[str], int]:
    """Page URLs from the origin's sitemaps (robots Sitemap lines, else /sitemap.xml); (urls, files read)."""
    queue = deque(listed or [f"{org}/sitemap.xml"])
    seen: set[str] = set()
    pages: list[str] = []
    while queue and len(seen) < MAX_SITEMAP_FILES:
        url = queue.popleft()
        if url in seen:
            continue
        seen.add(url)
        try:
            resp = fetcher.get(url, follow_checks=False)
        except FetchError:
            continue  # no sitemap is normal; a broken one only costs us its pages
        found, nested = parse_sitemap(resp.body, fetcher.policy.max_bytes)
        pages.extend(u for u in map(normalize_url, found) if u is not None)
        queue.extend(nested)
    return list(dict.fromkeys(pages)), len(seen)


# -- the frontier ----------------------------------------------------------------------------------


@dataclass
class CrawlResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # pages fetched by this crawl
    reused: list[dict[str, Any]] = field(default_factory=list)  # known pages this crawl reached again
    failures: Counter = field(default_factory=Counter)  # reason -> pages
    bytes_fetched: int = 0
    sitemap_files: int = 0
    sitemap_urls: int = 0
    seconds: float = 0.0


@dataclass
class _Origin:
    queue: deque = field(default_factory=deque)  # (url, depth)
    rules: OriginRules | None = None
    loading: bool = False
    in_flight: int = 0
    next_start: float = 0.0


def crawl(
    seeds: list[str],
    fetcher: Fetcher,
    rules: RulesCache,
    scope: Scope,
    *,
    max_depth: int,
    max_pages: int,
    concurrency: int,
    content_types: tuple[str, ...],
    use_sitemaps: bool,
    known: dict[str, dict[str, Any]] | None = None,
    refetch: bool = False,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> CrawlResult:
    """Crawl from `seeds`; returns the pages (fetched and reused) and the failures by reason."""
    known = known or {}
    out = CrawlResult()
    origins: dict[str, _Origin] = {}
    seen: set[str] = set()
    seed_set: set[str] = set()
    started = time.monotonic()

    def enqueue(url: str, depth: int) -> None:
        if url in seen:
            return
        seen.add(url)
        row = None if refetch or url in seed_set else known.get(url)
        if row is not None:  # reuse: no network, links from the stored body
            out.reused.append(row)
            seen.add(row["final_url"])
            if depth < max_depth and media_type(row["content_type"]) in HTML_TYPES:
                follow(extract_links(row["body"], row["final_url"], row["content_type"]), depth + 1)
            return
        origins.setdefault(origin(url), _Origin()).queue.append((url, depth))

    def follow(links: list[str], depth: int) -> None:
        if depth > max_depth:
            return
        for link in links:
            if scope.refuse(link) is None:
                enqueue(link, depth)

    def load_rules(org: str) -> tuple[OriginRules, list[str], int]:
        """robots.txt, then the sitemaps' page URLs and how many sitemap files were read."""
        org_rules = rules.get(org)
        if not use_sitemaps or org_rules.refused:
            return org_rules, [], 0
        return org_rules, *sitemap_pages(fetcher, org, org_rules.sitemaps)

    def fetch_page(url: str, depth: int) -> tuple[Response, list[str]]:
        resp = fetcher.get(url, content_types)
        links = []
        if depth < max_depth and media_type(resp.content_type) in HTML_TYPES:
            links = extract_links(resp.body, resp.final_url, resp.content_type)
        return resp, links

    for s in seeds:
        seed_set.add(s)
    for s in seeds:
        enqueue(s, 0)

    pending: dict[Future, tuple[str, str, int]] = {}  # future -> (kind, url or origin, depth)
    pages_in_flight = 0
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="crawl") as pool:
        while True:
            now = time.monotonic()
            wake = None  # earliest time a politeness delay ends
            for org, st in origins.items():
                if len(pending) >= concurrency:
                    break
                if not st.queue:
                    continue
                if st.rules is None:
                    if not st.loading:
                        st.loading = True
                        pending[pool.submit(load_rules, org)] = ("rules", org, 0)
                    continue
                if st.rules.refused:  # every page of a refused origin fails without a connection
                    while st.queue:
                        st.queue.popleft()
                        out.failures[st.rules.refused] += 1
                    continue
                per_origin = 1 if st.rules.delay > 0 else concurrency
                while st.queue and st.in_flight < per_origin and len(pending) < concurrency:
                    if len(out.rows) + pages_in_flight >= max_pages:
                        break
                    if now < st.next_start:
                        wake = st.next_start if wake is None else min(wake, st.next_start)
                        break
                    url, depth = st.queue.popleft()
                    reason = rules.refuse(url)
                    if reason is not None:
                        out.failures[reason] += 1
                        continue
                    pending[pool.submit(fetch_page, url, depth)] = ("page", url, depth)
                    st.in_flight += 1
                    st.next_start = now + st.rules.delay
                    pages_in_flight += 1
            if not pending:
                if wake is None:
                    break  # nothing in flight, nothing waiting on a delay: done (or at max_pages)
                time.sleep(max(0.0, wake - time.monotonic()))
                continue
            timeout = None if wake is None else max(0.0, wake - time.monotonic())
            done, _ = wait(list(pending), timeout=timeout, return_when=FIRST_COMPLETED)
            for fut in done:
                kind, key, depth = pending.pop(fut)
                if kind == "rules":
                    st = origins[key]
                    st.rules, sitemap_urls, n_files = fut.result()
                    out.sitemap_files += n_files
                    out.sitemap_urls += len(sitemap_urls)
                    follow(sitemap_urls, 1)
                    continue
                st = origins[origin(key)]
                st.in_flight -= 1
                pages_in_flight -= 1
                try:
                    resp, links = fut.result()
                except FetchError as e:
                    out.failures[e.reason] += 1
                    continue
                out.bytes_fetched += len(resp.body)
                out.rows.append(page_row(resp.url, resp.final_url, resp.status, resp.content_type, resp.fetched_at, resp.body))
                seen.add(resp.final_url)
                follow(links, depth + 1)
            progress(len(out.rows) + len(out.reused), len(seen))
    out.seconds = time.monotonic() - started
    return out

"""Supporting modules of the crawl stage (not stages themselves).

fetch.py        one HTTP(S) GET with the SSRF guard, caps, redirects and retries
crawler.py      the frontier: scope, robots.txt, sitemaps, politeness, links, incremental reuse
warc.py         WARC/ARC records -> pages (warcio)
local.py        local files and folders -> pages
pydoc_server.py the embedded default corpus: standard-library docs served on 127.0.0.1
page.py         the `pages` row every source produces
"""

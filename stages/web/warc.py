"""WARC and ARC files -> pages, with warcio (ARC records are read as WARC through arc2warc).

- response records: url from WARC-Target-URI, status and Content-Type from the HTTP headers, the
  payload with chunked transfer and gzip/deflate content encoding undone by warcio; only 2xx
  responses of an accepted content type become pages.
- resource records (a file captured as is, e.g. wget's log): status 200, the WARC Content-Type.
- revisit records say "same payload as an earlier capture": counted as duplicates, not emitted.
- request, warcinfo, metadata and conversion records describe the crawl: skipped, counted by type.
- A record whose payload ends before its Content-Length says (a truncated file) is counted as
  `truncated`; a file warcio cannot parse at all, or one that breaks mid-way, is counted as
  `not_warc` or `corrupt` and reading moves on to the next file. Nothing here raises.
"""
from __future__ import annotations

import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from stages.web.fetch import media_type
from stages.web.page import page_row

WARC_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz")


def warc_files(paths: list[str]) -> list[Path]:
    """The WARC/ARC files named by `paths` (files, or folders searched recursively), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(WARC_SUFFIXES)))
        else:
            out.append(p)
    return out


def _warc_date(value: str | None) -> datetime:
    """WARC-Date (ISO 8601, `Z` or an offset); the epoch when missing or unreadable."""
    try:
        return datetime.fromisoformat((value or "").replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return datetime.fromtimestamp(0, timezone.utc)


def read_warc(
    path: Path,
    failures: Counter,
    skipped: Counter,
    *,
    content_types: tuple[str, ...],
    max_bytes: int,
) -> Iterator[dict[str, Any]]:
    """Yield the page rows of one WARC/ARC file; count failures (by reason) and skipped records (by type)."""
    n_records = 0
    try:
        with open(path, "rb") as f:
            for record in ArchiveIterator(f, arc2warc=True):
                n_records += 1
                kind = record.rec_type
                if kind == "revisit":
                    skipped["revisit_duplicate"] += 1
                    continue
                if kind not in ("response", "resource"):
                    skipped[kind] += 1
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI") or ""
                if kind == "response":
                    if record.http_headers is None:  # e.g. a DNS response record: no HTTP inside
                        failures["no_http_headers"] += 1
                        continue
                    status = int(record.http_headers.get_statuscode() or 0)
                    content_type = record.http_headers.get_header("Content-Type") or ""
                    if not 200 <= status < 300:
                        failures[f"http_{status}"] += 1
                        continue
                else:
                    status = 200
                    content_type = record.rec_headers.get_header("Content-Type") or ""
                if media_type(content_type) not in content_types:
                    failures["content_type"] += 1
                    continue
                body = record.content_stream().read(max_bytes + 1)
                if len(body) > max_bytes:
                    failures["too_large"] += 1
                    continue
                if record.raw_stream.limit > 0:  # the file ended inside this record
                    failures["truncated"] += 1
                    continue
                if not url:
                    failures["no_target_uri"] += 1
                    continue
                fetched_at = _warc_date(record.rec_headers.get_header("WARC-Date"))
                yield page_row(url, url, status, content_type, fetched_at, body)
    except ArchiveLoadFailed:
        failures["not_warc" if n_records == 0 else "corrupt"] += 1
        return
    except (zlib.error, EOFError, ValueError, OSError, AttributeError, TypeError, KeyError, IndexError):
        # warcio on bytes that are not quite a record (tests/test_fuzz.py found AttributeError, too)
        failures["corrupt"] += 1
        return
    if n_records == 0:  # an empty file, or bytes warcio reads as no record at all
        failures["not_warc"] += 1

"""Local files and folders -> pages, with file:// URLs.

By suffix:
- .txt, .md            one page, text/plain; charset=utf-8 (must decode as UTF-8)
- .html, .htm          one page, text/html, bytes as they are (the extractor reads the charset)
- .jsonl (.jsonl.gz)   one page per line with a string "text" field, text/plain; the URL is the
                       line's "url" when it is one, else file://<path>#<id> or #line-<n>
- .parquet             one page per row of a "text" column, URL from "url"/"id" columns likewise

fetched_at is the file's modification time, so reading the same files twice gives the same pages.
Anything else is counted with a reason (unsupported_type, undecodable, empty, bad_json,
no_text_field, too_large, unreadable) and skipped.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from stages.web.page import page_row

TEXT_TYPE = "text/plain; charset=utf-8"
SUFFIXES = {".txt": "text", ".md": "text", ".html": "html", ".htm": "html", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}


def local_files(paths: list[str]) -> list[Path]:
    """Files named by `paths` (folders searched recursively, hidden files skipped), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)))
        else:
            out.append(p)
    return out


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):  # .jsonl.gz before .gz-less matches
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return None


def _record_url(record: dict[str, Any], file_url: str, position: str) -> str:
    url = record.get("url")
    if isinstance(url, str) and "://" in url:
        return url
    ident = record.get("id")
    return f"{file_url}#{ident}" if isinstance(ident, (str, int)) and str(ident) else f"{file_url}#{position}"


def _text_page(url: str, text: Any, fetched_at: datetime, failures: Counter, max_bytes: int) -> dict[str, Any] | None:
    if not isinstance(text, str):
        failures["no_text_field"] += 1
        return None
    body = text.encode("utf-8", errors="replace")  # lone surrogates from JSON escapes
    if not body.strip():
        failures["empty"] += 1
        return None
    if len(body) > max_bytes:
        failures["too_large"] += 1
        return None
    return page_row(url, url, 200, TEXT_TYPE, fetched_at, body)


def read_local(path: Path, failures: Counter, *, max_bytes: int) -> Iterator[dict[str, Any]]:
    """Yield the page rows of one local file; count what is skipped by reason."""
    kind = _kind(path)
    if kind is None:
        failures["unsupported_type"] += 1
        return
    path = path.resolve()
    url = path.as_uri()
    try:
        fetched_at = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        if kind == "parquet":
            yield from _parquet_pages(path, url, fetched_at, failures, max_bytes)
        elif kind == "jsonl":
            yield from _jsonl_pages(path, url, fetched_at, failures, max_bytes)
        else:
            if path.stat().st_size > max_bytes:
                failures["too_large"] += 1
                return
            body = path.read_bytes()
            if not body.strip():
                failures["empty"] += 1
            elif kind == "html":
                yield page_row(url, url, 200, "text/html", fetched_at, body)
            else:
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError:
                    failures["undecodable"] += 1
                    return
                yield page_row(url, url, 200, TEXT_TYPE, fetched_at, body)
    except (OSError, EOFError):  # unreadable, or a .gz that is not gzip / ends early
        failures["unreadable"] += 1


def _jsonl_pages(path: Path, url: str, fetched_at: datetime, failures: Counter, max_bytes: int) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    records = 0
    with opener(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            records += 1
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                failures["bad_json"] += 1
                continue
            if not isinstance(record, dict):
                failures["bad_json"] += 1
                continue
            row = _text_page(_record_url(record, url, f"line-{n}"), record.get("text"), fetched_at, failures, max_bytes)
            if row is not None:
                yield row
    if records == 0:
        failures["empty"] += 1


def _parquet_pages(path: Path, url: str, fetched_at: datetime, failures: Counter, max_bytes: int) -> Iterator[dict[str, Any]]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError):
        failures["bad_parquet"] += 1
        return
    names = pf.schema_arrow.names
    if "text" not in names:
        failures["no_text_column"] += 1
        return
    columns = [c for c in ("text", "url", "id") if c in names]
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            n += 1
            row = _text_page(_record_url(record, url, f"row-{n}"), record.get("text"), fetched_at, failures, max_bytes)
            if row is not None:
                yield row

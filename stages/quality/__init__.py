"""Document filters for the `filter` stage, one small object per paper (datatrove style).

Every filter has one method, `filter(doc) -> True | (False, reason) | (False, reason, detail)`:
`doc` is a row of the `docs` schema as a dict; `reason` is "<filter>:<rule>" (for example
"gopher_quality:min_words"); the optional `detail` says what was measured ("12 words < 50"). The
thresholds are keyword defaults with the values of the paper the filter comes from; a threshold of 0
turns its rule off.

A filter may also rewrite `doc["text"]` (C4 drops lines, PII scrubbing replaces spans) and add
counters to `doc["stats"]` (a dict name -> int) for the stage loop to sum. The loop in
`stages/filter.py` does all the counting and writes dropped documents to `excluded`.
"""
from __future__ import annotations

from typing import Protocol, Union

Verdict = Union[bool, tuple[bool, str], tuple[bool, str, str]]


class DocFilter(Protocol):
    name: str

    def filter(self, doc: dict) -> Verdict: ...


def add_stat(doc: dict, key: str, n: int) -> None:
    """Add `n` to counter `key` of this document (summed over documents by the stage loop)."""
    if n:
        stats = doc.setdefault("stats", {})
        stats[key] = stats.get(key, 0) + n

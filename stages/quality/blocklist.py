"""Word-list filter: drop a document that contains a listed word or phrase (the C4 "bad words" rule,
Raffel et al. 2020 §2.2, matched on word boundaries as datatrove's C4BadWordsFilter does).

The list is a UTF-8 text file, one word or phrase per line, `#` starts a comment; matching ignores
case. The default list (`blocklist_en.txt` next to this file) is a short list of spam and adult-site
markers; point `filter.blocklist_path` at another file (for example LDNOOBW's `en`) to use it.
"""
from __future__ import annotations

import re
from pathlib import Path

from stages.quality import Verdict

DEFAULT_LIST = Path(__file__).with_name("blocklist_en.txt")


def read_word_list(path: str | Path) -> list[str]:
    """The entries of a word-list file; OSError or UnicodeDecodeError if unreadable."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip().lower()
        if entry:
            entries.append(entry)
    return entries


class BlocklistFilter:
    name = "blocklist"

    def __init__(self, words: list[str] | tuple[str, ...]):
        self.words = tuple(words)
        # longest first, so "online casino" is reported rather than a shorter entry it contains
        alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self.pattern = re.compile(rf"\b(?:{alternatives})\b") if self.words else None

    @classmethod
    def from_file(cls, path: str | Path = DEFAULT_LIST) -> "BlocklistFilter":
        return cls(read_word_list(path))

    def filter(self, doc: dict) -> Verdict:
        if self.pattern is None:
            return True
        found = self.pattern.search(doc["text"].lower())  # lower() then a plain pattern beats re.IGNORECASE
        if found:
            return False, "blocklist", found.group(0)
        return True

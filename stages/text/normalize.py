"""Two normal forms of document text.

- `clean_text`: what a document looks like when stored. NFC, one kind of space, no control or
  zero-width characters, trailing blanks and runs of blank lines removed. Leading indentation is
  kept, because plain-text sources (code, reStructuredText) carry meaning in it.
- `simplify_text`: what two documents are compared on when deduplicating. It is datatrove's
  `simplify_text` (FineWeb): lowercase, every number -> "0", punctuation and symbols -> space,
  diacritics stripped (NFD, drop combining marks), whitespace collapsed. One deviation: the text is
  recomposed to NFC after the marks are dropped, so Hangul stays in syllables instead of jamo.
"""
from __future__ import annotations

import functools
import re
import sys
import unicodedata

# -- stored form ---------------------------------------------------------------------------------

_INNER_BLANKS = re.compile(r"[ \t]{2,}|\t")
_MANY_NEWLINES = re.compile(r"\n{3,}")
# a line made only of table rules: trafilatura renders empty table cells as "|  |  |"
_TABLE_RULE = re.compile(r"[|\s\-:+=]*\|[|\s\-:+=]*")


@functools.cache
def _display_table() -> dict[int, str | None]:
    """Unicode spaces -> " ", control/zero-width/soft-hyphen characters -> removed."""
    table: dict[int, str | None] = {}
    for c in range(sys.maxunicode + 1):
        cat = unicodedata.category(chr(c))
        if cat == "Zs" and c != 0x20:
            table[c] = " "
        elif cat in ("Zl", "Zp"):
            table[c] = "\n"
        elif cat == "Cc" and chr(c) not in "\n\t":
            table[c] = None
    # zero-width space, word joiner, BOM, soft hyphen; ZWJ/ZWNJ stay (they matter in Indic/Persian)
    table.update({0x200B: None, 0x2060: None, 0xFEFF: None, 0x00AD: None})
    return table


def clean_text(text: str) -> str:
    """NFC, uniform spaces, no control characters, no trailing blanks, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.translate(_display_table())
    lines = []
    for line in text.split("\n"):
        body = line.strip(" \t")
        if not body:
            lines.append("")
            continue
        if _TABLE_RULE.fullmatch(body):
            continue
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        lines.append(indent + _INNER_BLANKS.sub(" ", body))
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip("\n")


def count_words(text: str) -> int:
    return len(text.split())


# -- comparison form (datatrove simplify_text) -------------------------------------------------

_NUMBER = re.compile(r"\d+(\.\d+)?")


@functools.cache
def _punctuation_table() -> dict[int, str]:
    """Every punctuation (P*) and symbol (S*) code point -> space; ~8.5k entries, built once."""
    return {c: " " for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] in "PS"}


@functools.cache
def _combining_marks() -> dict[int, None]:
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Mn"}


def simplify_text(text: str) -> str:
    """datatrove's simplify_text: lowercase, numbers -> 0, punctuation -> space, no diacritics."""
    text = _NUMBER.sub("0", text.lower())
    text = text.translate(_punctuation_table())
    text = unicodedata.normalize("NFD", text).translate(_combining_marks())
    text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())  # str.split() splits on exactly the characters re's \s matches


def warm_up() -> None:
    """Build the lookup tables now (about a second), e.g. before forking workers that share them."""
    _display_table()
    _punctuation_table()
    _combining_marks()

"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", App. A.1.1; thresholds as in datatrove's GopherQualityFilter and
GopherRepetitionFilter).

Our definitions, pinned by tests (implementations differ by a few percent, see
shared/research/data-pipeline.md §1-2):
- tokens: runs of word characters and runs of other non-space characters ("x=1." -> x, =, 1, .), a
  regex stand-in for nltk's word_tokenize. Words are the word-character runs; word counts, mean word
  length and the alphabetic ratio ignore the symbol runs, as datatrove ignores punctuation.
- stop words count when present at least once, case-insensitively (the paper: "at least two of").
- lines are split on "\\n", paragraphs on two or more newlines.
- the top n-gram rule counts only an n-gram that occurs more than once (datatrove also counts a
  single occurrence, which drops short documents for being short, not repetitive).
- duplicate n-grams: the characters of every word inside an n-gram that repeats an earlier one, each
  word once (the paper's "characters contained within all duplicate n-grams"; datatrove instead
  skips n words after each repeat). N-grams are compared by a 64-bit hash of their word ids.
"""
from __future__ import annotations

import re

import numpy as np

from stages.quality import Verdict

WORD_RE = re.compile(r"\w+|[^\w\s]+")
ALNUM_RE = re.compile(r"\w+")  # the non-symbol tokens of WORD_RE
ALPHA_WORD_RE = re.compile(r"\b\w*[^\W\d_]\w*")  # a \w+ run with at least one letter
PARAGRAPH_RE = re.compile(r"\n{2,}")
LINES_RE = re.compile(r"\n+")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "-", "*", "‣", "◦")


def words(text: str) -> list[str]:
    """Tokens: runs of word characters and runs of other non-space characters."""
    return WORD_RE.findall(text)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, their total characters)."""
    seen: set[str] = set()
    n_dup = chars_dup = 0
    for x in items:
        if x in seen:
            n_dup += 1
            chars_dup += len(x)
        else:
            seen.add(x)
    return n_dup, chars_dup


def ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """(len(ids) - n + 1,) uint64: a polynomial hash of the word ids of each n-gram (wraps mod 2**64;
    a collision is astronomically rare and would only nudge a heuristic ratio)."""
    m = len(ids) - n + 1
    keys = np.zeros(max(m, 0), dtype=np.uint64)
    for k in range(n):
        keys = keys * np.uint64(1_000_003) + ids[k : k + m]
    return keys


def top_ngram_chars(lens: np.ndarray, ids: np.ndarray, n: int) -> int:
    """Characters covered by the most frequent n-gram: len(" ".join(ngram)) * count, 0 if none repeats.

    lens, ids: (N,) the length and vocabulary id of each word."""
    keys = ngram_keys(ids, n)
    if len(keys) == 0:
        return 0
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0
    start = int(first[top])
    return int(lens[start : start + n].sum() + n - 1) * int(counts[top])


def duplicate_ngram_chars(lens: np.ndarray, ids: np.ndarray, n: int) -> int:
    """Characters of the words covered by n-grams that repeat an earlier n-gram (first occurrences
    excluded, a word covered by several repeats counted once)."""
    keys = ngram_keys(ids, n)
    if len(keys) == 0:
        return 0
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    starts = np.nonzero(first[inverse] < np.arange(len(keys)))[0]  # (R,) positions of repeats
    edges = np.zeros(len(ids) + 1, dtype=np.int64)
    edges[starts] += 1  # starts are distinct, so fancy-index += is exact
    edges[starts + n] -= 1
    covered = np.cumsum(edges[:-1]) > 0  # (N,) word i lies inside some repeated n-gram
    return int(lens[covered].sum())


class GopherQualityFilter:
    name = "gopher_quality"

    def __init__(
        self,
        min_words: int = 50,
        max_words: int = 100_000,
        min_avg_word_length: float = 3.0,
        max_avg_word_length: float = 10.0,
        max_symbol_word_ratio: float = 0.1,
        max_bullet_lines_ratio: float = 0.9,
        max_ellipsis_lines_ratio: float = 0.3,
        min_alpha_words_ratio: float = 0.8,
        min_stop_words: int = 2,
        stop_words: tuple[str, ...] = STOP_WORDS,
    ):
        self.min_words = min_words
        self.max_words = max_words
        self.min_avg_word_length = min_avg_word_length
        self.max_avg_word_length = max_avg_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.min_alpha_words_ratio = min_alpha_words_ratio
        self.min_stop_words = min_stop_words
        self.stop_words = frozenset(stop_words)

    def filter(self, doc: dict) -> Verdict:
        text = doc["text"]
        ws = ALNUM_RE.findall(text)
        n = len(ws)
        if self.min_words and n < self.min_words:
            return False, "gopher_quality:min_words", f"{n} words < {self.min_words}"
        if self.max_words and n > self.max_words:
            return False, "gopher_quality:max_words", f"{n} words > {self.max_words}"
        if n == 0:  # only reachable with min_words off; every ratio below divides by n
            return False, "gopher_quality:min_words", "no words"

        mean_len = sum(map(len, ws)) / n
        if self.min_avg_word_length and mean_len < self.min_avg_word_length:
            return False, "gopher_quality:min_avg_word_length", f"{mean_len:.2f} < {self.min_avg_word_length}"
        if self.max_avg_word_length and mean_len > self.max_avg_word_length:
            return False, "gopher_quality:max_avg_word_length", f"{mean_len:.2f} > {self.max_avg_word_length}"

        if self.max_symbol_word_ratio:
            for symbol, count in (("#", text.count("#")), ("...", text.count("...") + text.count("…"))):
                if count / n > self.max_symbol_word_ratio:
                    return False, "gopher_quality:symbol_word_ratio", f"{symbol!r} {count / n:.3f} > {self.max_symbol_word_ratio}"

        lines = text.splitlines() or [""]
        if self.max_bullet_lines_ratio:
            ratio = sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines)
            if ratio > self.max_bullet_lines_ratio:
                return False, "gopher_quality:bullet_lines_ratio", f"{ratio:.3f} > {self.max_bullet_lines_ratio}"
        if self.max_ellipsis_lines_ratio:
            ratio = sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines)
            if ratio > self.max_ellipsis_lines_ratio:
                return False, "gopher_quality:ellipsis_lines_ratio", f"{ratio:.3f} > {self.max_ellipsis_lines_ratio}"

        if self.min_alpha_words_ratio:
            ratio = len(ALPHA_WORD_RE.findall(text)) / n
            if ratio < self.min_alpha_words_ratio:
                return False, "gopher_quality:alpha_words_ratio", f"{ratio:.3f} < {self.min_alpha_words_ratio}"

        if self.min_stop_words:
            found = self.stop_words.intersection(map(str.lower, ws))
            if len(found) < self.min_stop_words:
                return False, "gopher_quality:stop_words", f"{len(found)} distinct < {self.min_stop_words}"
        return True


class GopherRepetitionFilter:
    """Drops documents that repeat lines, paragraphs or n-grams (Gopher Table A1)."""

    name = "gopher_repetition"

    def __init__(
        self,
        dup_line_frac: float = 0.3,
        dup_para_frac: float = 0.3,
        dup_line_char_frac: float = 0.2,
        dup_para_char_frac: float = 0.2,
        top_ngrams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16)),
        dup_ngrams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),
    ):
        self.dup_line_frac = dup_line_frac
        self.dup_para_frac = dup_para_frac
        self.dup_line_char_frac = dup_line_char_frac
        self.dup_para_char_frac = dup_para_char_frac
        self.top_ngrams = top_ngrams
        self.dup_ngrams = dup_ngrams

    def filter(self, doc: dict) -> Verdict:
        text = doc["text"]
        n_chars = max(len(text), 1)

        paragraphs = PARAGRAPH_RE.split(text.strip())
        n_dup, chars_dup = find_duplicates(paragraphs)
        if self.dup_para_frac and n_dup / len(paragraphs) > self.dup_para_frac:
            return False, "gopher_repetition:dup_para_frac", f"{n_dup}/{len(paragraphs)} paragraphs"
        if self.dup_para_char_frac and chars_dup / n_chars > self.dup_para_char_frac:
            return False, "gopher_repetition:dup_para_char_frac", f"{chars_dup / n_chars:.3f} > {self.dup_para_char_frac}"

        lines = LINES_RE.split(text.strip())
        n_dup, chars_dup = find_duplicates(lines)
        if self.dup_line_frac and n_dup / len(lines) > self.dup_line_frac:
            return False, "gopher_repetition:dup_line_frac", f"{n_dup}/{len(lines)} lines"
        if self.dup_line_char_frac and chars_dup / n_chars > self.dup_line_char_frac:
            return False, "gopher_repetition:dup_line_char_frac", f"{chars_dup / n_chars:.3f} > {self.dup_line_char_frac}"

        ws = words(text)
        vocab: dict[str, int] = {}
        ids = np.array([vocab.setdefault(w, len(vocab)) for w in ws], dtype=np.uint64)  # (N,)
        lens = np.array([len(w) for w in ws], dtype=np.int64)  # (N,)
        for n, frac in self.top_ngrams:
            ratio = top_ngram_chars(lens, ids, n) / n_chars
            if frac and ratio > frac:
                return False, f"gopher_repetition:top_{n}gram", f"{ratio:.3f} > {frac}"
        for n, frac in self.dup_ngrams:
            ratio = duplicate_ngram_chars(lens, ids, n) / n_chars
            if frac and ratio > frac:
                return False, f"gopher_repetition:dup_{n}gram", f"{ratio:.3f} > {frac}"
        return True

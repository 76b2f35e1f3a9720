"""FineWeb's own rules (Penedo et al. 2024, "The FineWeb Datasets: Decanting the Web for the Finest
Text Data at Scale", §3.3; datatrove's FineWebQualityFilter, code defaults).

Line ratios are taken over non-empty lines, so blank lines between paragraphs do not count as short
lines; words for the list ratio are the Gopher tokens (punctuation runs included, like nltk's).
"""
from __future__ import annotations

from stages.quality import Verdict
from stages.quality.gopher import find_duplicates, words

STOP_CHARS = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")


class FineWebQualityFilter:
    name = "fineweb"

    def __init__(
        self,
        line_punct_ratio: float = 0.12,
        line_punct_exclude_zero: bool = False,
        short_line_ratio: float = 0.67,
        short_line_length: int = 30,
        char_dup_ratio: float = 0.01,
        list_ratio: float = 0.3,
    ):
        self.line_punct_ratio = line_punct_ratio
        self.line_punct_exclude_zero = line_punct_exclude_zero
        self.short_line_ratio = short_line_ratio
        self.short_line_length = short_line_length
        self.char_dup_ratio = char_dup_ratio
        self.list_ratio = list_ratio

    def filter(self, doc: dict) -> Verdict:
        text = doc["text"]
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return False, "fineweb:short_line_ratio", "no non-empty lines"

        if self.line_punct_ratio:
            ratio = sum(line.rstrip().endswith(STOP_CHARS) for line in lines) / len(lines)
            if ratio <= self.line_punct_ratio and not (ratio == 0 and self.line_punct_exclude_zero):
                return False, "fineweb:line_punct_ratio", f"{ratio:.3f} <= {self.line_punct_ratio}"

        if self.short_line_ratio:
            ratio = sum(len(line) <= self.short_line_length for line in lines) / len(lines)
            if ratio >= self.short_line_ratio:
                return False, "fineweb:short_line_ratio", f"{ratio:.3f} >= {self.short_line_ratio}"

        if self.char_dup_ratio:
            ratio = find_duplicates(lines)[1] / max(len(text.replace("\n", "")), 1)
            if ratio >= self.char_dup_ratio:
                return False, "fineweb:char_dup_ratio", f"{ratio:.3f} >= {self.char_dup_ratio}"

        if self.list_ratio:
            ratio = text.count("\n") / max(len(words(text)), 1)
            if ratio > self.list_ratio:
                return False, "fineweb:list_ratio", f"{ratio:.3f} > {self.list_ratio}"
        return True

"""C4 cleaning rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", §2.2; TFDS c4_utils.py; datatrove's C4QualityFilter).

Line rules drop lines and rewrite the text; document rules drop the document. As in FineWeb, the
"keep only lines ending in terminal punctuation" rule is off by default (`terminal_punct=False`):
on its own it removes about a tenth of the web's tokens.

Deviations: kept lines keep their indentation (C4 strips every line), so that code and nested lists
stay readable; sentences are counted with a regex (a run of . ! ? or an ellipsis followed by a space
or the end of the line ends a sentence) instead of nltk's punkt.
"""
from __future__ import annotations

import re

from stages.quality import Verdict, add_stat

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
SENTENCE_END_RE = re.compile(r"[.!?…]+[\"')\]]*(?=\s|$)")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def count_sentences(line: str) -> int:
    """Sentence ends in the line, plus one for a trailing sentence without an end mark."""
    line = line.rstrip()
    ends = [m.end() for m in SENTENCE_END_RE.finditer(line)]
    return len(ends) + (0 if ends and ends[-1] == len(line) else 1)


class C4QualityFilter:
    name = "c4"

    def __init__(
        self,
        remove_citations: bool = True,
        terminal_punct: bool = False,
        min_sentences: int = 5,
        min_words_per_line: int = 3,
        max_word_length: int = 1000,
        lorem_ipsum: bool = True,
        javascript: bool = True,
        curly_bracket: bool = True,
        policy: bool = True,
    ):
        self.remove_citations = remove_citations
        self.terminal_punct = terminal_punct
        self.min_sentences = min_sentences
        self.min_words_per_line = min_words_per_line
        self.max_word_length = max_word_length
        self.lorem_ipsum = lorem_ipsum
        self.javascript = javascript
        self.curly_bracket = curly_bracket
        self.policy = policy

    def filter(self, doc: dict) -> Verdict:
        kept: list[str] = []
        n_sentences = 0
        for line in doc["text"].split("\n"):
            stripped = line.strip()
            ws = stripped.split()
            if self.max_word_length and any(len(w) > self.max_word_length for w in ws):
                continue
            if self.remove_citations:
                line = CITATION_RE.sub("", line)
                stripped = line.strip()
            if self.terminal_punct and (not stripped.endswith(END_PUNCTUATION) or stripped.endswith("...")):
                continue
            if self.min_words_per_line and len(ws) < self.min_words_per_line:
                continue
            lower = stripped.lower()
            if self.lorem_ipsum and "lorem ipsum" in lower:
                return False, "c4:lorem_ipsum", stripped[:200]
            if self.javascript and "javascript" in lower:
                continue
            if self.curly_bracket and "{" in stripped:
                return False, "c4:curly_bracket", stripped[:200]
            if self.policy and any(p in lower for p in POLICY_SUBSTRINGS):
                continue
            if stripped:
                n_sentences += count_sentences(stripped)
            kept.append(line.rstrip())
        if self.min_sentences and n_sentences < self.min_sentences:
            return False, "c4:min_sentences", f"{n_sentences} sentences < {self.min_sentences}"
        text = "\n".join(kept).strip("\n")
        if not text.strip():
            return False, "c4:no_lines_left", "every line was removed"
        add_stat(doc, "c4/lines_removed", doc["text"].count("\n") + 1 - len(kept))
        doc["text"] = text
        return True

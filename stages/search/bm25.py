"""BM25 over passages with `bm25s` (Lù 2024, "BM25S: Orders of magnitude faster lexical search via
eager sparse scoring"), Lucene's variant with k1 = 1.5, b = 0.75 (bm25s' defaults).

Our term splitter instead of bm25s' default pattern (which drops one-letter words and splits dotted
names): a dotted or snake_case name gives itself and its parts ("os.path.join" -> os.path.join, os,
path, join), words are lower-cased, English stopwords dropped and the rest Snowball-stemmed (PyStemmer),
so "parsing" finds "parse". The same `terms` measures a query's word overlap with its passage.

    index = BM25Index.build(texts)
    ids, scores = index.search(["how to parse a query string"], k=10)   # (Q, k) each
    index.coverage("how to parse a query string", ids[0][:5])         # in [0, 1]

Coverage, the "is it in the corpus at all" signal of `family rag` (stages/search/pipeline.py): the
largest share of the query's idf that one of the given passages holds,

    coverage(q, P) = max_{p in P} sum_{t in T(q) & T(p)} idf(t) / sum_{t in T(q)} idf(t)

over the query's distinct terms T(q), with BM25's idf(t) = ln(1 + (N - df_t + 0.5) / (df_t + 0.5))
(a term no passage has gets the largest idf). A question about the corpus finds its rare words in a
top passage (the name it asks about); an off-topic one ("the capital of Australia") does not.
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|\d+")
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it its no not of on or such that the their then there these "
    "they this to was will with from how do does what which who whom i you we he she can could should would may "
    "might must has have had been being when where why all any each other some than too very s t just also".split()
)


@functools.lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def terms(text: str) -> list[str]:
    """BM25 terms of `text` (see the module docstring)."""
    out = []
    for m in WORD.finditer(text):
        word = m.group(0).lower()
        parts = [p for p in re.split(r"[._]", word) if p]
        if len(parts) > 1:
            out.append(word)
        out += [p for p in parts if p not in STOPWORDS]
    return _stemmer().stemWords(out)


class BM25Index:
    """A bm25s index of passage texts; search returns row numbers into the texts it was built on."""

    def __init__(self, retriever, n: int, doc_terms: list[frozenset[str]] | None = None):
        self.retriever, self.n = retriever, n
        self.doc_terms = doc_terms  # each passage's distinct terms (for coverage; None after load)
        self.df = Counter(t for d in doc_terms for t in d) if doc_terms is not None else None

    @classmethod
    def build(cls, texts: list[str], k1: float = 1.5, b: float = 0.75) -> "BM25Index":
        import bm25s

        if not texts:
            raise ValueError("BM25 over no passages")
        retriever = bm25s.BM25(k1=k1, b=b)
        toks = [terms(t) or ["\x00"] for t in texts]
        retriever.index(toks, show_progress=False)
        return cls(retriever, len(texts), [frozenset(t) for t in toks])

    def _idf(self, term: str) -> float:
        df = self.df.get(term, 0)  # only coverage calls it, after checking the index was built here
        return math.log(1 + (self.n - df + 0.5) / (df + 0.5))

    def coverage(self, query: str, rows: Sequence[int]) -> float:
        """The largest idf-weighted share of the query's terms held by one passage of `rows` (module
        docstring); 0 for a query without terms or no rows."""
        if self.doc_terms is None:
            raise ValueError("coverage needs an index built here (a loaded bm25s index keeps no term sets)")
        q = sorted(set(terms(query)))  # summed in one order: a set's order changes with PYTHONHASHSEED
        idf = {t: self._idf(t) for t in q}  # dicts keep q's sorted order
        total = sum(idf.values())
        if not q or total <= 0:
            return 0.0
        return max((sum(w for t, w in idf.items() if t in self.doc_terms[r]) / total for r in rows), default=0.0)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers (Q, k) and scores (Q, k), best first; k is capped at the number of passages.
        A query with no known term scores 0 everywhere (its rows are then in index order)."""
        k = min(k, self.n)
        toks = [terms(q) or ["\x00"] for q in queries]
        ids, scores = self.retriever.retrieve(toks, k=k, show_progress=False, n_threads=1)
        return np.asarray(ids), np.asarray(scores, dtype=np.float32)

    def save(self, path: str | Path) -> None:
        self.retriever.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "BM25Index":
        import bm25s

        retriever = bm25s.BM25.load(str(path))
        return cls(retriever, int(retriever.scores["num_docs"]))

"""Ranking metrics per query, their means with 95% bootstrap intervals, and reciprocal rank fusion.

For a ranking r_1..r_n of passage ids and graded relevance rel(d) (0 when not judged):
    DCG@k   = sum_{i<=k} (2^rel(r_i) - 1) / log2(i + 1);  nDCG@k = DCG@k / DCG@k of the ideal order
    MRR@k   = 1 / (rank of the first r_i with rel >= 1), 0 when none is in the top k
    Recall@k = |{r_i, i <= k : rel >= 1}| / |{d : rel(d) >= 1}|
as trec_eval computes them (Järvelin & Kekäläinen 2002 for nDCG's exponential gain).

Reciprocal rank fusion (Cormack, Clarke & Buettcher 2009): score(d) = sum over rankings of
1 / (k + rank(d)), rank from 1, k = 60 (the paper's value, also sentence-transformers' rrf_k).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

KS = (10, 50)


def ndcg_at(ranking: Sequence[str], rel: dict[str, int], k: int) -> float:
    dcg = sum((2 ** rel.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted(rel.values(), reverse=True)[:k]
    idcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at(ranking: Sequence[str], rel: dict[str, int], k: int) -> float:
    for i, d in enumerate(ranking[:k]):
        if rel.get(d, 0) >= 1:
            return 1.0 / (i + 1)
    return 0.0


def recall_at(ranking: Sequence[str], rel: dict[str, int], k: int) -> float:
    relevant = {d for d, r in rel.items() if r >= 1}
    return len(relevant & set(ranking[:k])) / len(relevant) if relevant else 0.0


def per_query(rankings: Sequence[Sequence[str]], qrels: Sequence[dict[str, int]]) -> dict[str, np.ndarray]:
    """Each metric (ndcg@10, mrr@10, recall@10, recall@50) per query, as arrays (Q,)."""
    out = {"ndcg@10": [], "mrr@10": [], "recall@10": [], "recall@50": []}
    for ranking, rel in zip(rankings, qrels):
        out["ndcg@10"].append(ndcg_at(ranking, rel, 10))
        out["mrr@10"].append(mrr_at(ranking, rel, 10))
        out["recall@10"].append(recall_at(ranking, rel, 10))
        out["recall@50"].append(recall_at(ranking, rel, 50))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (per-query scores, or paired
    differences of two systems on the same queries)."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summary(scores: dict[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    """{prefix+metric: mean, prefix+metric+"_lo"/"_hi": its 95% interval} for every metric."""
    out = {}
    for name, v in scores.items():
        lo, hi = bootstrap_ci(v)
        out |= {f"{prefix}{name}": float(v.mean()) if len(v) else float("nan"), f"{prefix}{name}_lo": lo,
                f"{prefix}{name}_hi": hi}
    return out


def rrf(rankings: Sequence[Sequence[str]], k: int = 60, depth: int | None = None) -> list[str]:
    """One fused ranking of several rankings of passage ids (ties: the order first seen)."""
    score: dict[str, float] = {}
    for ranking in rankings:
        for i, d in enumerate(ranking):
            score[d] = score.get(d, 0.0) + 1.0 / (k + i + 1)
    fused = sorted(score, key=lambda d: -score[d])
    return fused[:depth] if depth else fused

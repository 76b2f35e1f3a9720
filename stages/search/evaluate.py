"""The retrieval data as the embed and rerank stages read it, the first-stage rankings (BM25, dense,
hybrid) and the report of several systems on the same held-out queries.

Every system ranks ALL passages (every split) for a query; only the queries are held out. A report
gives each system's mean metric with its 95% bootstrap interval, the paired difference to a
reference system with its interval (the same queries, so the interval is that of the difference),
and nDCG@10 per query kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stages.contract import StageError
from stages.search.bm25 import BM25Index
from stages.search.metrics import bootstrap_ci, per_query, rrf, summary
from storage.artifacts import Artifact
from storage.parquet import SchemaError, read_table

RRF_K = 60


@dataclass
class RetrievalData:
    passages: list[dict[str, Any]]  # id, url, title, text, kind, split
    pairs: dict[str, list[dict[str, Any]]]  # split -> rows (id, query, kind, positive, negatives, overlap)
    qrels: dict[str, dict[str, int]]  # query id -> passage id -> relevance

    @property
    def ids(self) -> list[str]:
        return [p["id"] for p in self.passages]

    @property
    def texts(self) -> list[str]:
        return [p["text"] for p in self.passages]


def load_data(inputs: dict[str, Artifact], stage: str) -> RetrievalData:
    """passages, pairs and qrels of the retrieval stage, checked against their schemas: a missing or
    mistyped dataset is one line naming the file and the stage to rebuild."""
    tables = {}
    for name in ("passages", "pairs", "qrels"):
        if name not in inputs:
            raise StageError(f"{stage}: no input {name!r}; give it in inputs.json")
        try:
            tables[name] = read_table(inputs[name].path, name).to_pylist()
        except (SchemaError, FileNotFoundError, OSError) as e:
            raise StageError(f"{stage}: input {name!r}: {e}; rebuild the retrieval stage") from None
    if not tables["passages"]:
        raise StageError(f"{stage}: input 'passages' at {inputs['passages'].path} has no passages; rebuild the retrieval stage")
    pairs: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for row in tables["pairs"]:
        pairs.setdefault(row["split"], []).append(row)
    qrels: dict[str, dict[str, int]] = {}
    for row in tables["qrels"]:
        qrels.setdefault(row["query_id"], {})[row["doc_id"]] = row["relevance"]
    return RetrievalData(tables["passages"], pairs, qrels)


def bm25_rankings(index: BM25Index, ids: list[str], queries: list[str], depth: int) -> list[list[str]]:
    rows, _ = index.search(queries, depth)
    return [[ids[i] for i in row] for row in rows]


def dense_rankings(q: torch.Tensor, p: torch.Tensor, ids: list[str], depth: int) -> list[list[str]]:
    """Top `depth` passages by cosine (the embeddings are normalised) for each query (Q, d) over (N, d)."""
    top = (q @ p.T).topk(min(depth, len(ids)), dim=1).indices  # (Q, depth)
    return [[ids[i] for i in row] for row in top.tolist()]


def hybrid_rankings(*systems: list[list[str]], depth: int, k: int = RRF_K) -> list[list[str]]:
    return [rrf(list(r), k=k, depth=depth) for r in zip(*systems)]


def report(systems: dict[str, list[list[str]]], rows: list[dict[str, Any]], qrels: dict[str, dict[str, int]],
           prefixes: dict[str, str], deltas: tuple[tuple[str, str], ...] = ()) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics of each system (under its prefix), the paired differences `a - b` of nDCG@10 for each
    (a, b) in deltas (delta_<a>_<b>_ndcg@10 with its interval), and a table of nDCG@10 per system and
    query kind."""
    rel = [qrels.get(r["id"], {}) for r in rows]
    scores = {name: per_query(ranks, rel) for name, ranks in systems.items()}
    metrics: dict[str, float] = {}
    for name, s in scores.items():
        metrics |= summary(s, prefixes[name])
    for a, b in deltas:
        d = scores[a]["ndcg@10"] - scores[b]["ndcg@10"]
        lo, hi = bootstrap_ci(d)
        metrics |= {f"delta_{a}_{b}_ndcg@10": float(d.mean()), f"delta_{a}_{b}_ndcg@10_lo": lo,
                    f"delta_{a}_{b}_ndcg@10_hi": hi}
    table = []
    kinds = sorted({r["kind"] for r in rows})
    for kind in (*kinds, "all"):
        mask = np.array([kind in (r["kind"], "all") for r in rows])
        row: dict[str, Any] = {"kind": kind, "queries": int(mask.sum()),
                               "mean_overlap": float(np.mean([r["overlap"] for r, m in zip(rows, mask) if m]))}
        for name, s in scores.items():
            row[f"{name}_ndcg@10"] = float(s["ndcg@10"][mask].mean())
        table.append(row)
    return metrics, table


def markdown(table: list[dict[str, Any]]) -> str:
    if not table:
        return ""
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)

"""Retrieval data: the clean corpus as passages, queries with mined hard negatives, and relevance judgements.

What: reads `docs_clean` and writes three Parquet datasets (storage/schemas.py):
- `passages`: every page chunked by meaning (stages/search/corpus.py: a pydoc page by its docstring
  sections, functions and classes; any other page by paragraphs), each with its page URL and anchor,
  title and its page's split;
- `pairs`: one row per query (kinds signature, heading, first_sentence, paraphrase), its positive
  passage, hard negatives mined with BM25 (train queries only) and its word overlap with the positive;
- `qrels`: (query id, passage id, relevance): 2 for the passage the query was made from, 1 for the
  other chunks of the same entry.

Split by page (val_frac, test_frac of the pages by URL hash): train pairs come from train pages only
and their negatives are train passages only, so no held-out text is trained on; val and test queries
ask about held-out pages (val for choices, test reported only), at most `max_eval_queries` each; a
retriever always searches every passage.

Hard negatives (as sentence-transformers' `mine_hard_negatives` with range_min and NV-Retriever's
advice): BM25 ranks the train passages for the query, the relevant ones are removed, the first
`skip_top` of the rest are skipped as likely unjudged positives (a near-duplicate entry, an alias),
and `n_negatives` are drawn from the next `mine_depth`.

The overlap distribution (share of a query's BM25 terms found in its positive, per kind) is reported,
with the share of low-overlap queries (overlap <= 0.5): those BM25 cannot match by words.

Run:
    python -m stages.retrieval --config c.json --inputs i.json --run-dir DIR   (i.json = {"docs_clean": "DIR"})
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.contract import StageContext, StageError, StageResult, main
from stages.search.bm25 import BM25Index
from stages.search.corpus import Passage, Query, overlap, page_passages, page_queries, page_split
from storage.artifacts import Artifact
from storage.parquet import SchemaError, files, iter_rows, write_table

INPUTS = ("docs_clean",)
OUTPUTS = ("passages", "pairs", "qrels")
KINDS = ("signature", "heading", "first_sentence", "paraphrase")
LOW_OVERLAP = 0.5


@dataclass(frozen=True)
class Config:
    max_chars: int = 600  # a passage's length at most (~170 tokens of the tiny tokenizer: a query fits beside it)
    max_chunks: int = 3  # passages per entry at most; a longer text's rest is dropped (entries_cut counts them)
    val_frac: float = 0.1  # of the pages
    test_frac: float = 0.2
    kinds: tuple[str, ...] = KINDS
    n_negatives: int = 4  # mined per train query
    skip_top: int = 3
    mine_depth: int = 30
    max_eval_queries: int = 500  # per held-out split (val, test), a seeded sample
    min_passage_chars: int = 40  # shorter passages (a bare heading) are dropped

    def validate(self) -> None:
        if not 0 <= self.val_frac < 1 or not 0 < self.test_frac < 1 or self.val_frac + self.test_frac >= 1:
            raise ValueError(f"val_frac and test_frac must leave train pages, got {self.val_frac}, {self.test_frac}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be some of {list(KINDS)}, got {list(self.kinds)}")
        for name in ("max_chars", "max_chunks", "mine_depth", "max_eval_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_negatives < 0 or self.skip_top < 0 or self.min_passage_chars < 0:
            raise ValueError("n_negatives, skip_top and min_passage_chars must be >= 0")


def mine_negatives(index: BM25Index, ids: list[str], queries: list[Query], n: int, skip_top: int, depth: int,
                   rng: random.Random) -> list[list[str]]:
    """Per query, n passage ids drawn from BM25 ranks [skip_top, skip_top + depth) of the unjudged ones."""
    if n == 0 or not queries:
        return [[] for _ in queries]
    k = skip_top + depth + max(len(q.relevant) for q in queries)
    rows, _ = index.search([q.text for q in queries], k)
    out = []
    for q, row in zip(queries, rows):
        ranked = [ids[i] for i in row if ids[i] not in q.relevant][skip_top:skip_top + depth]
        out.append(rng.sample(ranked, min(n, len(ranked))))
    return out


def overlap_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per split and kind: the number of queries, overlap quantiles and the low-overlap share."""
    table = []
    for split in ("train", "val", "test"):
        for kind in (*KINDS, "all"):
            v = np.array([r["overlap"] for r in rows if r["split"] == split and kind in (r["kind"], "all")])
            if len(v):
                q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
                table.append({"split": split, "kind": kind, "queries": len(v), "p10": q[0], "p25": q[1], "median": q[2],
                              "p75": q[3], "p90": q[4], "low_overlap_share": float((v <= LOW_OVERLAP).mean())})
    return table


def summarize(counts: dict[str, Any], table: list[dict[str, Any]]) -> StageResult:
    metrics = {k: float(v) for k, v in counts.items()}
    for r in table:
        if r["kind"] == "all":
            metrics[f"{r['split']}_queries"] = float(r["queries"])
            metrics[f"{r['split']}_overlap_median"] = r["median"]
            metrics[f"{r['split']}_low_overlap_share"] = r["low_overlap_share"]
        elif r["split"] == "test":
            metrics[f"test_queries/{r['kind']}"] = float(r["queries"])
    lines = [f"Retrieval data: {counts['passages']} passages from {counts['pages_with_passages']} pages "
             f"({counts['pages_without_passages']} pages gave none; {counts['entries_cut']} entries cut "
             f"at max_chunks); queries train / val / test {metrics.get('train_queries', 0):.0f} / "
             f"{metrics.get('val_queries', 0):.0f} / {metrics.get('test_queries', 0):.0f}.", "",
             "Word overlap of a query with its positive passage (share of its BM25 terms found there):", "",
             "| split | kind | queries | p10 | p25 | median | p75 | p90 | overlap <= 0.5 |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['split']} | {r['kind']} | {r['queries']} | {r['p10']:.2f} | {r['p25']:.2f} | {r['median']:.2f} | "
              f"{r['p75']:.2f} | {r['p90']:.2f} | {r['low_overlap_share']:.2f} |" for r in table]
    return StageResult(outputs={"passages": {"rows": counts["passages"]}, "pairs": {"rows": counts["queries"]},
                                "qrels": {"rows": counts["qrels"]}},
                       metrics=metrics, summary="\n".join(lines), tables={"overlap": table})


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # the passages of every page, and each page's queries
    src = inputs["docs_clean"].path
    try:
        docs = list(iter_rows(src, columns=["id", "url", "title", "text"])) if files(src) else []
    except (FileNotFoundError, SchemaError, KeyError) as e:
        raise StageError(f"retrieval: cannot read docs_clean at {src} ({e}); rebuild the filter stage") from None
    passages: list[Passage] = []
    queries: list[tuple[Query, str]] = []  # (query, split)
    seen: set[str] = set()
    counts = {"pages": len(docs), "pages_without_passages": 0, "entries_cut": 0, "duplicate_passages": 0}
    split_of: dict[str, str] = {}
    for i, doc in enumerate(docs):
        page = [p for p in page_passages(doc["id"], doc["url"], doc["title"] or "", doc["text"] or "", cfg.max_chars,
                                         cfg.max_chunks + 1) if len(p.text) >= cfg.min_passage_chars]
        kept = []
        for p in page:  # one more chunk than allowed was asked for: its presence counts a drop
            if p.id in seen:
                counts["duplicate_passages"] += 1
            elif sum(c.entry == p.entry for c in kept) >= cfg.max_chunks:
                counts["entries_cut"] += 1
            else:
                seen.add(p.id)
                kept.append(p)
        if not kept:
            counts["pages_without_passages"] += 1
            continue
        split = page_split(doc["url"], cfg.val_frac, cfg.test_frac)
        passages += kept
        for p in kept:
            split_of[p.id] = split
        queries += [(q, split) for q in page_queries(kept) if q.kind in cfg.kinds]
        if i % 50 == 0:
            ctx.progress(i + 1, len(docs), "passages", passages=len(passages))
    if not passages:
        raise StageError(f"retrieval: the corpus at {src} gave no passages ({len(docs)} pages); "
                         f"check the crawl and filter stages")
    counts |= {"passages": len(passages), "pages_with_passages": len(docs) - counts["pages_without_passages"]}

    # held-out queries: a seeded sample per split; train queries: BM25 hard negatives among train passages
    rng = random.Random(ctx.seed)
    by_split = {s: [q for q, qs in queries if qs == s] for s in ("train", "val", "test")}
    for s in ("val", "test"):
        if len(by_split[s]) > cfg.max_eval_queries:
            by_split[s] = rng.sample(by_split[s], cfg.max_eval_queries)
    if not by_split["train"] or not by_split["test"]:
        raise StageError(f"retrieval: {len(by_split['train'])} train and {len(by_split['test'])} test queries from "
                         f"{counts['pages_with_passages']} pages; a corpus needs more pages (or other val_frac/test_frac)")
    train_passages = [p for p in passages if split_of[p.id] == "train"]
    ctx.progress(0, 1, "mining hard negatives")
    index = BM25Index.build([p.text for p in train_passages])
    negatives = mine_negatives(index, [p.id for p in train_passages], by_split["train"], cfg.n_negatives,
                               cfg.skip_top, cfg.mine_depth, rng)
    ctx.progress(1, 1, "mining hard negatives")
    text_of = {p.id: p.text for p in passages}
    pair_rows, qrel_rows = [], []
    for s, qs in by_split.items():
        negs = negatives if s == "train" else [[] for _ in qs]
        for q, neg in zip(qs, negs):
            pair_rows.append({"id": q.id, "query": q.text, "kind": q.kind, "positive": q.positive, "negatives": neg,
                              "overlap": overlap(q.text, text_of[q.positive]), "split": s})
            qrel_rows += [{"query_id": q.id, "doc_id": d, "relevance": r} for d, r in q.relevant.items()]

    # write
    write_table([{"id": p.id, "doc_id": p.doc_id, "url": p.url, "title": p.title, "text": p.text, "kind": p.kind,
                  "split": split_of[p.id]} for p in passages], ctx.output("passages") / "part-00000.parquet", "passages")
    write_table(pair_rows, ctx.output("pairs") / "part-00000.parquet", "pairs")
    write_table(qrel_rows, ctx.output("qrels") / "part-00000.parquet", "qrels")
    counts |= {"queries": len(pair_rows), "qrels": len(qrel_rows), "train_passages": len(train_passages)}
    return summarize(counts, overlap_table(pair_rows))


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

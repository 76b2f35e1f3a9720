"""Retrieval latency of a built home: BM25, a dense query, reranking 20 candidates; ours against the
sentence-transformers loads of the same exported members.

    python -m bench.retrieval [--home DIR] [--queries N]      (after `family run`; default home ./.family)

Per query (the home's test queries, first N by id), interleaved so machine noise hits every path alike:
  bm25:          bm25s top-10 over every passage (our term splitter);
  dense:         our embedder: the query's embedding (instruction prefix, EOS pooling) and the cosine
                 top-10 over the passage index;
  rerank20:      our reranker scoring the hybrid's top 20 for the query;
  st_dense:      SentenceTransformer(embedder/hf).encode_query of the query (embedding only);
  st_rerank20:   CrossEncoder(reranker/hf).predict of the same 20 pairs.
The st_ paths are skipped with a note when sentence-transformers is missing. Targets on a 2-core
CPU: bm25 < 20 ms, dense < 50 ms, rerank20 < 1 s. Median and p90 in milliseconds, single-threaded
torch as a server process would pin it. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TARGETS_MS = {"bm25": 20.0, "dense": 50.0, "rerank20": 1000.0}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def main(argv: list[str] | None = None) -> int:
    from flows.cli import resolve_model
    from stages.search.pipeline import Retriever, RetrievalError
    from storage.home import Home
    from storage.parquet import read_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    for k in ("passages", "pairs", "embedder", "reranker"):
        p.add_argument(f"--{k}", type=Path, help=f"the {k} directory (default: the home's newest)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    home = Home.resolve(args.home)
    try:
        paths = {k: getattr(args, k) or resolve_model(home, k) for k in ("passages", "pairs", "embedder", "reranker")}
        r = Retriever.open(paths["passages"], paths["embedder"], paths["reranker"])
    except (FileNotFoundError, RetrievalError) as e:
        print(f"error: {e}; build the family first (family run)", file=sys.stderr)
        return 2
    rows = sorted((x for x in read_table(paths["pairs"], "pairs").to_pylist() if x["split"] == "test"), key=lambda x: x["id"])
    queries = [x["query"] for x in rows[:args.queries]]
    try:
        import sentence_transformers
        from sentence_transformers import CrossEncoder, SentenceTransformer

        st = SentenceTransformer(str(paths["embedder"] / "hf"), device="cpu", local_files_only=True)
        folder = paths["reranker"] / "hf"
        if tuple(int(x) for x in sentence_transformers.__version__.split(".")[:2]) < (5, 4):
            print(f"note: sentence-transformers {sentence_transformers.__version__} predates 5.4 (the first that reads a "
                  f"CausalLM yes/no reranker): using {folder / 'seq-cls'}", file=sys.stderr)
            folder = folder / "seq-cls"
        ce = CrossEncoder(str(folder), device="cpu", local_files_only=True)
    except ImportError:
        st = ce = None
        print("note: sentence-transformers is not installed; st_ paths skipped", file=sys.stderr)
    times: dict[str, list[float]] = {k: [] for k in ("bm25", "dense", "rerank20", "st_dense", "st_rerank20")}
    with torch.inference_mode():
        r.dense(queries[0], 10)  # warm-up
        for q in queries:
            times["bm25"].append(timed(lambda: r.bm25(q, 10)))
            times["dense"].append(timed(lambda: r.dense(q, 10)))
            cands = [d for d, _ in r.hybrid(q, 20)]
            times["rerank20"].append(timed(lambda: r.rerank(q, cands)))
            if st is not None:
                texts = [r.passages[r.position[d]]["text"] for d in cands]
                times["st_dense"].append(timed(lambda: st.encode_query([q])))
                times["st_rerank20"].append(timed(lambda: ce.predict([(q, t) for t in texts], batch_size=32)))
    out: dict[str, float | int | bool] = {"queries": len(queries), "passages": len(r.ids), "threads": args.threads}
    for k, v in times.items():
        if v:
            v = sorted(v)
            out[f"{k}_ms_median"] = round(statistics.median(v), 2)
            out[f"{k}_ms_p90"] = round(v[int(0.9 * (len(v) - 1))], 2)
    for k, target in TARGETS_MS.items():
        out[f"{k}_under_{int(target)}ms"] = out[f"{k}_ms_median"] < target
        print(f"{k:>12}: median {out[f'{k}_ms_median']:.1f} ms, p90 {out[f'{k}_ms_p90']:.1f} ms (target < {target:g} ms)")
    for k in ("st_dense", "st_rerank20"):
        if f"{k}_ms_median" in out:
            print(f"{k:>12}: median {out[f'{k}_ms_median']:.1f} ms (sentence-transformers, same weights)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

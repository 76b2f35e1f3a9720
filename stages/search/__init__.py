"""Retrieval building blocks shared by the retrieval, embed, rerank and rag stages and `family search`:
the corpus chunked into passages and its queries (corpus.py), BM25 (bm25.py), the embedder's and the
reranker's forward passes (encode.py), ranking metrics with intervals and fusion (metrics.py), and the
sentence-transformers exports (export.py)."""

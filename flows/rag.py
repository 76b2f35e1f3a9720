"""`family search "query"` and `family rag "question"`: the retrieval members over the home's corpus.

search: the top --k passages by BM25, the embedder (dense), their fusion (hybrid) or the hybrid
reranked by the reranker (reranked, the default), each with its title, URL and score.
rag: hybrid -> rerank -> the top passages in the chat model's context -> its answer, printed with
numbered citations [n] naming each passage's title and URL and the passages themselves; when the
corpus does not hold the answer (`Retriever.not_found`: the best reranker score below the
reranker's threshold, or, where the reranker lost to the first stage on val, the question's words
missing from the top passages; both chosen on val by the rerank stage) it says "Not found in the
corpus." and why instead of answering, and shows the closest passages.

The retrieval logic is stages/search/pipeline.py; this module finds the artifacts and prints.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from stages.search.pipeline import NOT_FOUND, Retriever, RetrievalError, citations, rag_messages


def open_retriever(paths: dict[str, Path], reranker: bool) -> Retriever:
    return Retriever.open(paths["passages"], paths["embedder"], paths["reranker"] if reranker else None)


def show(hits, width: int = 100, chars: int = 300) -> None:
    for h in hits:
        print(f"[{h.rank}] {h.passage['title']}  (score {h.score:.4g})\n    {h.passage['url']}")
        body = h.passage["text"] if len(h.passage["text"]) <= chars else h.passage["text"][:chars] + "..."
        print(textwrap.indent(textwrap.fill(" ".join(body.split()), width - 4), "    "))


def search_main(paths: dict[str, Path], query: str, mode: str, k: int) -> int:
    try:
        retriever = open_retriever(paths, reranker=mode == "reranked")
        hits = retriever.search(query, mode, k)
    except RetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    show(hits)
    return 0


def rag_main(paths: dict[str, Path], question: str, k: int, max_new_tokens: int) -> int:
    import torch

    from stages.chat.evaluate import generate_answers
    from stages.contract import StageError
    from stages.training import open_model_input
    from storage.artifacts import Artifact

    try:
        retriever = open_retriever(paths, reranker=True)
        hits = retriever.search(question, "reranked", k)
    except RetrievalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    why = retriever.not_found(question, hits)
    if why is not None:
        print(f"{NOT_FOUND} ({why})\n")
        print("Closest passages:")
        show(hits)
        return 0
    try:
        _, tok, model = open_model_input({"chat": Artifact("chat", str(paths["chat"]), "", {})}, "chat", "rag")
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    messages, used = rag_messages(question, hits, tok, model.cfg.max_seq_len - max_new_tokens)
    if not used:
        print(f"The chat model's context ({model.cfg.max_seq_len} tokens) holds no passage beside the question and "
              f"{max_new_tokens} new tokens, so it does not answer; the top passages:\n")
        show(hits)
        return 0
    with torch.inference_mode():
        answer = generate_answers(model.eval(), tok, [messages], max_new_tokens)[0]
    marks = " ".join(f"[{i + 1}]" for i in range(len(used)))
    print(f"Answer (from {marks}): {answer.strip()}\n")
    print("Sources:")
    for line in citations(used):
        print(f"  {line}")
    print("\nPassages:")
    show(used)
    return 0

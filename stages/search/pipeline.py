"""Search and retrieval-augmented answers over published passages, as `family search`, `family rag`,
the rag stage and bench.retrieval use them.

    r = Retriever.open(passages_dir, embedder_dir, reranker_dir)
    hits = r.search("How do I parse a URL query string?", mode="reranked", k=5)   # [Hit], best first

Modes: bm25 (bm25s), dense (the embedder's cosine over its passage index), hybrid (RRF k = 60 of the
two, each ranking `first_stage_depth`), reranked (the hybrid's top `depth` reordered by the
reranker, unless the rerank stage found on val that its order is worse: then the hybrid's order is
kept). A RAG answer (`rag_messages`) puts the top passages, numbered [1]..[n], in the chat
model's user turn before the question; the citations are the pipeline's (URL and title of each
numbered passage), not the model's. "Not found in the corpus" (`Retriever.not_found`): where the
reranker beat the first stage on val, below its score threshold; where it lost (its scores are not
trusted to refuse either), below the coverage threshold: the largest idf-weighted share of the
question's terms that one of the hybrid's top `coverage_depth` passages holds
(stages/search/bm25.coverage). The rerank stage chooses both thresholds on val (each refuses
`abstain_quantile`, 10%, of the answerable val questions) and measures how many off-topic questions
each refuses.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.gpt import GPT
from models.tokenizer import Tokenizer
from stages.chat.docqa import context_prompt, numbered_passage
from stages.search.bm25 import BM25Index
from stages.search.encode import RerankPrompt, embed, embed_ids, rerank_scores
from stages.search.metrics import rrf
from storage.parquet import SchemaError, read_table

MODES = ("bm25", "dense", "hybrid", "reranked")
NOT_FOUND = "Not found in the corpus."


class RetrievalError(ValueError):
    """A user-fixable problem: a missing or unreadable index, a query longer than the context."""


@dataclass
class Hit:
    passage: dict[str, Any]  # id, url, title, text, kind, split
    score: float
    rank: int


def _model(d: Path, what: str, device: str) -> tuple[GPT, Tokenizer]:
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (d / f).is_file():
            raise RetrievalError(f"{what} at {d} is not a model directory (no {f}); rebuild it with `family run`")
    return GPT.from_pretrained(d, device=device).eval(), Tokenizer.load(d)


class Retriever:
    def __init__(self, passages: list[dict[str, Any]], embedder: tuple[GPT, Tokenizer, dict, torch.Tensor],
                 reranker: tuple[GPT, RerankPrompt, dict] | None = None):
        self.passages = passages
        self.ids = [p["id"] for p in passages]
        self.bm25_index = BM25Index.build([p["text"] for p in passages])
        self.emb_model, self.emb_tok, self.emb_settings, self.p_emb = embedder
        self.reranker = reranker
        self.position = {pid: i for i, pid in enumerate(self.ids)}
        self._fused: tuple[tuple[str, int], list[str]] | None = None  # the last query's hybrid ranking

    @classmethod
    def open(cls, passages_dir: str | Path, embedder_dir: str | Path, reranker_dir: str | Path | None = None,
             device: str = "cpu") -> "Retriever":
        try:
            passages = read_table(passages_dir, "passages").to_pylist()
        except (SchemaError, FileNotFoundError, OSError) as e:
            raise RetrievalError(f"passages: {e}; rebuild the retrieval stage") from None
        if not passages:
            raise RetrievalError(f"passages at {passages_dir}: no passages; the corpus gave none")
        emb_dir = Path(embedder_dir)
        emb_model, emb_tok = _model(emb_dir, "embedder", device)
        try:
            settings = json.loads((emb_dir / "embedder.json").read_text())
            index_ids = json.loads((emb_dir / "index" / "passage_ids.json").read_text())
            p_emb = load_file(str(emb_dir / "index" / "embeddings.safetensors"))["embeddings"].to(device)
        except (OSError, ValueError, KeyError) as e:
            raise RetrievalError(f"embedder at {emb_dir}: no passage index ({e}); rebuild the embed stage") from None
        if index_ids != [p["id"] for p in passages]:
            raise RetrievalError(f"embedder at {emb_dir} indexed other passages than {passages_dir}; rebuild the embed stage")
        reranker = None
        if reranker_dir is not None:
            rr_dir = Path(reranker_dir)
            rr_model, rr_tok = _model(rr_dir, "reranker", device)
            try:
                rr_settings = json.loads((rr_dir / "reranker.json").read_text())
            except (OSError, ValueError) as e:
                raise RetrievalError(f"reranker at {rr_dir}: no reranker.json ({e}); rebuild the rerank stage") from None
            prompt = RerankPrompt(rr_tok, rr_settings["instruction"], rr_settings.get("passage_first", False))
            reranker = (rr_model, prompt, rr_settings)
        return cls(passages, (emb_model, emb_tok, settings, p_emb), reranker)

    # -- one query ----------------------------------------------------------------------------------

    def check_query(self, query: str) -> None:
        """A query the embedder cannot read whole is an error naming both lengths."""
        n = len(embed_ids(self.emb_tok, [query], self.emb_settings["instruction"], 1 << 30)[0])
        if not query.strip():
            raise RetrievalError("the query is empty")
        if n > self.emb_settings["max_len"]:
            raise RetrievalError(f"the query is {n} tokens with its instruction; the embedder reads at most "
                                 f"{self.emb_settings['max_len']}: shorten it")

    def bm25(self, query: str, k: int) -> list[tuple[str, float]]:
        rows, scores = self.bm25_index.search([query], k)
        return [(self.ids[i], float(s)) for i, s in zip(rows[0], scores[0])]

    @torch.no_grad()
    def query_embedding(self, query: str) -> torch.Tensor:
        seqs = embed_ids(self.emb_tok, [query], self.emb_settings["instruction"], self.emb_settings["max_len"])
        return embed(self.emb_model, seqs, self.emb_tok.pad_id)[0]  # (d,)

    def dense(self, query: str, k: int) -> list[tuple[str, float]]:
        sims = self.p_emb @ self.query_embedding(query)  # (N,)
        top = sims.topk(min(k, len(self.ids)))
        return [(self.ids[i], float(s)) for i, s in zip(top.indices.tolist(), top.values.tolist())]

    def hybrid(self, query: str, k: int, depth: int = 100) -> list[tuple[str, float]]:
        if self._fused is None or self._fused[0] != (query, depth):  # search then not_found: fused once
            self._fused = ((query, depth), rrf([[d for d, _ in self.bm25(query, depth)],
                                                [d for d, _ in self.dense(query, depth)]]))
        return [(d, 0.0) for d in self._fused[1][:k]]

    def rerank(self, query: str, pids: list[str]) -> list[tuple[str, float]]:
        if self.reranker is None:
            raise RetrievalError("no reranker: build the rerank stage (family run) for reranked search and rag")
        model, prompt, settings = self.reranker
        scores = rerank_scores(model, prompt, [query] * len(pids), [self.passages[self.position[d]]["text"] for d in pids],
                               settings["max_len"])
        return sorted(zip(pids, scores.tolist()), key=lambda x: -x[1])

    def search(self, query: str, mode: str = "reranked", k: int = 10) -> list[Hit]:
        """The top k passages for `query` by `mode` (one of MODES)."""
        self.check_query(query)
        if mode == "bm25":
            found = self.bm25(query, k)
        elif mode == "dense":
            found = self.dense(query, k)
        elif mode == "hybrid":
            found = [(d, 1.0 / (60 + i + 1)) for i, (d, _) in enumerate(self.hybrid(query, k))]
        elif mode == "reranked":
            settings = self.reranker[2] if self.reranker else {"depth": 20, "first_stage_depth": 100}
            first = [d for d, _ in self.hybrid(query, max(k, settings["depth"]), settings["first_stage_depth"])]
            found = self.rerank(query, first[:settings["depth"]])
            if not settings.get("reorders", True):  # the reranker lost to the first stage on val: keep its order
                score = dict(found)
                found = [(d, score[d]) for d in first[:settings["depth"]]]
            found = found[:k]
        else:
            raise RetrievalError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        return [Hit(self.passages[self.position[d]], s, i + 1) for i, (d, s) in enumerate(found)]

    @property
    def threshold(self) -> float:
        """The "not found" threshold: the rerank stage's, where its reranker beat the first stage on
        val; a reranker that lost there is not trusted to refuse either (its scores would turn away
        answerable questions at random), so nothing is refused: -inf, as without a reranker."""
        if not self.reranker or not self.reranker[2].get("reorders", True):
            return float("-inf")
        return float(self.reranker[2]["threshold"])

    def coverage(self, query: str) -> float:
        """The question's coverage by the hybrid's top `coverage_depth` passages (module docstring)."""
        settings = self.reranker[2] if self.reranker else {}
        top = self.hybrid(query, settings.get("coverage_depth", 5), settings.get("first_stage_depth", 100))
        return self.bm25_index.coverage(query, [self.position[d] for d, _ in top])

    def not_found(self, query: str, hits: list[Hit]) -> str | None:
        """Why the corpus does not answer `query` (one line), or None: the reranker's threshold on the
        best reranked score where the reranker is trusted, else the coverage threshold (module
        docstring); with neither (no reranker, or one built before coverage), nothing is refused."""
        if not hits:
            return "no passage matched"
        if self.threshold > float("-inf"):
            if hits[0].score < self.threshold:
                return f"best reranker score {hits[0].score:.3f} is below the threshold {self.threshold:.3f}"
            return None
        limit = self.reranker[2].get("coverage_threshold") if self.reranker else None
        if limit is None:
            return None
        c = self.coverage(query)
        if c < limit:
            return (f"the top passages hold at most {c:.0%} of the question's terms (idf-weighted), below the "
                    f"{limit:.0%} the rerank stage chose on val")
        return None


# -- retrieval-augmented answers -----------------------------------------------------------------------


def rag_messages(question: str, hits: list[Hit], tok: Tokenizer, budget: int) -> tuple[list[dict[str, str]], list[Hit]]:
    """The chat model's conversation: the numbered passages that fit in `budget` tokens (each cut to
    what is left), then the question; and the hits used."""
    def render(parts: list[str]) -> list[dict[str, str]]:
        return [{"role": "user", "content": context_prompt(question, parts)}]

    parts: list[str] = []
    used: list[Hit] = []
    for i, h in enumerate(hits):
        piece = numbered_passage(i + 1, h.passage["title"], h.passage["text"])
        room = budget - len(tok.encode(tok.apply_chat_template(render(parts + [""]), add_generation_prompt=True)))
        ids = tok.encode(piece)
        if room < 16:
            break
        parts.append(tok.decode(ids[:room]) if len(ids) > room else piece)
        used.append(h)
    return render(parts), used


def citations(hits: list[Hit]) -> list[str]:
    return [f"[{i + 1}] {h.passage['title']} - {h.passage['url']}" for i, h in enumerate(hits)]

"""Rerank stage: the loss against a hand-computed case, the stage on a toy corpus, the
sentence-transformers CrossEncoder loads (native yes/no and the seq-cls fallback)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from stages import rerank
from stages.search.encode import RerankPrompt, rerank_logits, rerank_scores
from tests.stages.retrieval_toy import built


def test_rerank_loss_by_hand():
    scores = torch.tensor([[2.0, 0.0, -1.0]])
    loss, stats = rerank.rerank_loss(scores, bce_weight=0.5)
    e = math.exp
    listwise = -math.log(e(2) / (e(2) + e(0) + e(-1)))
    softplus = lambda x: math.log1p(e(x))  # noqa: E731  BCE(sigmoid(s), 1) = softplus(-s), BCE(., 0) = softplus(s)
    pointwise = (softplus(-2) + softplus(0) + softplus(-1)) / 3
    assert math.isclose(loss.item(), listwise + 0.5 * pointwise, rel_tol=1e-6)
    assert stats["acc"] == 1.0


def test_easy_negatives_are_never_the_positive_or_relevant():
    import random

    row = {"id": "q1", "positive": "p1"}
    qrels = {"q1": {"p1": 1, "p2": 1, "p3": 0}}
    ids = ["p1", "p2", "p3", "p4"]
    got = rerank.easy_negatives(row, qrels, ids, 50, random.Random(0))
    assert len(got) == 50 and set(got) == {"p3", "p4"}  # p3 is judged not relevant: a fair negative
    assert got == rerank.easy_negatives(row, qrels, ids, 50, random.Random(0))  # a resume draws the same
    # none left: the stage falls back to its pool
    assert rerank.easy_negatives(row, qrels, ["p1", "p2"], 3, random.Random(0)) == []


def test_copy_gain_is_zero_without_context_and_log_v_for_a_perfect_copier():
    V, span, gap = 50, 6, 8
    texts = [[(7 * i + j) % V for j in range(10)] for i in range(5)]

    def uniform(x):
        return torch.zeros(*x.shape, V)

    def copier(x):  # certain of the next token wherever it is a repeat of the span, uniform elsewhere
        out = torch.zeros(*x.shape, V)
        for b in range(x.shape[0]):
            for t in range(span + gap, x.shape[1] - 1):
                out[b, t, x[b, t + 1]] = 100.0
        return out

    assert rerank.copy_gain(uniform, texts, span, gap, n=3) == pytest.approx(0.0, abs=1e-6)
    assert rerank.copy_gain(copier, texts, span, gap, n=3) == pytest.approx(math.log(V), rel=1e-3)
    assert math.isnan(rerank.copy_gain(uniform, [[1, 2]], span, gap))  # no text long enough


def test_scores_with_the_shared_system_turn_cached_equal_the_full_forward():
    from models.gpt import GPT
    from models.tokenizer import Tokenizer

    out = built()["reranker"]
    model, tok = GPT.from_pretrained(out).eval(), Tokenizer.load(out)
    prompt = RerankPrompt(tok, "Relevant?")
    queries = ["heap push", "How to encode JSON as text?", "x"]
    passages = ["heapq.heappush(heap, item) Push item onto heap.", "json.dumps(obj) Serialize obj. " * 6, "y"]
    cached = rerank_scores(model, prompt, queries, passages, 64, batch_size=2)  # batches of unequal lengths
    with torch.no_grad():
        full = rerank_logits(model, prompt.batch(queries, passages, 64), prompt)
    assert torch.allclose(cached, full, atol=1e-5)


def test_stage_reports_reranked_and_first_stage_and_a_threshold():
    out = built()["reranker"]
    metrics = json.loads((out / "meta.json").read_text())["metrics"]
    for k in ("ndcg@10", "first_stage_ndcg@10", "delta_rerank_first_stage_ndcg@10_lo", "threshold", "abstain_offtopic",
              "reorders", "val_ndcg@10", "val_first_stage_ndcg@10", "base_copy_gain"):
        assert k in metrics, k
    settings = json.loads((out / "reranker.json").read_text())
    assert settings["depth"] == 5 and settings["threshold"] == metrics["threshold"]
    # the coverage rule that `family rag` falls back on: chosen on val, measured on off-topic questions
    assert settings["coverage_threshold"] == metrics["coverage_threshold"] and 0 < metrics["coverage_threshold"] <= 1
    assert 0 <= metrics["coverage_abstain_val"] <= 0.5 and 0 <= metrics["coverage_abstain_offtopic"] <= 1
    assert settings["reorders"] == (metrics["val_ndcg@10"] > metrics["val_first_stage_ndcg@10"])


def test_search_keeps_the_first_stage_order_when_the_reranker_lost_on_val(tmp_path):
    import shutil

    from stages.search.pipeline import Retriever

    paths = built()
    rr = tmp_path / "reranker"
    shutil.copytree(paths["reranker"], rr)
    settings = json.loads((rr / "reranker.json").read_text())
    for reorders in (True, False):
        (rr / "reranker.json").write_text(json.dumps({**settings, "reorders": reorders}))
        r = Retriever.open(paths["passages"], paths["embedder"], rr)
        query = "Push item onto heap"
        hybrid = [d for d, _ in r.hybrid(query, settings["depth"], settings["first_stage_depth"])]
        hits = r.search(query, "reranked", settings["depth"])
        scores = [h.score for h in hits]
        if reorders:
            assert scores == sorted(scores, reverse=True)
        else:
            assert [h.passage["id"] for h in hits] == hybrid


@pytest.mark.parametrize("folder", ["hf", "hf/seq-cls"])
def test_cross_encoder_predict_gives_our_scores(folder):
    st = pytest.importorskip("sentence_transformers")
    from models.gpt import GPT
    from models.tokenizer import Tokenizer

    out = built()["reranker"]
    model, tok = GPT.from_pretrained(out).eval(), Tokenizer.load(out)
    settings = json.loads((out / "reranker.json").read_text())
    prompt = RerankPrompt(tok, settings["instruction"], settings["passage_first"])
    pairs = [("How to encode JSON?", "json.dumps(obj) Serialize obj to a JSON formatted str."),
             ("cube root", "math.cbrt(x, /) Return the cube root of x."), ("heap", "Push item onto heap.")]
    ours = rerank_scores(model, prompt, [q for q, _ in pairs], [p for _, p in pairs], settings["max_len"])
    theirs = st.CrossEncoder(str(out / folder), device="cpu", local_files_only=True).predict(pairs)
    assert torch.allclose(ours, torch.tensor(theirs, dtype=torch.float), atol=1e-4)


def test_a_passage_first_prompt_exports_with_its_order(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from models.gpt import GPT
    from models.tokenizer import Tokenizer
    from stages.search.export import export_reranker

    out = built()["reranker"]
    model, tok = GPT.from_pretrained(out).eval(), Tokenizer.load(out)
    prompt = RerankPrompt(tok, "Relevant?", passage_first=True)
    ids = prompt.ids(tok.encode("heap"), tok.encode("Push item."), 64)
    assert tok.decode(ids).index("<Document>: Push item.") < tok.decode(ids).index("<Query>: heap")
    export_reranker(model, out, tmp_path / "hf", prompt, 64)
    pairs = [("How to encode JSON?", "json.dumps(obj) Serialize obj to a JSON formatted str."),
             ("heap", "Push item onto heap.")]
    ours = rerank_scores(model, prompt, [q for q, _ in pairs], [p for _, p in pairs], 64)
    theirs = st.CrossEncoder(str(tmp_path / "hf"), device="cpu", local_files_only=True).predict(pairs)
    assert torch.allclose(ours, torch.tensor(theirs, dtype=torch.float), atol=1e-4)
    assert not torch.allclose(ours, rerank_scores(model, RerankPrompt(tok, "Relevant?"), [q for q, _ in pairs],
                                                  [p for _, p in pairs], 64), atol=1e-4)  # the order is read

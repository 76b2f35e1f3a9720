"""RAG stage: closed-book and open-book docqa accuracy of a chat model over the toy corpus' members,
and the prompt it builds: numbered passages that fit the context, then the question."""
from __future__ import annotations

import json

import pytest

from models.tokenizer import Tokenizer
from stages import rag
from stages.contract import StageError
from stages.search.pipeline import Hit, Retriever, rag_messages
from storage.parquet import write_table
from tests.conftest import artifact, make_ctx
from tests.stages.retrieval_toy import built

QUESTIONS = [("Which module provides heappush?", "heapq"), ("What is the signature of math.cbrt?", "math.cbrt(x, /)"),
             ("Which module provides dedent?", "textwrap")]


def prompts_dir(root, questions=QUESTIONS, split="val"):
    rows = [{"id": f"q{i}", "prompt": [{"role": "user", "content": q}], "answer": a, "verifier": "exact", "task": "docqa",
             "source": "docqa", "split": split} for i, (q, a) in enumerate(questions)]
    write_table(rows, root / "prompts" / "part-00000.parquet", "prompts")
    return root / "prompts"


def test_rag_messages_number_the_passages_that_fit_before_the_question():
    paths = built()
    tok = Tokenizer.load(paths["base"])
    hits = [Hit({"title": f"t{i}", "text": "word " * 40, "url": f"u{i}"}, 1.0, i + 1) for i in range(3)]
    messages, used = rag_messages("What is it?", hits, tok, budget=90)
    text = messages[-1]["content"]
    assert text.startswith("[1] t0\n") and text.endswith("\n\nQuestion: What is it?")
    assert 1 <= len(used) < 3  # the budget holds fewer than three
    assert len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))) <= 90


def test_stage_reports_closed_and_open_book_accuracy(tmp_path):
    paths = built()
    inputs = {k: artifact(k, paths[k]) for k in ("passages", "embedder", "reranker")}
    inputs |= {"prompts": artifact("prompts", prompts_dir(tmp_path)), "grpo": artifact("grpo", paths["base"])}
    ctx = make_ctx(tmp_path / "s")
    result = rag.run(rag.Config(max_new_tokens=4, top_passages=1), inputs, ctx)
    for k in ("docqa_closed_acc", "docqa_open_acc", "docqa_open_acc_lo", "delta_open_closed", "answer_in_context",
              "docqa_refused"):
        assert k in result.metrics, k
    assert result.metrics["questions"] == 3
    samples = json.loads((ctx.output("rag_eval") / "samples.json").read_text())
    assert all(len(s["titles"]) == 1 and s["urls"][0].startswith("http://") for s in samples)


def test_stage_without_heldout_docqa_says_so(tmp_path):
    paths = built()
    inputs = {k: artifact(k, paths[k]) for k in ("passages", "embedder", "reranker")}
    inputs |= {"prompts": artifact("prompts", prompts_dir(tmp_path, split="train")), "grpo": artifact("grpo", paths["base"])}
    with pytest.raises(StageError, match="no held-out docqa prompts"):
        rag.run(rag.Config(), inputs, make_ctx(tmp_path / "s"))


def test_retriever_refuses_a_query_longer_than_the_embedder_context():
    paths = built()
    r = Retriever.open(paths["passages"], paths["embedder"], paths["reranker"])
    with pytest.raises(ValueError, match="the embedder reads at most 96"):
        r.search("word " * 200, "dense", 3)
    hits = r.search("heappush heap item", "bm25", 3)
    assert hits[0].passage["title"].startswith("heapq") and [h.rank for h in hits] == [1, 2, 3]
    assert len(r.search("heappush heap item", "reranked", 2)) == 2


def test_a_reranker_that_lost_on_val_sets_no_not_found_threshold():
    paths = built()
    r = Retriever.open(paths["passages"], paths["embedder"], paths["reranker"])
    settings = r.reranker[2]
    settings["reorders"], settings["threshold"] = True, 0.25
    assert r.threshold == 0.25  # it beat the first stage on val: its threshold refuses below it
    settings["reorders"] = False
    assert r.threshold == float("-inf")  # it lost: not trusted to refuse either
    assert Retriever.open(paths["passages"], paths["embedder"], None).threshold == float("-inf")


def test_not_found_trusts_the_reranker_where_it_won_and_the_coverage_where_it_lost():
    paths = built()
    r = Retriever.open(paths["passages"], paths["embedder"], paths["reranker"])
    settings = r.reranker[2]
    on, off = "heappush heap item", "capital Australia volcano sourdough"
    settings["reorders"], settings["threshold"] = True, 1e9
    hits = r.search(on, "reranked", 3)
    assert "below the threshold" in r.not_found(on, hits)  # the reranker is trusted: its score decides
    settings["reorders"], settings["coverage_threshold"] = False, 0.5
    assert r.coverage(on) == 1.0 and r.coverage(off) == 0.0
    assert r.not_found(on, r.search(on, "reranked", 3)) is None
    assert "0% of the question's terms" in r.not_found(off, r.search(off, "reranked", 3))
    del settings["coverage_threshold"]  # a reranker folder from before the coverage rule: nothing refused
    assert r.not_found(off, r.search(off, "reranked", 3)) is None
    assert r.not_found(on, []) == "no passage matched"

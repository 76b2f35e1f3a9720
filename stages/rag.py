"""RAG: the family working together — the chat model answering doc questions closed-book and open-book.

What: reads the retrieval members (`passages`, `embedder`, `reranker`), the held-out docqa prompts of
`prompts` and the chat model (`chat_model`: grpo, the final one, by default) and writes `rag_eval`:
samples.json (question, passages shown, both answers, the reference) and rag.json (the settings).

For each held-out docqa question (split val: no chat stage trained on it):
    closed-book: the question alone, as every chat stage scores it (stages/chat/evaluate.py);
    open-book:   hybrid retrieval -> rerank -> the top `top_passages` passages, numbered, in the user
                 turn before the question (stages/search/pipeline.py `rag_messages`), as many as fit in
                 the context beside `max_new_tokens`.
Both are greedy and graded by the prompt's verifier. Reported: docqa_closed_acc and docqa_open_acc with
95% bootstrap intervals, their paired difference, the most-common-answer baseline, and
answer_in_context, the share of questions whose reference answer appears in the passages shown (what a
perfect reader of the same context could reach), and docqa_refused, the share of these answerable
questions `family rag` would turn away as "not found in the corpus" (Retriever.not_found); the
open-book answer is still generated and graded for them.

Run:
    python -m stages.rag --config c.json --inputs i.json --run-dir DIR
    with i.json = {"passages": DIR, "embedder": DIR, "reranker": DIR, "prompts": DIR, "grpo": DIR}
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stages.chat.evaluate import generate_answers, majority_baseline
from stages.chat.verifiers import verify
from stages.contract import StageContext, StageError, StageResult, main
from stages.search.metrics import bootstrap_ci
from stages.search.pipeline import Retriever, RetrievalError, rag_messages
from stages.training import open_model_input
from storage.artifacts import Artifact
from storage.parquet import SchemaError, read_table

INPUTS = ("passages", "embedder", "reranker", "prompts", "grpo", "dpo", "sft")
OUTPUTS = ("rag_eval",)
GPU = True


@dataclass(frozen=True)
class Config:
    chat_model: Literal["grpo", "dpo", "sft"] = "grpo"
    top_passages: int = 2  # passages put before the question (fewer when they do not fit)
    max_questions: int = 300  # held-out docqa questions at most (the first by id)
    max_new_tokens: int = 48
    batch_size: int = 16

    def validate(self) -> None:
        for name in ("top_passages", "max_questions", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def inputs(cfg: Config) -> tuple[str, ...]:
    return ("passages", "embedder", "reranker", "prompts", cfg.chat_model)


def summarize(cfg: Config, n: int, closed: np.ndarray, opened: np.ndarray, majority: float, in_context: float,
              samples: list[dict[str, Any]]) -> StageResult:
    def ci(v: np.ndarray) -> tuple[float, float]:
        return bootstrap_ci(v.astype(float))

    (c_lo, c_hi), (o_lo, o_hi), (d_lo, d_hi) = ci(closed), ci(opened), ci(opened.astype(float) - closed)
    metrics = {"docqa_closed_acc": float(closed.mean()), "docqa_closed_acc_lo": c_lo, "docqa_closed_acc_hi": c_hi,
               "docqa_open_acc": float(opened.mean()), "docqa_open_acc_lo": o_lo, "docqa_open_acc_hi": o_hi,
               "delta_open_closed": float(opened.mean() - closed.mean()), "delta_open_closed_lo": d_lo,
               "delta_open_closed_hi": d_hi, "majority_docqa_acc": majority, "answer_in_context": in_context,
               "questions": float(n)}
    lines = [f"RAG ({cfg.chat_model}): {n} held-out docqa questions; closed-book accuracy {closed.mean():.3f} "
             f"[{c_lo:.3f}, {c_hi:.3f}], open-book (top {cfg.top_passages} reranked passages in context) "
             f"{opened.mean():.3f} [{o_lo:.3f}, {o_hi:.3f}]; difference {opened.mean() - closed.mean():+.3f} "
             f"[{d_lo:+.3f}, {d_hi:+.3f}]. Most common answer: {majority:.3f}. The reference answer is in the "
             f"passages shown for {in_context:.0%} of the questions.", "", "Samples:", ""]
    lines += [f"- {s['question']!r}: closed {s['closed']!r}, open {s['open']!r} (answer {s['answer']!r}; "
              f"passages {', '.join(s['titles'])})" for s in samples[:8]]
    return StageResult(outputs={"rag_eval": {"questions": n}}, metrics=metrics, summary="\n".join(lines),
                       tables={"samples": samples[:50]})


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # the chat model, the retrieval pipeline, the held-out docqa questions
    _, tok, model = open_model_input(inputs, cfg.chat_model, "rag", ctx.device)
    model.eval()
    try:
        retriever = Retriever.open(inputs["passages"].path, inputs["embedder"].path, inputs["reranker"].path, ctx.device)
        rows = read_table(inputs["prompts"].path, "prompts").to_pylist()
    except (RetrievalError, SchemaError, FileNotFoundError) as e:
        raise StageError(f"rag: {e}") from None
    train = [r for r in rows if r["split"] == "train" and r["task"] == "docqa"]
    heldout = sorted((r for r in rows if r["split"] == "val" and r["task"] == "docqa"), key=lambda r: r["id"])
    heldout = heldout[:cfg.max_questions]
    if not heldout:
        raise StageError(f"rag: no held-out docqa prompts in {inputs['prompts'].path}; the instruct stage made none "
                         f"(max_docqa 0, or a corpus without pydoc pages)")

    # closed-book, then open-book with the reranked top passages
    budget = model.cfg.max_seq_len - cfg.max_new_tokens
    closed = generate_answers(model, tok, [r["prompt"] for r in heldout], cfg.max_new_tokens, cfg.batch_size)
    open_prompts, shown, skipped, refused = [], [], 0, 0
    for i, r in enumerate(heldout):
        question = r["prompt"][-1]["content"]
        try:
            hits = retriever.search(question, "reranked", cfg.top_passages)
        except RetrievalError:
            hits, skipped = [], skipped + 1  # a question longer than the embedder's context: closed-book
        if hits and retriever.not_found(question, hits) is not None:
            refused += 1
        messages, used = rag_messages(question, hits, tok, budget)
        open_prompts.append(r["prompt"][:-1] + messages)
        shown.append(used)
        ctx.progress(i + 1, len(heldout), "retrieving")
    opened = generate_answers(model, tok, open_prompts, cfg.max_new_tokens, cfg.batch_size)

    ok_closed = np.array([verify(r["verifier"], c, r["answer"]) for r, c in zip(heldout, closed)])
    ok_open = np.array([verify(r["verifier"], c, r["answer"]) for r, c in zip(heldout, opened)])
    in_context = float(np.mean([any(r["answer"].lower() in h.passage["text"].lower() for h in used)
                                for r, used in zip(heldout, shown)]))
    majority = majority_baseline(train, heldout).get("acc", float("nan")) if train else float("nan")
    samples = [{"question": r["prompt"][-1]["content"], "answer": r["answer"], "closed": c, "open": o,
                "titles": [h.passage["title"] for h in used], "urls": [h.passage["url"] for h in used]}
               for r, c, o, used in zip(heldout, closed, opened, shown)]
    result = summarize(cfg, len(heldout), ok_closed, ok_open, majority, in_context, samples)
    result.metrics["queries_too_long"] = float(skipped)
    result.metrics["docqa_refused"] = refused / len(heldout)
    result.summary += f"\n\n`family rag` would answer \"not found in the corpus\" to {refused} of these {len(heldout)} questions."
    ctx.tracker.log_metrics(result.metrics)

    out = ctx.output("rag_eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    (out / "rag.json").write_text(json.dumps({"chat_model": cfg.chat_model, "top_passages": cfg.top_passages,
                                              "threshold": retriever.threshold if retriever.threshold > float("-inf") else None},
                                             indent=2))
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

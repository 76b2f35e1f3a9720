"""Held-out evaluation of chat models on prompts with reference answers (used by sft, dpo and grpo).

A chat model is prompted zero-shot with the ChatML template and a generation prompt
("<|im_start|>assistant\\n"), decoded greedily until <|im_end|>, and graded by the row's verifier
(stages/chat/verifiers.py): accuracy = share of prompts whose completion the verifier accepts,
per task ("acc/<task>") and overall ("acc", the mean over prompts, not over tasks).

A base model has never seen a chat turn, so zero-shot ChatML would measure the template rather than
what the model knows. `few_shot_base_eval` gives it a fair chance instead (Brown et al., 2020,
"Language Models are Few-Shot Learners"): k solved examples of the same task from the train
prompts come before the question. format="text" writes them as plain "Question: ...\\nAnswer: ..."
blocks, the shape of text the base model was pretrained on, and cuts the answer at the first newline;
format="chat" writes them as earlier ChatML turns. Shots are drawn per prompt with a seeded
generator, so a run is reproducible and no prompt is its own example.

Which prompts: `pick_heldout` takes the first `per_task` val prompts of each task by id, the same
ones in every run and every stage (sft, dpo, grpo), so their accuracies compare across stages.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from models.generate import generate
from models.gpt import GPT
from models.tokenizer import Tokenizer
from stages.chat.verifiers import verify

Messages = list[dict[str, str]]


def pick_heldout(rows: Iterable[dict[str, Any]], per_task: int, split: str = "val") -> list[dict[str, Any]]:
    """At most per_task of the `split` rows of each task, the first by id, tasks in name order."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in sorted((r for r in rows if r["split"] == split), key=lambda r: r["id"]):
        by_task.setdefault(row["task"] or "all", []).append(row)
    return [r for task in sorted(by_task) for r in by_task[task][:per_task]]


def prompt_ids(tok: Tokenizer, messages: Messages) -> list[int]:
    """The token ids a chat model continues: the conversation in ChatML plus the generation prompt."""
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


@torch.no_grad()
def complete(model: GPT, tok: Tokenizer, ids: Sequence[list[int]], max_new_tokens: int, batch_size: int,
             stop_ids: Sequence[int]) -> list[str]:
    """Greedy completions of token prompts, decoded (special tokens dropped, whitespace stripped).

    Prompts go in batches of similar length (sorted), so left padding stays short; results come back
    in the input order. The model is put in eval mode and returned to its previous mode.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        new = generate(model, [ids[i] for i in chunk], max_new_tokens, temperature=0.0, stop_ids=stop_ids,
                       pad_id=tok.pad_id)
        for i, toks in zip(chunk, new):
            out[i] = tok.decode(toks, skip_special_tokens=True).strip()
    model.train(was_training)
    return out


def generate_answers(model: GPT, tok: Tokenizer, prompts: list[Messages], max_new_tokens: int = 32,
                     batch_size: int = 32) -> list[str]:
    """Greedy zero-shot answers of a chat model, one per conversation, stopped at <|im_end|>."""
    ids = [prompt_ids(tok, p) for p in prompts]
    return complete(model, tok, ids, max_new_tokens, batch_size, stop_ids=(tok.im_end_id, tok.eot_id))


def score(rows: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
    """{"acc/<task>": share correct per task, "acc": share correct overall} for `prompts` rows
    (task, answer, verifier) and their completions."""
    right, seen = Counter(), Counter()
    for row, completion in zip(rows, completions, strict=True):
        task = row.get("task") or "all"
        seen[task] += 1
        right[task] += verify(row["verifier"], completion, row["answer"])
    metrics = {f"acc/{t}": right[t] / seen[t] for t in sorted(seen)}
    metrics["acc"] = sum(right.values()) / max(1, sum(seen.values()))
    return metrics


def majority_baseline(train_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, float]:
    """The trivial baseline: per task, always answer the task's most common train answer.
    {"acc/<task>": ..., "acc": ...} on `rows`, graded by each row's verifier like a model's answers."""
    counts: dict[str, Counter] = {}
    for r in train_rows:
        counts.setdefault(r.get("task") or "all", Counter())[r["answer"]] += 1
    guess = {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}
    return score(rows, [guess.get(r.get("task") or "all", "") for r in rows])


def evaluate_prompts(model: GPT, tok: Tokenizer, rows: list[dict[str, Any]], max_new_tokens: int = 32,
                     batch_size: int = 32) -> dict[str, float]:
    """Zero-shot accuracy of a chat model on `prompts` rows: {"acc/<task>": ..., "acc": ...}."""
    return score(rows, generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size))


def heldout_key(rows: list[dict[str, Any]], max_new_tokens: int) -> str:
    """What a greedy held-out evaluation depends on besides the model: which prompts (ids: content
    hashes) and how many tokens an answer may take. Two evaluations with one key and the same
    weights give the same accuracies."""
    return hashlib.sha256(json.dumps([sorted(r["id"] for r in rows), max_new_tokens]).encode()).hexdigest()[:16]


def recorded_eval(meta_path: Path, key: str) -> dict[str, dict[str, float]] | None:
    """The held-out accuracies a stage wrote in its model directory's meta.json under "heldout"
    ({"key", "acc", "sft_acc"}), when they were measured with this key; else None. Lets a later
    stage skip re-evaluating its input model (greedy decoding of every prompt twice costs seconds)."""
    try:
        heldout = json.loads(meta_path.read_text()).get("heldout") or {}
    except (OSError, ValueError):
        return None
    return heldout if heldout.get("key") == key else None


def few_shot_prompt(tok: Tokenizer, row: dict[str, Any], shots: list[dict[str, Any]],
                    fmt: Literal["text", "chat"]) -> list[int]:
    """The base model's prompt for `row`: its solved `shots` first, then the question."""
    if fmt == "chat":
        messages: Messages = []
        for s in shots:
            messages += [*s["prompt"], {"role": "assistant", "content": s["answer"]}]
        return prompt_ids(tok, messages + list(row["prompt"]))

    def question(r: dict[str, Any]) -> str:
        return "\n".join(m["content"] for m in r["prompt"] if m["role"] != "system")

    blocks = [f"Question: {question(s)}\nAnswer: {s['answer']}" for s in shots]
    # a leading <|endoftext|>: in pretraining every document starts right after one
    return [tok.eot_id] + tok.encode("\n\n".join(blocks + [f"Question: {question(row)}\nAnswer:"]))


def newline_ids(tok: Tokenizer) -> list[int]:
    """Tokens whose text starts with a newline: where a one-line "Answer: ..." ends."""
    return [i for i in range(tok.vocab_size) if tok.decode([i]).startswith("\n")]


def few_shot_base_eval(model: GPT, tok: Tokenizer, rows: list[dict[str, Any]], shot_pool: list[dict[str, Any]],
                       k: int = 3, fmt: Literal["text", "chat"] = "text", max_new_tokens: int = 32,
                       batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Few-shot accuracy of a base model on `prompts` rows: {"acc/<task>": ..., "acc": ...}.

    Each row gets k shots drawn from `shot_pool` (train `prompts` rows) of the same task, excluding
    rows with the same prompt. With fmt="text" the completion is cut at its first newline.
    """
    by_task: dict[str, list[dict[str, Any]]] = {}
    for s in shot_pool:
        by_task.setdefault(s.get("task") or "all", []).append(s)
    rng = random.Random(seed)
    ids = []
    for row in rows:
        pool = [s for s in by_task.get(row.get("task") or "all", []) if s["prompt"] != row["prompt"]]
        ids.append(few_shot_prompt(tok, row, rng.sample(pool, min(k, len(pool))), fmt))
    if fmt == "chat":
        stop = (tok.im_end_id, tok.eot_id)
    else:
        stop = tuple(newline_ids(tok)) + (tok.eot_id, tok.im_start_id)
    completions = complete(model, tok, ids, max_new_tokens, batch_size, stop_ids=stop)
    if fmt == "text":
        completions = [c.split("\n", 1)[0].strip() for c in completions]
    return score(rows, completions)


def accuracy_table(columns: dict[str, dict[str, float]], rows: list[dict[str, Any]] | None = None
                   ) -> tuple[list[dict[str, Any]], str]:
    """The held-out accuracy table every chat stage reports: one row per task, one column per model
    or baseline. `columns` maps a column name ("most common answer", "sft", "dpo", ...) to its
    {"acc/<task>": ...} metrics; `rows`, the prompts scored, adds their count per task. Returns the
    table as dicts (a Prefect table artifact) and as markdown ("-" where a column lacks a task)."""
    tasks = sorted({k.removeprefix("acc/") for m in columns.values() for k in m if k.startswith("acc/")})
    counts = Counter((r.get("task") or "all") for r in rows) if rows is not None else None
    table = [{"task": t, **({"prompts": counts[t]} if counts is not None else {}),
              **{name: m.get(f"acc/{t}") for name, m in columns.items()}} for t in tasks]
    if not table:
        return [], ""
    names = list(table[0])
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in table:
        lines.append("| " + " | ".join(f"{r[n]:.3f}" if isinstance(r[n], float) else "-" if r[n] is None else str(r[n])
                                       for n in names) + " |")
    return table, "\n".join(lines)

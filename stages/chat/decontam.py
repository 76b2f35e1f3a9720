"""Decontamination of the instruct sets: how much of each held-out example a train set holds.

Every held-out example (its prompt and reference reply, by split and task) is checked against each
train set: the SFT chat, prefs and RL prompts rows of the train split, and the pretraining corpus.
`overlaps` finds exact prompt matches and equivalence keys shared with train, which the splits make 0,
and 13-gram overlap (GPT-3's check: Brown et al. 2020, appendix C; an example of 8 to 12 words
overlaps when it is inside a train text); `decontamination` gives the table `decontam` and the
metrics `decontam/...` that stages/instruct.py logs. The row sets (KINDS), the splits (SPLITS), a row's
prompt turns (row_prompt) and their normalised text (prompt_key) are here too: the stage's splits use
them as well, and this module does not import the stage.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

from storage.parquet import iter_rows

KINDS = ("chat", "prefs", "prompts")
SPLITS = ("train", "val", "test")  # in precedence order: a problem in train and in val is train's


def prompt_key(prompt: list[dict[str, str]]) -> str:
    """The canonical key of an item: its prompt turns, whitespace- and case-normalised."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].split()).casefold()}" for m in prompt)


def row_prompt(row: dict[str, Any], kind: str) -> list[dict[str, str]]:
    """A row's prompt turns; for chat, everything before the last assistant turn."""
    if kind != "chat":
        return row["prompt"]
    last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
    return row["messages"][:last]


# -- decontamination --------------------------------------------------------------------------------------

TOKEN = re.compile(r"\w+|[^\w\s]")  # words and single symbols: "47 + 58" and "47 - 58" are other texts
NGRAM, MIN_RUN = 13, 8  # GPT-3's contamination check (Brown et al. 2020, appendix C): 13-grams, at least 8 words
TRAIN_SETS = ("sft_chat", "prefs", "rl_prompts", "corpus")
TextRow = tuple[str | None, str | None, list[str]]  # (prompt key, equivalence key, texts: turns, reference reply)


def row_texts(row: dict[str, Any], kind: str) -> list[str]:
    """Every turn of a row: chat messages; prefs prompt, chosen and rejected; the prompt and its answer."""
    turns = row["messages"] if kind == "chat" else row["prompt"] + (row["chosen"] + row["rejected"] if kind == "prefs" else [])
    return [m["content"] for m in turns] + ([row["answer"] or ""] if kind == "prompts" else [])


def eval_examples(rows: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], list[TextRow]]:
    """The held-out examples by (split, task), one per prompt: its turns and its reference reply (the
    chat reply first, else prefs' chosen, else the prompts row's answer)."""
    out: dict[tuple[str, str], dict[str, TextRow]] = {}
    for kind in KINDS:
        for r in rows[kind]:
            if r["split"] != "train":
                prompt = row_prompt(r, kind)
                reference = ([m["content"] for m in r["messages"][len(prompt):]] if kind == "chat" else
                             [m["content"] for m in r["chosen"]] if kind == "prefs" else [r["answer"] or ""])
                group = out.setdefault((r["split"], r.get("task") or r["source"]), {})
                group.setdefault(prompt_key(prompt), (prompt_key(prompt), r["key"], [m["content"] for m in prompt] + reference))
    return {k: list(v.values()) for k, v in sorted(out.items())}


def overlaps(examples: list[TextRow], train: Iterable[TextRow]) -> tuple[list[bool], list[bool], list[bool]]:
    """For each example: whether a train example has its prompt, its key, and a run of words of one of
    its texts: a 13-gram, or a whole text of 8 to 12 words (a shorter one, "4" or "json", is in any
    text by chance)."""
    grams: dict[tuple[str, ...], list[int]] = {}
    short: list[tuple[str, int]] = []
    for i, (_, _, texts) in enumerate(examples):
        for text in texts:
            words = tuple(TOKEN.findall(text.casefold()))
            if MIN_RUN <= len(words) < NGRAM:
                short.append((f" {' '.join(words)} ", i))
            for j in range(len(words) - NGRAM + 1):
                grams.setdefault(words[j:j + NGRAM], []).append(i)
    prompts, keys, joined, hit = set(), set(), [], [False] * len(examples)
    for prompt, key, texts in train:
        prompts.add(prompt)
        keys.add(key)
        for text in texts:
            words = TOKEN.findall(text.casefold())
            joined.append(f" {' '.join(words)} ")
            for j in range(len(words) - NGRAM + 1):
                for i in grams.get(tuple(words[j:j + NGRAM]), ()):
                    hit[i] = True
    everything = "\n".join(joined)  # " a b " is a run of words of one text: it never spans two
    for needle, i in short:
        hit[i] = hit[i] or needle in everything
    return [p in prompts for p, _, _ in examples], [k in keys for _, k, _ in examples], hit


def decontamination(rows: dict[str, list[dict[str, Any]]], docs_path: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One table row per held-out (split, task) and train set, and the metrics: held-out examples whose
    prompt or key is in any instruct train set (0 by construction), and the share of each split's
    examples with a 13-gram in each train set. The corpus has no prompts or keys: its n-grams only."""
    def train_rows(kind: str) -> Iterator[TextRow]:
        return ((prompt_key(row_prompt(r, kind)), r["key"], row_texts(r, kind)) for r in rows[kind] if r["split"] == "train")

    sources = {"sft_chat": lambda: train_rows("chat"), "prefs": lambda: train_rows("prefs"),
               "rl_prompts": lambda: train_rows("prompts"),
               "corpus": lambda: ((None, None, [d["text"] or ""]) for d in iter_rows(docs_path, columns=["text"]))}
    flat = [(split, task, ex) for (split, task), exs in eval_examples(rows).items() for ex in exs]
    found = {name: overlaps([ex for _, _, ex in flat], make()) for name, make in sources.items()}  # one pass each
    table, metrics = [], {}
    for split in SPLITS[1:]:
        held = [i for i, (s, _, _) in enumerate(flat) if s == split]
        for what, at in (("exact", 0), ("key", 1)):  # in any instruct train set
            metrics[f"decontam/{split}_{what}_overlap"] = float(sum(any(found[n][at][i] for n in TRAIN_SETS[:3]) for i in held))
        for name in TRAIN_SETS:
            metrics[f"decontam/{split}_13gram_overlap/{name}"] = sum(found[name][2][i] for i in held) / max(1, len(held))
            for task in sorted({flat[i][1] for i in held}):
                idx = [i for i in held if flat[i][1] == task]
                corpus = name == "corpus"
                table.append({"split": split, "task": task, "train_set": name, "examples": len(idx),
                              "exact": None if corpus else sum(found[name][0][i] for i in idx),
                              "key": None if corpus else sum(found[name][1][i] for i in idx),
                              "ngram13": sum(found[name][2][i] for i in idx)})
    return table, metrics

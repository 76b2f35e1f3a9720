"""Instruct data: the chat, preference and reward-prompt sets that SFT, DPO, reward modelling and GRPO train on.

What: from `docs_clean` and a seeded generator, writes three Parquet datasets, each with a
`split` column ("train" or "val"):
- `chat` (id, messages, task, source, split): conversations whose assistant turns SFT learns;
- `prefs` (id, prompt, chosen, rejected, task, source, split): chosen is correct, rejected is a plausible
  wrong reply (a number off by a little, another item's answer, a truncated answer);
- `prompts` (id, prompt, answer, verifier, task, source, split): prompts with a reference answer and
  the name of the check in stages/chat/verifiers.py that grades a completion (GRPO, evaluation).

RL prompts: with `rl_per_task` > 0, each generated task (arith, count, string, wordprob) also draws
that many further problems that go to `prompts` only, and the train prompts of that task are just
these (docqa and user prompts keep theirs). GRPO then practises on problems SFT never saw, as a lab
keeps its RL prompt set apart from its SFT data: on problems SFT trained on for several epochs, more
groups get the same reward for every sample, and such a group teaches nothing. RL problems whose hash
falls in the held-out share become val prompts, which enlarges the held-out sets every chat stage is
scored on.

Tasks (each item gives one chat row, one prefs row, and a prompts row when its answer is exact):
- docqa: closed-book questions about the modules, functions and classes the corpus documents,
  answered from that documentation (stages/chat/docqa.py): "What does json.dumps do?" -> the first
  sentence of its docstring; "Which module provides dumps?" -> "json" (exact).
- arith: "What is 47 + 58?" -> "7 + 8 = 15, carry 1. 4 + 5 + 1 = 10, carry 1. 47 + 58 = 105"
  (operands 10..arith_max, operators from arith_ops; numeric: the last number). With `worked`, the
  reply works the sum out column by column, as taught at school (products by partial products),
  before it states the result: each step is a one-digit fact next to what it needs, which a small
  model learns from a few thousand examples, where the bare "105" asks it to carry in its head
  (Nye et al. 2021, "Show your work: scratchpads"; Lee et al. 2023, "Teaching arithmetic to small
  transformers"). worked=false answers "47 + 58 = 105".
- count: letters in a word, words in a phrase -> "3" (numeric). With `worked`, a letter count first
  walks through the word keeping a tally, each letter beside the one asked about:
  'How many times does the letter "u" appear in "n u l l"?' -> "n u 0, u u 1, l u 1, l u 1. 1"
  (one comparison of neighbouring tokens and one increment per step, where a bare "1" asks the
  model to count in its head). Walking through the letters in order also trains the copying the
  string tasks need.
- string: reverse, uppercase, first/last letter of a word -> "n o h t y p" (exact; uppercase exact_case).
  With `letters_apart` (count and string) the word is written "p y t h o n": a BPE token hides its
  letters, and a 4k-vocabulary model cannot learn the spelling of thousands of tokens in minutes, so
  the task would measure the tokenizer instead of the skill.
- wordprob: templated one- or two-step word problems over arith_ops, worked like arith -> "12 - 5 = 7"
  (numeric: the last number).
Replies are short and always in the same shape, so a tiny model can learn the format; the answer of
a verifiable task is what its verifier checks. Words come from the corpus's own vocabulary.

User datasets (`chat_files`, `prefs_files`, `prompts_files`, each "path" or "path::format") are read
by stages/chat/importers.py (TRL, alpaca, sharegpt, GSM8K, HH-RLHF) and appended.

Splits: an item is held out when a hash of its canonical key, the normalised text of its prompt
turns, falls below `heldout_frac`. So chat, prefs and prompts rows of one item land in the same split,
and no prompt is in both splits. A user record that names its own split keeps it, unless the same
prompt is also in train: then it moves to train (counted as `moved_to_train`). The hash does not
depend on `seed`, so changing the seed or the counts never moves a held-out prompt into train.

Deviations: the tasks are templated rather than written or distilled by a larger model (none is at
hand); docqa answers are the documentation's own first sentences, not paraphrases.

Run:
    python -m stages.instruct --config c.json --inputs i.json --run-dir DIR
    e.g. c.json = {"n_arith": 500, "chat_files": ["data/train.jsonl::sharegpt"]}, i.json = {"docs_clean": "DIR"}
"""
from __future__ import annotations

import hashlib
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from stages.chat.docqa import Entry, parse_pydoc, questions
from stages.chat.importers import DataImportError, Example, import_file, parse_spec, to_row
from stages.chat.verifiers import verify
from stages.contract import StageContext, StageError, StageResult, main
from storage.artifacts import Artifact
from storage.parquet import ShardWriter, count_rows, iter_rows

INPUTS = ("docs_clean",)
OUTPUTS = ("chat", "prefs", "prompts")
INPUT_FILES = ("chat_files", "prefs_files", "prompts_files")  # user datasets: content in the fingerprint
SOURCE = "instruct"
KINDS = ("chat", "prefs", "prompts")

# used when the corpus has too few plain lowercase words of its own (a tiny or non-English corpus)
FALLBACK_WORDS = (
    "apple", "river", "python", "module", "garden", "window", "planet", "silver", "bridge", "candle",
    "forest", "orange", "pencil", "rocket", "summer", "number", "string", "letter", "winter", "monkey",
    "castle", "dragon", "island", "jacket", "kitten", "ladder", "marble", "needle", "pepper", "rabbit",
    "saddle", "tunnel", "violet", "wallet", "yellow", "basket", "cactus", "feather", "harbor", "lantern",
)
WORD = re.compile(r"\b[a-z]{4,10}\b")  # the words count and string questions are about
NAMES = ("Ana", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kemal", "Lena")
THINGS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "cards", "shells", "stickers", "cookies")


@dataclass(frozen=True)
class Config:
    n_arith: int = 2000  # items per generated task (each gives a chat, a prefs and a prompts row)
    n_count: int = 1000
    n_string: int = 1000
    n_wordprob: int = 1000
    arith_max: int = 999  # operands are drawn from 10..arith_max
    arith_ops: str = "+-*"  # the operators arith and word-problem questions use
    worked: bool = True  # arithmetic and counting replies work the answer out step by step before stating it
    letters_apart: bool = True  # count and string questions write the word's letters apart: "p y t h o n"
    max_docqa: int = 4000  # docqa items at most (0: none); a seeded sample when the corpus gives more
    rl_per_task: int = 1000  # further problems per generated task, written to `prompts` only (GRPO's train set)
    heldout_frac: float = 0.1  # share of prompts held out as "val"
    seed: int = 0
    # user datasets, "path" or "path::format" (formats: stages/chat/importers.py)
    chat_files: tuple[str, ...] = ()
    prefs_files: tuple[str, ...] = ()
    prompts_files: tuple[str, ...] = ()
    on_error: Literal["raise", "skip"] = "raise"  # a bad record in a user file: stop, or count and skip it
    max_skips: int = 100  # per file, with on_error="skip"

    def validate(self) -> None:
        for name in ("n_arith", "n_count", "n_string", "n_wordprob", "max_docqa", "rl_per_task", "max_skips"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.arith_max < 10 or not self.arith_ops or set(self.arith_ops) - set("+-*"):
            raise ValueError(f"arith_max must be >= 10 and arith_ops a non-empty subset of '+-*', got {self.arith_max}, {self.arith_ops!r}")
        if not 0.0 <= self.heldout_frac < 1.0:
            raise ValueError(f"heldout_frac must be in [0, 1), got {self.heldout_frac}")


@dataclass(frozen=True)
class Item:
    """One generated question with its reply, its checkable answer and a plausible wrong reply."""

    task: str
    question: str
    reply: str  # what the assistant says (SFT target, prefs chosen)
    rejected: str  # a plausible wrong reply (prefs rejected)
    answer: str = ""  # the reference a verifier checks; "" when the reply is free text
    verifier: str = ""


# -- splits ---------------------------------------------------------------------------------------------


def prompt_key(prompt: list[dict[str, str]]) -> str:
    """The canonical key of an item: its prompt turns, whitespace- and case-normalised."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].split()).casefold()}" for m in prompt)


def heldout(key: str, frac: float) -> bool:
    """Whether the item with this key is held out: a hash of the key, as a number in [0, 1), < frac."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64 < frac


def row_prompt(row: dict[str, Any], kind: str) -> list[dict[str, str]]:
    """A row's prompt turns; for chat, everything before the last assistant turn."""
    if kind != "chat":
        return row["prompt"]
    last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
    return row["messages"][:last]


def assign_splits(rows: dict[str, list[dict[str, Any]]], frac: float) -> int:
    """Fill every empty `split` by the hash rule, then move to train any val row whose prompt is also
    in train (in any of the three sets). Returns how many rows moved."""
    train_keys = set()
    for kind, kind_rows in rows.items():
        for row in kind_rows:
            key = prompt_key(row_prompt(row, kind))
            if row["split"] is None:
                row["split"] = "val" if heldout(key, frac) else "train"
            if row["split"] == "train":
                train_keys.add(key)
    moved = 0
    for kind, kind_rows in rows.items():
        for row in kind_rows:
            if row["split"] == "val" and prompt_key(row_prompt(row, kind)) in train_keys:
                row["split"] = "train"
                moved += 1
    return moved


# -- sampling helpers ------------------------------------------------------------------------------------


def near_miss(value: int, rng: random.Random, low: int | None = None) -> int:
    """A number a little off `value` (never equal to it, never below `low`)."""
    while True:
        wrong = value + rng.choice([-1, 1]) * rng.choice([1, 1, 2, 3, 10])
        if wrong != value and (low is None or wrong >= low):
            return wrong


def unique_items(make: Callable[[random.Random], Item | None], n: int, rng: random.Random) -> list[Item]:
    """n items with distinct questions from `make(rng)` (fewer when the space runs out)."""
    items: dict[str, Item] = {}
    for _ in range(20 * n):
        if len(items) >= n:
            break
        item = make(rng)
        if item is not None and item.question not in items and not verify(item.verifier, item.rejected, item.answer):
            items[item.question] = item
    return list(items.values())


# -- worked arithmetic ------------------------------------------------------------------------------------


def digits(n: int, width: int) -> list[int]:
    """The digits of n >= 0 from the ones up, padded with zeros to `width`."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def column_work(a: int, b: int, op: str) -> tuple[str, int]:
    """Column addition or subtraction (a >= b) from the ones up, the way it is taught at school, and its
    result. The last line restates the sum, so its last number is the answer.

    47 + 58 -> "7 + 8 = 15, carry 1. 4 + 5 + 1 = 10, carry 1. 47 + 58 = 105"
    85 - 47 -> "15 - 7 = 8, borrow 1. 8 - 1 - 4 = 3. 85 - 47 = 38"
    """
    width = len(str(max(a, b)))
    steps, out, carry = [], [], 0
    for x, y in zip(digits(a, width), digits(b, width)):
        if op == "+":
            s = x + y + carry
            steps.append(f"{x} + {y}{f' + {carry}' if carry else ''} = {s}{', carry 1' if s >= 10 else ''}")
            out.append(s % 10)
            carry = s // 10
        else:
            borrow = int(x - carry < y)
            top = x + 10 * borrow
            d = top - carry - y
            steps.append(f"{top}{f' - {carry}' if carry else ''} - {y} = {d}{', borrow 1' if borrow else ''}")
            out.append(d)
            carry = borrow
    if op == "+" and carry:
        out.append(carry)
    result = int("".join(str(d) for d in reversed(out)))
    return ". ".join(steps) + f". {a} {op} {b} = {result}", result


def product_work(a: int, b: int) -> tuple[str, int]:
    """a * b by partial products of b's digits: "347 * 58 = 347 * 8 + 347 * 50 = 2776 + 17350 = 20126";
    a one-digit b is a single line."""
    parts = [(int(d) * 10**k, a * int(d) * 10**k) for k, d in enumerate(reversed(str(b))) if d != "0"]
    result = sum(v for _, v in parts)
    if len(parts) == 1:
        return f"{a} * {b} = {result}", result
    return (f"{a} * {b} = " + " + ".join(f"{a} * {m}" for m, _ in parts) + " = "
            + " + ".join(str(v) for _, v in parts) + f" = {result}"), result


def work(a: int, op: str, b: int, worked: bool, rng: random.Random | None = None) -> tuple[str, int]:
    """The reply for a op b (op in "+-*", a >= b for "-"): worked out when `worked`, else "a op b = r".

    With `rng`, a plausible wrong reply instead: the same work with a result a little off at the end
    (a near miss), so the only tokens that differ from the right reply are the wrong result's. Not a
    slipped column carried through: every token after such a slip follows correctly from it, and DPO,
    pushing the whole rejected reply down, would teach the model not to build on its own steps (it
    cost 39 points of arithmetic accuracy on tiny).
    """
    right = {"+": a + b, "-": a - b, "*": a * b}[op]
    if not worked:
        text = f"{a} {op} {b} = {right}"
    else:
        text, _ = product_work(a, b) if op == "*" else column_work(a, b, op)
    if rng is None:
        return text, right
    wrong = near_miss(right, rng, low=0)
    return text.rsplit("=", 1)[0] + f"= {wrong}", wrong


# -- the tasks ------------------------------------------------------------------------------------------


def letters(word: str, apart: bool) -> str:
    """A word as the model reads it in letter tasks: "p y t h o n" when `apart`, so every letter is
    a token of its own (a BPE token hides its letters: the "strawberry" problem)."""
    return " ".join(word) if apart else word


def arith_item(rng: random.Random, max_operand: int = 999, ops: str = "+-*", worked: bool = True) -> Item:
    op = rng.choice(ops)
    a, b = rng.randint(10, max_operand), rng.randint(10, max_operand)
    if op == "-" and a < b:
        a, b = b, a  # keep results non-negative: the sign is one more thing for a tiny model to learn
    reply, result = work(a, op, b, worked)
    rejected, _ = work(a, op, b, worked, rng)
    return Item("arith", f"What is {a} {op} {b}?", reply, rejected, str(result), "numeric")


def count_work(word: str, letter: str) -> str:
    """A letter count written out as a running tally: each letter of the word next to the letter
    asked about, then the number of matches so far ("n u 0, u u 1, l u 1, l u 1" for "u" in "null").
    Writing the two letters side by side makes each step a comparison of neighbouring tokens; with
    the sought letter only in the question ("n 0, u 1, ...") a 1.3M-parameter model copied the letters
    but never counted (every tally 0)."""
    tally, steps = 0, []
    for c in word:
        tally += c == letter
        steps.append(f"{c} {letter} {tally}")
    return ", ".join(steps)


def count_item(rng: random.Random, words: list[str], apart: bool = True, worked: bool = True) -> Item:
    """How often a letter is in a word, or how many words a phrase has. With `worked`, a letter count
    walks through the word keeping a tally before it states the count (count_work; the rejected reply:
    the same walk, a near-miss count). Words in a phrase are counted bare: copying each multi-token
    word to number it went wrong far more often than the count itself."""
    if rng.random() < 0.5:
        word = rng.choice(words)
        # mostly a letter of the word; sometimes one it lacks (answer 0)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        question = f'How many times does the letter "{letter}" appear in "{letters(word, apart)}"?'
        count, steps = word.count(letter), count_work(word, letter) if worked else ""
    else:
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        question = f'How many words are in "{phrase}"?'
        count, steps = len(phrase.split()), ""
    wrong = near_miss(count, rng, low=0)
    if not steps:
        return Item("count", question, str(count), str(wrong), str(count), "numeric")
    return Item("count", question, f"{steps}. {count}", f"{steps}. {wrong}", str(count), "numeric")


def string_item(rng: random.Random, words: list[str], apart: bool = True) -> Item | None:
    word = rng.choice(words)
    shown = letters(word, apart)
    op = rng.choice(("reverse", "upper", "first", "last"))
    if op == "reverse":
        question, verifier = f'Reverse the letters of "{shown}".', "exact"
        backwards = word[::-1]
        i = rng.randrange(len(word) - 1)  # a near miss: two neighbouring letters swapped
        wrong = rng.choice([word, backwards[:i] + backwards[i + 1] + backwards[i] + backwards[i + 2:]])
        answer, rejected = letters(backwards, apart), letters(wrong, apart)
    elif op == "upper":
        question, verifier = f'Write "{shown}" in uppercase.', "exact_case"
        answer, rejected = letters(word.upper(), apart), letters(rng.choice([word, word.capitalize()]), apart)
    else:
        answer = word[0] if op == "first" else word[-1]
        question, verifier = f'What is the {op} letter of "{shown}"?', "exact"
        others = [c for c in word if c != answer]
        if not others:
            return None
        rejected = rng.choice(others)
    return Item("string", question, answer, rejected, answer, verifier)


def wordprob_item(rng: random.Random, ops: str = "+-*", worked: bool = True) -> Item | None:
    """A templated one- or two-step word problem over the operations in `ops` (sharing equally is the
    inverse of "*"); the reply works the arithmetic out like arith_item. None: no template fits `ops`."""
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
    needs = {0: "+", 1: "-", 2: "*", 3: "*", 4: "+-", 5: "*"}
    templates = [t for t, need in needs.items() if set(need) <= set(ops)]
    if not templates:
        return None
    template = rng.choice(templates)
    if template == 0:
        question = f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?"
        steps = [(a, "+", b)]
    elif template == 1:
        a = a + b  # enough to give away
        question = f"{name} has {a} {thing} and gives {b} to {other}. How many {thing} does {name} have left?"
        steps = [(a, "-", b)]
    elif template == 2:
        question = f"There are {c} boxes with {b} {thing} in each box. How many {thing} are there in total?"
        steps = [(b, "*", c)]
    elif template == 3:
        question = f"{name} shares {b * c} {thing} equally among {c} friends. How many {thing} does each friend get?"
        steps = [(b * c, "/", c)]
    elif template == 4:
        question = (f"A shelf holds {a} {thing}. {name} adds {b} {thing} and then takes away {c}. "
                    f"How many {thing} are on the shelf now?")
        steps = [(a, "+", b), (a + b, "-", c)]
    else:
        question = f"{name} reads {c} pages every day. How many pages does {name} read in {b} days?"
        steps = [(b, "*", c)]

    def solve(wrong: random.Random | None) -> tuple[str, int]:
        """The worked reply and its result; with `wrong`, a near miss at the last result (see work)."""
        lines, value = [], None
        for k, (x, op, y) in enumerate(steps):
            x = x if value is None else value  # a second step works on the first one's result
            miss = wrong if k == len(steps) - 1 else None
            if op == "/":  # division by a divisor known to go in: state the quotient
                value = x // y if miss is None else near_miss(x // y, miss, low=0)
                lines.append(f"{x} / {y} = {value}")
            elif op == "-" and x < y:
                return "", -1
            else:
                text, value = work(x, op, y, worked, miss)
                lines.append(text)
        return ". ".join(lines), value

    reply, result = solve(None)
    rejected, wrong = solve(rng)
    if result < 0 or wrong == result:  # a result below zero: no such problem
        return None
    return Item("wordprob", question, reply, rejected, str(result), "numeric")


def docqa_items(entries: list[Entry], rng: random.Random) -> list[Item]:
    """One item per docqa question; rejected is another question's answer of the same type or the
    answer cut short."""
    qas = questions(entries)
    by_type: dict[str, list[str]] = {}
    for qa in qas:
        by_type.setdefault(qa.qtype, []).append(qa.answer)
    items = []
    for qa in qas:
        words = qa.answer.split()
        others = [a for a in rng.sample(by_type[qa.qtype], min(5, len(by_type[qa.qtype]))) if a != qa.answer]
        if len(words) >= 6 and (rng.random() < 0.5 or not others):
            rejected = " ".join(words[: len(words) // 2])
        elif others:
            rejected = others[0]
        else:
            continue  # a one-of-a-kind short answer: no plausible wrong reply
        if qa.exact and verify("exact", rejected, qa.answer):
            continue  # e.g. two signatures that differ only in case: not a wrong answer
        verifier = "exact" if qa.exact else ""
        items.append(Item("docqa", qa.question, qa.answer, rejected, qa.answer if qa.exact else "", verifier))
    return items


def vocabulary(counts: Counter, n: int = 3000) -> list[str]:
    """The corpus's n most frequent words (WORD: plain lowercase, 4-10 letters), ties by spelling."""
    words = sorted(counts, key=lambda w: (-counts[w], w))[:n]
    return words if len(words) >= 50 else list(FALLBACK_WORDS)


def task_makers(cfg: Config, words: list[str]) -> dict[str, Callable[[random.Random], Item | None]]:
    """One item maker per generated task, set up as the config says (also used by bench.heldout)."""
    return {
        "arith": lambda r: arith_item(r, cfg.arith_max, cfg.arith_ops, cfg.worked),
        "count": lambda r: count_item(r, words, cfg.letters_apart, cfg.worked),
        "string": lambda r: string_item(r, words, cfg.letters_apart),
        "wordprob": lambda r: wordprob_item(r, cfg.arith_ops, cfg.worked),
    }


def generate(cfg: Config, entries: list[Entry], words: list[str]) -> tuple[list[Item], list[Item]]:
    """Every generated item, docqa first, and the RL problems (rl_per_task per generated task). Each task
    has its own seeded generator, so changing one task's count leaves the others' items as they were;
    a task's RL problems are drawn after its items from the same generator, so they never repeat one."""
    def rng(task: str) -> random.Random:
        return random.Random(f"{cfg.seed}:{task}")

    docqa = docqa_items(entries, rng("docqa"))
    if len(docqa) > cfg.max_docqa:
        docqa = rng("docqa-sample").sample(docqa, cfg.max_docqa)
    counts = {"arith": cfg.n_arith, "count": cfg.n_count, "string": cfg.n_string, "wordprob": cfg.n_wordprob}
    items, rl = list(docqa), []
    for task, make in task_makers(cfg, words).items():
        n = counts[task]
        drawn = unique_items(make, n + (cfg.rl_per_task if n else 0), rng(task))
        items += drawn[:n]
        rl += drawn[n:]
    return items, rl


def item_rows(item: Item) -> dict[str, list[dict[str, Any]]]:
    """The chat, prefs and (for a checkable answer) prompts rows of one item, split not yet set."""
    ex = Example(prompt=[{"role": "user", "content": item.question}],
                 reply=[{"role": "assistant", "content": item.reply}],
                 rejected=[{"role": "assistant", "content": item.rejected}],
                 answer=item.answer, verifier=item.verifier, task=item.task)
    return {
        "chat": [to_row(ex, "chat", SOURCE)],
        "prefs": [to_row(ex, "prefs", SOURCE)],
        "prompts": [to_row(ex, "prompts", SOURCE)] if item.verifier else [],
    }


# -- the stage --------------------------------------------------------------------------------------------


def read_entries(docs_path: str, ctx: StageContext) -> tuple[list[Entry], list[str], int]:
    """docqa entries and the vocabulary of the corpus, and how many docs were read."""
    total = count_rows(docs_path)
    entries: list[Entry] = []
    counts: Counter = Counter()
    for i, doc in enumerate(iter_rows(docs_path, columns=["url", "title", "text"])):
        text = doc["text"] or ""
        entries.extend(parse_pydoc(text, doc["url"] or "", doc["title"] or ""))
        counts.update(WORD.findall(text))
        if (i + 1) % 50 == 0 or i + 1 == total:
            ctx.progress(i + 1, total, "docqa", entries=len(entries))
    return entries, vocabulary(counts), total


def import_user_files(cfg: Config) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Rows of every user file by kind, and one stats row per file."""
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    stats = []
    for kind, specs in (("chat", cfg.chat_files), ("prefs", cfg.prefs_files), ("prompts", cfg.prompts_files)):
        for spec in specs:
            path, fmt = parse_spec(spec)
            try:
                got, st = import_file(Path(path), kind, fmt, on_error=cfg.on_error, max_skips=cfg.max_skips)
            except DataImportError as e:
                if e.line is None:
                    hint = "check the path and name its format as PATH::FORMAT (see stages/chat/importers.py)"
                else:
                    hint = "fix the record or set on_error='skip'" if cfg.on_error == "raise" else "fix the file or raise max_skips"
                raise StageError(f"instruct: {kind}_files: {e}; {hint}") from None
            rows[kind].extend(got)
            stats.append({"file": spec, "kind": kind, "format": st["format"], "records": st["records"],
                          "rows": st["rows"], "skipped": st["skipped"]})
    return rows, stats


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    try:
        cfg.validate()
    except ValueError as e:
        raise StageError(f"instruct: {e}") from None
    # user files first: a bad one fails the stage before any work is done
    user_rows, import_stats = import_user_files(cfg)

    entries, words, n_docs = read_entries(inputs["docs_clean"].path, ctx)
    items, rl_items = generate(cfg, entries, words)
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for item in items:
        for kind, kind_rows in item_rows(item).items():
            rows[kind].extend(kind_rows)
    sft_prompt_ids = {r["id"] for r in rows["prompts"]}
    for item in rl_items:
        rows["prompts"].extend(item_rows(item)["prompts"])
    for kind in KINDS:
        rows[kind].extend(user_rows[kind])
    if not rows["chat"]:
        raise StageError("instruct: no chat rows (every task count is 0, the corpus gave no docqa, no chat_files); "
                         "raise n_arith or give chat_files")

    # identical rows (same content, same id) are kept once; rows of one item share its prompt
    duplicates = 0
    for kind in KINDS:
        unique = {r["id"]: r for r in rows[kind]}
        duplicates += len(rows[kind]) - len(unique)
        rows[kind] = list(unique.values())
    moved = assign_splits(rows, cfg.heldout_frac)
    rl_tasks = {it.task for it in rl_items}  # their train prompts are the RL problems; SFT items' stay as held-out ones
    rows["prompts"] = [r for r in rows["prompts"]
                       if r["split"] == "val" or r["task"] not in rl_tasks or r["id"] not in sft_prompt_ids]

    for kind in KINDS:
        with ShardWriter(ctx.output(kind), kind) as writer:
            writer.write_many(rows[kind])

    per_task: dict[str, Counter] = {}
    for kind in KINDS:
        for r in rows[kind]:
            task = r.get("task") or r["source"]
            per_task.setdefault(task, Counter())[f"{kind}_{r['split']}"] += 1
    task_table = [{"task": t, **{f"{k}_{s}": c[f"{k}_{s}"] for k in KINDS for s in ("train", "val")}}
                  for t, c in sorted(per_task.items())]
    metrics: dict[str, float] = {}
    for kind in KINDS:
        for split in ("train", "val"):
            metrics[f"{kind}_{split}"] = float(sum(r["split"] == split for r in rows[kind]))
    for t, c in per_task.items():
        metrics[f"task_{t}"] = float(c["chat_train"] + c["chat_val"])
    metrics.update(docs=float(n_docs), docqa_entries=float(len(entries)), vocabulary=float(len(words)),
                   duplicates=float(duplicates), moved_to_train=float(moved), rl_problems=float(len(rl_items)),
                   import_skipped=float(sum(s["skipped"] for s in import_stats)))
    ctx.tracker.log_metrics(metrics)

    summary = "\n".join([
        "### instruct",
        f"chat {metrics['chat_train']:.0f} train / {metrics['chat_val']:.0f} val, prefs {metrics['prefs_train']:.0f} / "
        f"{metrics['prefs_val']:.0f}, prompts {metrics['prompts_train']:.0f} / {metrics['prompts_val']:.0f}; "
        f"{len(entries)} docqa entries from {n_docs} docs; {len(rl_items)} RL problems (prompts only); "
        f"{duplicates} duplicates dropped, {moved} rows moved to train",
        "",
        "| task | chat train | chat val | prefs train | prefs val | prompts train | prompts val |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['task']} | {r['chat_train']} | {r['chat_val']} | {r['prefs_train']} | {r['prefs_val']} | "
          f"{r['prompts_train']} | {r['prompts_val']} |" for r in task_table),
        *([""] + [f"imported {s['file']} ({s['format']} -> {s['kind']}): {s['rows']} rows, {s['skipped']} skipped"
                  for s in import_stats] if import_stats else []),
    ])
    samples = [{"task": it.task, "question": it.question, "reply": it.reply, "rejected": it.rejected}
               for it in {it.task: it for it in items}.values()]
    return StageResult(
        outputs={k: {"rows": len(rows[k]), "train": int(metrics[f"{k}_train"]), "val": int(metrics[f"{k}_val"])} for k in KINDS},
        metrics=metrics,
        summary=summary,
        tables={"tasks": task_table, "imports": import_stats, "samples": samples},
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

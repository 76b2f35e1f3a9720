"""Instruct data: the chat, preference and reward-prompt sets that SFT, DPO, reward modelling and GRPO train on.

What: from `docs_clean` and a seeded generator, writes three Parquet datasets, each with a
`split` column ("train", "val" or "test") and an equivalence `key` (see Splits):
- `chat` (id, messages, task, source, split, key): conversations whose assistant turns SFT learns;
- `prefs` (id, prompt, chosen, rejected, task, source, split, key, kind): chosen is correct, rejected a
  plausible wrong reply of one of two kinds: "near_miss" (the right work with a result a little off,
  another item's answer, a truncated answer) and, for worked items, "slip" (see Hard pairs);
- `prompts` (id, prompt, answer, verifier, task, source, split, key): prompts with a reference answer and
  the name of the check in stages/chat/verifiers.py that grades a completion (GRPO, evaluation).

RL prompts: with `rl_per_task` > 0, each generated task (arith, count, string, wordprob) also draws
that many further problems that go to `prompts` only, and the train prompts of that task are just
these (docqa and user prompts keep theirs). GRPO then practises on problems SFT never saw, as a lab
keeps its RL prompt set apart from its SFT data: on problems SFT trained on for several epochs, more
groups get the same reward for every sample, and such a group teaches nothing. RL problems whose key
falls in a held-out share become val or test prompts, which enlarges the held-out sets.

Preference problems: with `pref_per_task` > 0, each generated task also draws that many further
problems (none sharing an equivalence key with one of its items) whose pairs are the task's train
`prefs`, in place of the SFT items' own: the reward model and DPO then rank replies to problems SFT
never trained on, as InstructGPT keeps its SFT, RM and PPO prompts apart. The SFT model has learned
its train replies by heart: on their pairs its likelihood ranks 99.6% of near misses and 98% of slips
right, on new problems 97% and 96% (tiny recipe), so pairs of SFT items teach a reward model little.
Held-out preference problems enlarge the val and test prefs.

Tasks (each item gives one chat row, one near-miss prefs row and its slip rows, and a prompts row when
its answer is exact):
- docqa: closed-book questions about the modules, functions and classes the corpus documents,
  answered from that documentation (stages/chat/docqa.py): "What does json.dumps do?" -> the first
  sentence of its docstring; "Which module provides dumps?" -> "json" (exact). With
  `docqa_open_book`, that share of the items also gets an open-book chat row (SFT only): the same
  question after numbered passages, the entry's own among others of its module, as `family rag`
  asks it (`open_book_items`); the model learns to read the answer out of the passage shown.
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

Hard pairs: a near miss differs from the chosen reply only in its last number, which the worked steps
above it give away, so any reward model or DPO policy ranks it right and the pair measures little.
With `slip_pairs` > 0 every worked arith, letter-count and wordprob item also gives that many prefs rows
whose rejected reply slips once inside the work and then carries on consistently: a carry or borrow
left out (the commonest bugs of school column arithmetic: Brown & Burton 1978, "Diagnostic models for
procedural bugs in basic mathematical skills"), a column's digit one off, a partial product off in one
digit, a letter of the tally missed or miscounted; every later step and the result follow from the slip.
Telling these apart needs checking the steps, not copying the last one.

Splits: train, val (what settings are tuned on) and test (reported only: no stage trains on it or
chooses a setting by it). Every item has an equivalence key naming its problem whatever the wording:
"expr:47+58" for 47 + 58 and 58 + 47 (the operands of + and * in order) and for a word problem over the
same numbers and operations with other names or objects, "count:banana:a" (word and letter),
"string:banana" (every string question about that word), "docqa:json:dumps" (every question about one
documented entry); a user record's key is a hash of its prompt text. A hash of the key puts the
problem in val below `val_frac`, in test at or above 1 - `test_frac`, else in train; rows joined by a
key or by the same prompt text then share one split, the first of train, val, test among theirs. So
the chat, prefs and prompts rows of a problem land together and no problem is in two splits. A user
record that names its own split keeps it unless its problem is also in an earlier split (counted as
`moved_to_train`, `moved_to_val`). The hash does not depend on `seed`, so changing the seed or the
counts never moves a held-out problem into train.

Decontamination (the table `decontam`, metrics `decontam/...`): every held-out example (prompt and
reference reply) of each split and task against every train set (SFT chat, prefs, RL prompts and the
pretraining corpus): exact prompt matches and equivalence keys shared with train, which the splits
make 0, and 13-gram overlap (GPT-3's check: Brown et al. 2020, appendix C; an example shorter than 13
words overlaps when it is inside a train text). Templated replies share phrasing, and docqa overlaps
the corpus by design: closed-book docqa asks the model to recall its pretraining documents.

Deviations: the tasks are templated rather than written or distilled by a larger model (none is at
hand); docqa answers are the documentation's own first sentences, not paraphrases.

Run:
    python -m stages.instruct --config c.json --inputs i.json --run-dir DIR
    e.g. c.json = {"n_arith": 500, "chat_files": ["data/train.jsonl::sharegpt"]}, i.json = {"docs_clean": "DIR"}
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from stages.chat.decontam import KINDS, NGRAM, SPLITS, TRAIN_SETS, decontamination, prompt_key, row_prompt
from stages.chat.docqa import Entry, context_prompt, entry_passage, numbered_passage, parse_pydoc, questions
from stages.chat.importers import DataImportError, Example, import_file, parse_spec, to_row
from stages.chat.verifiers import verify
from stages.chat.worked import count_work, letters, near_miss, pick_slips, slip_work, slips_of, work
from stages.contract import StageContext, StageError, StageResult, main
from storage.artifacts import Artifact
from storage.parquet import ShardWriter, count_rows, iter_rows

INPUTS = ("docs_clean",)
OUTPUTS = ("chat", "prefs", "prompts")
INPUT_FILES = ("chat_files", "prefs_files", "prompts_files")  # user datasets: content in the fingerprint
SOURCE = "instruct"

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
    docqa_open_book: float = 0.0  # share of docqa items that also get an open-book chat row (`open_book_items`)
    open_book_passages: int = 2  # passages in such a row: the entry's own and others of its module
    rl_per_task: int = 1000  # further problems per generated task, written to `prompts` only (GRPO's train set)
    pref_per_task: int = 0  # further problems per generated task whose pairs are its train `prefs` (0: the SFT items')
    slip_pairs: int = 1  # per worked arith, letter-count and wordprob item: prefs rows whose rejected reply slips in the work
    val_frac: float = 0.1  # share of problems (equivalence keys) held out as "val", what settings are tuned on
    test_frac: float = 0.1  # share held out as "test": reported only, never trained on or tuned by
    seed: int = 0
    # user datasets, "path" or "path::format" (formats: stages/chat/importers.py)
    chat_files: tuple[str, ...] = ()
    prefs_files: tuple[str, ...] = ()
    prompts_files: tuple[str, ...] = ()
    on_error: Literal["raise", "skip"] = "raise"  # a bad record in a user file: stop, or count and skip it
    max_skips: int = 100  # per file, with on_error="skip"

    def validate(self) -> None:
        for name in ("n_arith", "n_count", "n_string", "n_wordprob", "max_docqa", "rl_per_task", "pref_per_task",
                     "slip_pairs", "max_skips"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.docqa_open_book <= 1.0 or self.open_book_passages < 1:
            raise ValueError(f"docqa_open_book must be in [0, 1] and open_book_passages >= 1, got "
                             f"{self.docqa_open_book}, {self.open_book_passages}")
        if self.arith_max < 10 or not self.arith_ops or set(self.arith_ops) - set("+-*"):
            raise ValueError(f"arith_max must be >= 10 and arith_ops a non-empty subset of '+-*', got {self.arith_max}, {self.arith_ops!r}")
        if min(self.val_frac, self.test_frac) < 0.0 or self.val_frac + self.test_frac >= 1.0:
            raise ValueError(f"val_frac and test_frac must be >= 0 with a sum below 1, got {self.val_frac}, {self.test_frac}")


@dataclass(frozen=True)
class Item:
    """One generated question with its reply, its checkable answer and a plausible wrong reply."""

    task: str
    question: str
    reply: str  # what the assistant says (SFT target, prefs chosen)
    rejected: str  # a plausible wrong reply (prefs rejected)
    answer: str = ""  # the reference a verifier checks; "" when the reply is free text
    verifier: str = ""
    key: str = ""  # the problem, whatever its wording (see Splits): "expr:47+58" for 47 + 58 and 58 + 47
    slips: tuple[str, ...] = ()  # wrong replies with a slip inside the work that every later step follows


# -- splits ---------------------------------------------------------------------------------------------


def text_key(prompt: list[dict[str, str]]) -> str:
    """The equivalence key of a prompt that no generator wrote (a user's): a hash of its normalised text."""
    return "text:" + hashlib.sha256(prompt_key(prompt).encode()).hexdigest()[:16]


def split_of(key: str, val_frac: float, test_frac: float) -> str:
    """A problem's split from a hash of its key, u in [0, 1): val below val_frac, test at or above
    1 - test_frac. At opposite ends, so changing one fraction never moves the other's problems."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64
    return "val" if u < val_frac else "test" if u >= 1.0 - test_frac else "train"


def assign_splits(rows: dict[str, list[dict[str, Any]]], val_frac: float, test_frac: float) -> Counter:
    """Give each row its own split (a user record's) or its key's (split_of), then give every group of
    rows joined by a key or by the same prompt text (in any of the three sets) the first of SPLITS
    among theirs. Returns how many rows moved, by the split they moved to."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:  # union-find over keys and prompt texts
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    flat = [(row, kind) for kind, kind_rows in rows.items() for row in kind_rows]
    for row, kind in flat:
        parent[root(row["key"])] = root(text_key(row_prompt(row, kind)))
    own = [row["split"] or split_of(row["key"], val_frac, test_frac) for row, _ in flat]
    first: dict[str, str] = {}
    for (row, _), split in zip(flat, own):
        r = root(row["key"])
        first[r] = min(first.get(r, split), split, key=SPLITS.index)
    moved: Counter = Counter()
    for (row, _), split in zip(flat, own):
        row["split"] = first[root(row["key"])]
        moved[row["split"]] += row["split"] != split
    return moved


# -- sampling helpers ------------------------------------------------------------------------------------


def unique_items(make: Callable[[random.Random], Item | None], n: int, rng: random.Random) -> list[Item]:
    """n items with distinct questions from `make(rng)` (fewer when the space runs out)."""
    items: dict[str, Item] = {}
    for _ in range(20 * n):
        if len(items) >= n:
            break
        item = make(rng)
        if item is not None and item.question not in items and not any(
                verify(item.verifier, wrong, item.answer) for wrong in (item.rejected, *item.slips)):
            items[item.question] = item
    return list(items.values())


# -- the tasks ------------------------------------------------------------------------------------------


def expression(x: int | str, op: str, y: int) -> str:
    """x op y as an equivalence key's text, the operands of + and * in order: a + b and b + a are one."""
    if op in "+*":
        x, y = sorted((str(x), str(y)))
    return f"{x}{op}{y}"


def arith_item(rng: random.Random, max_operand: int = 999, ops: str = "+-*", worked: bool = True,
               slip_pairs: int = 0) -> Item:
    op = rng.choice(ops)
    a, b = rng.randint(10, max_operand), rng.randint(10, max_operand)
    if op == "-" and a < b:
        a, b = b, a  # keep results non-negative: the sign is one more thing for a tiny model to learn
    reply, result = work(a, op, b, worked)
    rejected, _ = work(a, op, b, worked, rng)
    sub = random.Random(rng.getrandbits(64))  # the slips' own draws: slip_pairs leaves the problems as they are
    slips = [slip_work(a, op, b, s)[0] for s in pick_slips(slips_of(a, op, b), slip_pairs, sub)] if worked else []
    return Item("arith", f"What is {a} {op} {b}?", reply, rejected, str(result), "numeric",
                "expr:" + expression(a, op, b), tuple(slips))


def count_item(rng: random.Random, words: list[str], apart: bool = True, worked: bool = True,
               slip_pairs: int = 0) -> Item:
    """How often a letter is in a word, or how many words a phrase has. With `worked`, a letter count
    walks through the word keeping a tally before it states the count (count_work; the rejected reply:
    the same walk, a near-miss count; the slips: a walk that miscounts one letter). Words in a phrase
    are counted bare: copying each multi-token word to number it went wrong far more often than the
    count itself."""
    if rng.random() < 0.5:
        word = rng.choice(words)
        # mostly a letter of the word; sometimes one it lacks (answer 0)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        question = f'How many times does the letter "{letter}" appear in "{letters(word, apart)}"?'
        count, steps, key = word.count(letter), count_work(word, letter) if worked else "", f"count:{word}:{letter}"
    else:
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        question = f'How many words are in "{phrase}"?'
        count, steps, key = len(phrase.split()), "", f"count:{phrase}"
    wrong = near_miss(count, rng, low=0)
    if not steps:
        return Item("count", question, str(count), str(wrong), str(count), "numeric", key)
    sub = random.Random(rng.getrandbits(64))
    walks = [count_work(word, letter, i) for i in sub.sample(range(len(word)), min(slip_pairs, len(word)))]
    return Item("count", question, f"{steps}. {count}", f"{steps}. {wrong}", str(count), "numeric", key,
                tuple(f"{walk}. {walk.rsplit(' ', 1)[1]}" for walk in walks))


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
    return Item("string", question, answer, rejected, answer, verifier, f"string:{word}")


def wordprob_item(rng: random.Random, ops: str = "+-*", worked: bool = True, slip_pairs: int = 0) -> Item | None:
    """A templated one- or two-step word problem over the operations in `ops` (sharing equally is the
    inverse of "*"); the reply works the arithmetic out like arith_item, a slip in one step carries into
    the next. Its key is its numbers and operations, not its names and objects, and an arith question
    over the same numbers shares it. None: no template fits `ops`."""
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

    def solve(wrong: random.Random | None = None, slip: tuple[int, Any] | None = None) -> tuple[str, int]:
        """The worked reply and its result; with `wrong`, a near miss at the last result (see work);
        with `slip` = (step, its slip), that step's work slips and the next works on its wrong result."""
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
                text, value = slip_work(x, op, y, slip[1]) if slip and slip[0] == k else work(x, op, y, worked, miss)
                lines.append(text)
        return ". ".join(lines), value

    reply, result = solve()
    rejected, wrong = solve(rng)
    if result < 0 or wrong == result:  # a result below zero: no such problem
        return None
    sub, options, value, key = random.Random(rng.getrandbits(64)), [], None, None
    for k, (x, op, y) in enumerate(steps):  # the slips each step can make, on the right values before it
        x = x if value is None else value
        options += [(k, *s) for s in (slips_of(x, op, y) if worked and op != "/" else [])]
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
        key = expression(x if key is None else f"({key})", op, y)
    slips = []
    for slip in pick_slips(options, len(options), sub):  # in pick_slips' order, until slip_pairs fit
        text, value = solve(slip=(slip[0], slip[1:]))
        if len(slips) < slip_pairs and value >= 0 and value != result and text not in slips:
            slips.append(text)
    return Item("wordprob", question, reply, rejected, str(result), "numeric", "expr:" + key, tuple(slips))


def docqa_items(entries: list[Entry], rng: random.Random, held_out: Callable[[str], bool] = lambda key: False) -> list[Item]:
    """One item per docqa question; rejected is another question's answer of the same type or the
    answer cut short. The questions about one entry share its key ("docqa:json:dumps"). Another
    question's answer is drawn only from answers no `held_out` (val or test) entry has, so no train
    preference pair pushes down a held-out question's answer."""
    qas = questions(entries)
    entry_of: dict[str, str] = {}
    for e in entries:  # "Which module provides dumps?" is asked only when one entry defines the name
        for qa in questions([e]):
            entry_of.setdefault(qa.question, f"docqa:{e.module}:{e.name}")
    held_answers = {qa.answer for qa in qas if held_out(entry_of[qa.question])}  # two modules' entries may share one
    by_type: dict[str, list[str]] = {}
    for qa in qas:
        if qa.answer not in held_answers:
            by_type.setdefault(qa.qtype, []).append(qa.answer)
    items = []
    for qa in qas:
        words = qa.answer.split()
        pool = by_type.get(qa.qtype, [])
        others = [a for a in rng.sample(pool, min(5, len(pool))) if a != qa.answer]
        if len(words) >= 6 and (rng.random() < 0.5 or not others):
            rejected = " ".join(words[: len(words) // 2])
        elif others:
            rejected = others[0]
        else:
            continue  # a one-of-a-kind short answer: no plausible wrong reply
        if qa.exact and verify("exact", rejected, qa.answer):
            continue  # e.g. two signatures that differ only in case: not a wrong answer
        verifier = "exact" if qa.exact else ""
        items.append(Item("docqa", qa.question, qa.answer, rejected, qa.answer if qa.exact else "", verifier,
                          entry_of[qa.question]))
    return items


def open_book_items(cfg: Config, docqa: list[Item], entries: list[Entry]) -> list[Item]:
    """The open-book form of a `docqa_open_book` share of the docqa items, for SFT only (chat rows; the
    prefs and prompts rows stay closed-book): the user turn is `open_book_passages` numbered passages,
    the item's own entry (`entry_passage`) at a random place among other entries of its module (or any
    others), then the question, as `family rag` asks it (stages/chat/docqa.context_prompt); the reply
    is the closed-book one. Same key, so same split."""
    rng = random.Random(f"{cfg.seed}:docqa-open-book")
    by_key = {f"docqa:{e.module}:{e.name}": e for e in entries}
    by_module: dict[str, list[Entry]] = {}
    for e in by_key.values():
        by_module.setdefault(e.module, []).append(e)
    everyone = list(by_key.values())
    out = []
    for it in docqa:
        own = by_key.get(it.key)
        if own is None or rng.random() >= cfg.docqa_open_book:
            continue
        pool = [e for e in by_module[own.module] if e is not own] or [e for e in everyone if e is not own]
        chosen = [own] + rng.sample(pool, min(cfg.open_book_passages - 1, len(pool)))
        rng.shuffle(chosen)
        parts = [numbered_passage(i + 1, *entry_passage(e)) for i, e in enumerate(chosen)]
        out.append(dataclasses.replace(it, question=context_prompt(it.question, parts)))
    return out


def vocabulary(counts: Counter, n: int = 3000) -> list[str]:
    """The corpus's n most frequent words (WORD: plain lowercase, 4-10 letters), ties by spelling."""
    words = sorted(counts, key=lambda w: (-counts[w], w))[:n]
    return words if len(words) >= 50 else list(FALLBACK_WORDS)


def task_makers(cfg: Config, words: list[str]) -> dict[str, Callable[[random.Random], Item | None]]:
    """One item maker per generated task, set up as the config says (also used by bench.heldout)."""
    return {
        "arith": lambda r: arith_item(r, cfg.arith_max, cfg.arith_ops, cfg.worked, cfg.slip_pairs),
        "count": lambda r: count_item(r, words, cfg.letters_apart, cfg.worked, cfg.slip_pairs),
        "string": lambda r: string_item(r, words, cfg.letters_apart),
        "wordprob": lambda r: wordprob_item(r, cfg.arith_ops, cfg.worked, cfg.slip_pairs),
    }


def generate(cfg: Config, entries: list[Entry], words: list[str]) -> tuple[list[Item], list[Item], list[Item]]:
    """Every generated item, docqa first; the preference problems (pref_per_task per generated task, none
    with the key of one of its items); and the RL problems (rl_per_task per generated task). Each task
    has its own seeded generator, so changing one task's count leaves the others' items as they were;
    a task's preference and RL problems are drawn after its items from the same generator, so they
    never repeat one."""
    def rng(task: str) -> random.Random:
        return random.Random(f"{cfg.seed}:{task}")

    docqa = docqa_items(entries, rng("docqa"), lambda key: split_of(key, cfg.val_frac, cfg.test_frac) != "train")
    if len(docqa) > cfg.max_docqa:
        docqa = rng("docqa-sample").sample(docqa, cfg.max_docqa)
    counts = {"arith": cfg.n_arith, "count": cfg.n_count, "string": cfg.n_string, "wordprob": cfg.n_wordprob}
    items, prefs, rl = list(docqa), [], []
    for task, make in task_makers(cfg, words).items():
        n = counts[task]
        n_pref = cfg.pref_per_task if n else 0
        drawn = unique_items(make, n + n_pref + (cfg.rl_per_task if n else 0), rng(task))
        items += drawn[:n]
        keys = {it.key for it in drawn[:n]}
        prefs += [it for it in drawn[n:n + n_pref] if it.key not in keys]
        rl += drawn[n + n_pref:]
    return items, prefs, rl


def item_rows(item: Item) -> dict[str, list[dict[str, Any]]]:
    """The chat, prefs (the near miss, then each slip) and, for a checkable answer, prompts rows of one
    item, with its key; split not yet set."""
    ex = Example(prompt=[{"role": "user", "content": item.question}],
                 reply=[{"role": "assistant", "content": item.reply}],
                 rejected=[{"role": "assistant", "content": item.rejected}],
                 answer=item.answer, verifier=item.verifier, task=item.task)
    slips = [dataclasses.replace(ex, rejected=[{"role": "assistant", "content": s}]) for s in item.slips]
    return {
        "chat": [to_row(ex, "chat", SOURCE) | {"key": item.key}],
        "prefs": [to_row(e, "prefs", SOURCE) | {"key": item.key, "kind": kind}
                  for e, kind in [(ex, "near_miss")] + [(e, "slip") for e in slips]],
        "prompts": [to_row(ex, "prompts", SOURCE) | {"key": item.key}] if item.verifier else [],
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
    items, pref_items, rl_items = generate(cfg, entries, words)
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for item in items:
        for kind, kind_rows in item_rows(item).items():
            rows[kind].extend(kind_rows)
    open_book = open_book_items(cfg, [it for it in items if it.task == "docqa"], entries)
    for item in open_book:
        rows["chat"].extend(item_rows(item)["chat"])
    sft_prompt_ids = {r["id"] for r in rows["prompts"]}
    sft_pref_ids = {r["id"] for r in rows["prefs"]}
    for item in pref_items:
        rows["prefs"].extend(item_rows(item)["prefs"])
    for item in rl_items:
        rows["prompts"].extend(item_rows(item)["prompts"])
    for kind in KINDS:
        rows[kind].extend(r | {"key": text_key(row_prompt(r, kind))} for r in user_rows[kind])
    if not rows["chat"]:
        raise StageError("instruct: no chat rows (every task count is 0, the corpus gave no docqa, no chat_files); "
                         "raise n_arith or give chat_files")

    # identical rows (same content, same id) are kept once; rows of one item share its prompt
    duplicates = 0
    for kind in KINDS:
        unique = {r["id"]: r for r in rows[kind]}
        duplicates += len(rows[kind]) - len(unique)
        rows[kind] = list(unique.values())
    moved = assign_splits(rows, cfg.val_frac, cfg.test_frac)
    rl_tasks = {it.task for it in rl_items}  # their train prompts are the RL problems; SFT items' stay as held-out ones
    rows["prompts"] = [r for r in rows["prompts"]
                       if r["split"] != "train" or r["task"] not in rl_tasks or r["id"] not in sft_prompt_ids]
    pref_tasks = {it.task for it in pref_items}  # likewise: their train pairs are the preference problems'
    rows["prefs"] = [r for r in rows["prefs"]
                     if r["split"] != "train" or r["task"] not in pref_tasks or r["id"] not in sft_pref_ids]

    for kind in KINDS:
        with ShardWriter(ctx.output(kind), kind) as writer:
            writer.write_many(rows[kind])
    decontam, decontam_metrics = decontamination(rows, inputs["docs_clean"].path)
    return summarize(rows, decontam, decontam_metrics, items, len(rl_items), len(entries), n_docs, len(words),
                     duplicates, moved, import_stats, ctx, n_pref=len(pref_items))


def summarize(rows: dict[str, list[dict[str, Any]]], decontam: list[dict[str, Any]], decontam_metrics: dict[str, float],
              items: list[Item], n_rl: int, n_entries: int, n_docs: int, n_words: int, duplicates: int, moved: Counter,
              import_stats: list[dict[str, Any]], ctx: StageContext, n_pref: int = 0) -> StageResult:
    """Rows per task, kind and split, the decontamination figures, the summary and a sample per task."""
    per_task: dict[str, Counter] = {}
    for kind in KINDS:
        for r in rows[kind]:
            per_task.setdefault(r.get("task") or r["source"], Counter())[f"{kind}_{r['split']}"] += 1
    task_table = [{"task": t, **{f"{k}_{s}": c[f"{k}_{s}"] for k in KINDS for s in SPLITS}} for t, c in sorted(per_task.items())]
    metrics: dict[str, float] = {}
    for kind in KINDS:
        for split in SPLITS:
            metrics[f"{kind}_{split}"] = float(sum(r["split"] == split for r in rows[kind]))
    for t, c in per_task.items():
        metrics[f"task_{t}"] = float(sum(c[f"chat_{s}"] for s in SPLITS))
    slip_rows = [r for r in rows["prefs"] if r.get("kind") == "slip"]
    metrics.update(docs=float(n_docs), docqa_entries=float(n_entries), vocabulary=float(n_words),
                   duplicates=float(duplicates), moved_to_train=float(moved["train"]), moved_to_val=float(moved["val"]),
                   rl_problems=float(n_rl), pref_problems=float(n_pref), slip_pairs=float(len(slip_rows)),
                   import_skipped=float(sum(s["skipped"] for s in import_stats)), **decontam_metrics)
    ctx.tracker.log_metrics(metrics)

    def cell(r: dict[str, Any], kind: str) -> str:
        return " / ".join(str(r[f"{kind}_{s}"]) for s in SPLITS)

    test_rows = [r for r in decontam if r["split"] == "test"]
    summary = "\n".join([
        "### instruct",
        "rows train / val / test: " + ", ".join(f"{k} {cell({f'{k}_{s}': int(metrics[f'{k}_{s}']) for s in SPLITS}, k)}"
                                                for k in KINDS)
        + f" ({len(slip_rows)} prefs rows are slips); {n_entries} docqa entries from {n_docs} docs; {n_rl} RL problems "
        f"(prompts only); {duplicates} duplicates dropped, {moved['train']} rows moved to train, {moved['val']} to val",
        "",
        "| task | chat | prefs | prompts |", "|---|---|---|---|",
        *(f"| {r['task']} | {cell(r, 'chat')} | {cell(r, 'prefs')} | {cell(r, 'prompts')} |" for r in task_table),
        "",
        f"Decontamination, test examples (prompt, reference reply) against each train set: "
        f"{metrics['decontam/test_exact_overlap']:.0f} exact prompts and {metrics['decontam/test_key_overlap']:.0f} "
        f"equivalence keys shared with train; share with a {NGRAM}-gram in it (docqa recalls the corpus by design):",
        "",
        "| task | examples | " + " | ".join(TRAIN_SETS) + " |", "|---|---|" + "---|" * len(TRAIN_SETS),
        *(f"| {task} | {group[0]['examples']} | " + " | ".join(f"{g['ngram13'] / max(1, g['examples']):.3f}" for g in group) + " |"
          for task in sorted({r["task"] for r in test_rows})
          for group in [[r for r in test_rows if r["task"] == task]]),
        *([""] + [f"imported {s['file']} ({s['format']} -> {s['kind']}): {s['rows']} rows, {s['skipped']} skipped"
                  for s in import_stats] if import_stats else []),
    ])
    samples = [{"task": it.task, "question": it.question, "reply": it.reply, "rejected": it.rejected,
                "slip": it.slips[0] if it.slips else ""} for it in {it.task: it for it in items}.values()]
    return StageResult(
        outputs={k: {"rows": len(rows[k]), **{s: int(metrics[f"{k}_{s}"]) for s in SPLITS}} for k in KINDS},
        metrics=metrics,
        summary=summary,
        tables={"tasks": task_table, "decontam": decontam, "imports": import_stats, "samples": samples},
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

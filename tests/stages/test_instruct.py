"""Instruct stage: verifiers, generated tasks, docqa on real pydoc text, splits, user files.

The corpus is real: pydoc's documentation of standard-library modules, as plain text
(`pydoc.render_doc(..., renderer=pydoc.plaintext)`) and as trafilatura's extraction of pydoc's HTML
page (the shape the crawl -> extract path gives).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import pydoc
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import trafilatura

from stages import instruct
from stages.chat import worked
from stages.chat.docqa import module_name, parse_pydoc, questions
from stages.chat.verifiers import verify
from stages.contract import StageError
from storage.parquet import read_table, write_table
from tests.conftest import artifact, make_ctx

SMALL = dict(n_arith=200, n_count=100, n_string=100, n_wordprob=100, max_docqa=500, val_frac=0.15, test_frac=0.15,
             rl_per_task=0)


def plain_text(name: str) -> str:
    return pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)


def html_text(name: str) -> str:
    doc = pydoc.HTMLDoc()
    module = importlib.import_module(name)
    return trafilatura.extract(doc.page(pydoc.describe(module), doc.document(module, name)), favor_recall=True)


def docs_dir(root: Path, modules: list[str]) -> Path:
    rows = []
    for i, name in enumerate(modules):
        text = html_text(name) if i % 2 == 0 else plain_text(name)
        rows.append(dict(id=str(i), url=f"http://127.0.0.1:8765/{name}.html", source="pydoc", title=f"Python: module {name}",
                         text=text, lang="en", lang_score=1.0, n_chars=len(text), n_words=len(text.split()),
                         sha256=hashlib.sha256(text.encode()).hexdigest(), cluster=""))
    write_table(rows, root / "docs" / "part-00000.parquet", "docs")
    return root / "docs"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return docs_dir(tmp_path_factory.mktemp("corpus"), ["json", "textwrap", "heapq", "os.path", "string", "math"])


def run_stage(root: Path, docs: Path, **cfg) -> tuple[instruct.StageResult, dict[str, list[dict]]]:
    ctx = make_ctx(root)
    result = instruct.run(instruct.Config(**{**SMALL, **cfg}), {"docs_clean": artifact("docs_clean", docs)}, ctx)
    return result, {k: read_table(ctx.output(k), k).to_pylist() for k in instruct.OUTPUTS}


# -- verifiers ------------------------------------------------------------------------------------------


def test_exact_normalises_whitespace_case_quotes_and_full_stop():
    assert verify("exact", "  Nohtyp. ", "nohtyp")
    assert verify("exact", '"json"', "json")
    assert verify("exact", "os.path.join(a,  *p)", "os.path.join(a, *p)")
    assert not verify("exact", "nohty", "nohtyp")
    assert not verify("exact", "The answer is nohtyp", "nohtyp")


def test_exact_case_cares_about_case():
    assert verify("exact_case", "PYTHON", "PYTHON") and not verify("exact_case", "Python", "PYTHON")


def test_numeric_takes_the_last_number():
    assert verify("numeric", "12 + 30 = 42", "42")
    assert verify("numeric", "She earned $1,250.", "1250")
    assert verify("numeric", "#### 72", "72.0")
    assert verify("numeric", "It is -3", "-3")
    assert not verify("numeric", "5-3", "-3")  # a minus between digits is subtraction, the last number is 3
    assert verify("numeric", "5-3", "3")
    assert not verify("numeric", "42 is wrong, 41", "42")
    assert not verify("numeric", "no number", "1")
    with pytest.raises(ValueError, match="unknown verifier"):
        verify("regex", "a", "a")


# -- generated tasks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["arith", "count", "string", "wordprob"])
def test_generated_answers_verify_and_rejected_do_not(task):
    words = instruct.FALLBACK_WORDS
    make = {"arith": lambda r: instruct.arith_item(r, slip_pairs=2), "wordprob": lambda r: instruct.wordprob_item(r, slip_pairs=2),
            "count": lambda r: instruct.count_item(r, list(words), slip_pairs=2), "string": lambda r: instruct.string_item(r, list(words))}[task]
    items = instruct.unique_items(make, 150, random.Random(0))  # 40 words x 4 string operations = 160 questions
    assert len(items) == 150 and len({it.question for it in items}) == 150
    for it in items:
        assert it.task == task and it.verifier in ("numeric", "exact", "exact_case") and it.key
        assert verify(it.verifier, it.reply, it.answer), it
        assert not verify(it.verifier, it.rejected, it.answer), it
        assert not any(verify(it.verifier, slip, it.answer) for slip in it.slips) and len(set(it.slips)) == len(it.slips)
        assert it.reply not in it.slips and it.rejected not in it.slips
    with_slips = sum(bool(it.slips) for it in items)
    # arith: a one-line product has no work to slip in; count: words in a phrase are counted bare
    assert with_slips == 0 if task == "string" else with_slips > 0.4 * len(items)


def test_generated_answers_are_right():
    rng = random.Random(1)
    for it in instruct.unique_items(instruct.arith_item, 200, rng):
        a, op, b = it.question.removeprefix("What is ").rstrip("?").split()
        assert int(it.answer) == eval(f"{int(a)} {op} {int(b)}")  # noqa: S307 - our own two integers
        assert it.reply.startswith(f"{a} {op} {b} = ") if op == "*" else it.reply.endswith(f"{a} {op} {b} = {it.answer}")
        assert it.reply.endswith(f" = {it.answer}")
    for it in instruct.unique_items(lambda r: instruct.string_item(r, ["python"]), 10, rng):
        assert it.answer in {"n o h t y p", "P Y T H O N", "p", "n"}
    for it in instruct.unique_items(lambda r: instruct.string_item(r, ["python"], apart=False), 10, rng):
        assert it.answer in {"nohtyp", "PYTHON", "p", "n"}
    for apart in (True, False):
        for it in instruct.unique_items(lambda r: instruct.count_item(r, ["mississippi", "banana"], apart, worked=False), 20, rng):
            quoted = re.findall(r'"([^"]*)"', it.question)
            if it.question.startswith("How many times"):
                assert (" " in quoted[1]) == apart
                expected = quoted[1].replace(" ", "").count(quoted[0])
            else:
                expected = len(quoted[0].split())
            assert it.answer == str(expected), it.question


def test_worked_counting_keeps_a_true_tally():
    assert worked.count_work("null", "u") == "n u 0, u u 1, l u 1, l u 1"
    rng = random.Random(2)
    items = instruct.unique_items(lambda r: instruct.count_item(r, ["mississippi", "banana", "strawberry"]), 100, rng)
    for it in items:
        quoted = re.findall(r'"([^"]*)"', it.question)
        if not it.question.startswith("How many times"):  # words in a phrase: counted bare
            assert it.reply == it.answer == str(len(quoted[0].split()))
            continue
        letter, word = quoted[0], quoted[1].replace(" ", "")
        work, result = it.reply.rsplit(". ", 1)
        assert result == it.answer and it.rejected.rsplit(". ", 1)[0] == work  # rejected: same walk, another count
        steps = [step.split(" ") for step in work.split(", ")]
        assert [c for c, _, _ in steps] == list(word) and {t for _, t, _ in steps} == {letter}  # every letter, in order
        tallies = [int(n) for _, _, n in steps]
        assert tallies == [word[:i + 1].count(letter) for i in range(len(word))] and tallies[-1] == int(it.answer)
    assert {it.question.startswith("How many times") for it in items} == {True, False}


def check_column_work(text: str, a: int, op: str, b: int) -> int:
    """Re-derive a worked reply step by step: every one-digit step is true arithmetic, the carries and
    borrows follow, and the digits read off the steps make the stated result. Returns the result."""
    *steps, last = text.split(". ")
    assert last.startswith(f"{a} {op} {b} = ")
    width = len(str(max(a, b)))
    assert len(steps) == width
    out, carry = [], 0
    for step, x, y in zip(steps, reversed(str(a).zfill(width)), reversed(str(b).zfill(width))):
        lhs, rhs = step.split(" = ")
        value = int(rhs.split(",")[0])
        assert eval(lhs) == value, step  # noqa: S307 - digits and operators we wrote
        terms = [int(t) for t in re.split(r" [-+] ", lhs)]
        if op == "+":
            assert terms == [int(x), int(y)] + ([carry] if carry else []), step
            carry = value // 10
            assert ("carry" in rhs) == bool(carry)
        else:
            borrow = "borrow 1" in rhs
            assert terms == [int(x) + 10 * borrow] + ([carry] if carry else []) + [int(y)], step
            carry = int(borrow)
        out.append(value % 10)
    if op == "+" and carry:
        out.append(carry)
    result = int("".join(map(str, reversed(out))))
    assert last == f"{a} {op} {b} = {result}"
    return result


def test_worked_arithmetic_is_school_column_arithmetic():
    assert worked.column_work(47, 58, "+")[0] == "7 + 8 = 15, carry 1. 4 + 5 + 1 = 10, carry 1. 47 + 58 = 105"
    assert worked.column_work(85, 47, "-")[0] == "15 - 7 = 8, borrow 1. 8 - 1 - 4 = 3. 85 - 47 = 38"
    assert worked.column_work(305, 47, "-")[0] == ("15 - 7 = 8, borrow 1. 10 - 1 - 4 = 5, borrow 1. 3 - 1 - 0 = 2. "
                                                    "305 - 47 = 258")
    assert worked.product_work(347, 58)[0] == "347 * 58 = 347 * 8 + 347 * 50 = 2776 + 17350 = 20126"
    assert worked.product_work(34, 7)[0] == "34 * 7 = 238"
    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        assert check_column_work(worked.column_work(a, b, "+")[0], a, "+", b) == a + b
        a, b = max(a, b), min(a, b)
        assert check_column_work(worked.column_work(a, b, "-")[0], a, "-", b) == a - b


def test_worked_rejected_replies_differ_only_in_the_result():
    """A rejected worked reply is the right work with a near-miss result: no token after a mistake."""
    rng = random.Random(2)
    for _ in range(500):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        a, b = max(a, b), min(a, b)
        for op in "+-*":
            right, value = worked.work(a, op, b, worked=True)
            wrong, result = worked.work(a, op, b, worked=True, rng=rng)
            assert value == eval(f"{a} {op} {b}") and result != value  # noqa: S307 - our own two integers
            assert wrong == right.removesuffix(str(value)) + str(result)
    for it in instruct.unique_items(lambda r: instruct.wordprob_item(r, "+-*"), 100, rng):
        assert it.rejected.rsplit("= ", 1)[0] == it.reply.rsplit("= ", 1)[0]


@pytest.mark.parametrize("ops, templates", [("+", {"gets"}), ("-", {"gives"}), ("+-", {"gets", "gives", "takes away"}),
                                            ("*", {"boxes", "shares", "reads"})])
def test_word_problems_use_only_the_recipes_operations(ops, templates):
    seen = set()
    for it in instruct.unique_items(lambda r: instruct.wordprob_item(r, ops), 60, random.Random(3)):
        seen |= {t for t in ("gets", "gives", "takes away", "boxes", "shares", "reads") if t in it.question}
        numbers = [int(n) for n in re.findall(r"\d+", it.question)]
        if "takes away" in it.question:
            assert int(it.answer) == numbers[0] + numbers[1] - numbers[2]
        used = set(re.findall(r"[-+*/]", it.reply))
        assert used <= set(ops) | ({"/", "+"} if "*" in ops else set())  # products add their partial products
    assert seen == templates
    assert instruct.wordprob_item(random.Random(0), "") is None


def read_slipped_column_work(text: str, a: int, op: str, b: int) -> tuple[int, int]:
    """Read a worked reply that may hold one slip: every step takes the carry or borrow the step before
    it wrote, and the result is the digits the steps wrote. Returns (the column of the one step that is
    not school arithmetic, the result); every other step must be."""
    *steps, last = text.split(". ")
    width = len(str(max(a, b)))
    assert len(steps) == width and last.startswith(f"{a} {op} {b} = ")
    out, carry, wrong = [], 0, []
    for i, (step, x, y) in enumerate(zip(steps, reversed(str(a).zfill(width)), reversed(str(b).zfill(width)))):
        lhs, rhs = step.split(" = ")
        value, noted = int(rhs.split(",")[0]), ", carry 1" in rhs or ", borrow 1" in rhs
        terms = [int(t) for t in re.split(r" [-+] ", lhs)]
        if op == "+":
            assert terms == [int(x), int(y)] + ([carry] if carry else []), step  # takes the carry it was given
            right = value == eval(lhs) and noted == (value >= 10)  # noqa: S307 - digits we wrote
        else:
            top = terms[0]
            assert top in (int(x), int(x) + 10) and terms[1:] == ([carry] if carry else []) + [int(y)], step
            needed = int(x) - carry < int(y)
            right = value == eval(lhs) and top == int(x) + 10 * needed and noted == needed  # noqa: S307
        if not right:
            wrong.append(i)
        out.append(value % 10)
        carry = int(noted)
    if op == "+" and carry:
        out.append(carry)
    result = int("".join(map(str, reversed(out))))
    assert last == f"{a} {op} {b} = {result}" and len(wrong) == 1, (text, wrong)
    return wrong[0], result


def test_slipped_column_work_is_one_slip_carried_through():
    """Each slip breaks one step; every later step follows from it, the result is what the steps give."""
    assert worked.column_work(47, 58, "+", (0, "drop"))[0] == "7 + 8 = 15. 4 + 5 = 9. 47 + 58 = 95"
    assert worked.column_work(85, 47, "-", (0, "drop"))[0] == "15 - 7 = 8. 8 - 4 = 4. 85 - 47 = 48"
    assert worked.column_work(47, 58, "+", (1, "up"))[0] == "7 + 8 = 15, carry 1. 4 + 5 + 1 = 11, carry 1. 47 + 58 = 115"
    assert worked.column_slips(47, 58, "+") == [(0, "drop"), (0, "up"), (0, "down"), (1, "up"), (1, "down")]
    rng, kinds = random.Random(4), set()
    for _ in range(400):
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
        for op in "+-":
            a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
            right, value = worked.column_work(a, b, op)
            for column, how in worked.column_slips(a, b, op):
                text, result = worked.column_work(a, b, op, (column, how))
                assert read_slipped_column_work(text, a, op, b) == (column, result) and result != value >= 0
                assert text.split(". ")[:column] == right.split(". ")[:column]  # right up to the slip
                kinds.add(how)
    assert kinds == {"drop", "up", "down"}


def test_slipped_products_and_tallies():
    assert worked.product_work(347, 58, (0, 10))[0] == "347 * 58 = 347 * 8 + 347 * 50 = 2786 + 17350 = 20136"
    assert worked.product_slips(34, 7) == []  # one line: nothing to slip in
    for part, error in worked.product_slips(347, 58):
        text, result = worked.product_work(347, 58, (part, error))
        parts = [int(v) for v in text.split(" = ")[2].split(" + ")]
        assert result == sum(parts) != 347 * 58 and parts[part] - error == [2776, 17350][part]
        assert str(parts[part])[-1 - (part == 1):] == str([2776, 17350][part])[-1 - (part == 1):] or abs(error) >= 10 ** part
    assert worked.count_work("null", "u", 1) == "n u 0, u u 0, l u 0, l u 0"  # the match missed
    assert worked.count_work("null", "u", 0) == "n u 1, u u 2, l u 2, l u 2"  # a mismatch counted
    items = instruct.unique_items(lambda r: instruct.count_item(r, ["mississippi", "banana"], slip_pairs=3), 40, random.Random(5))
    for it in items:
        if it.question.startswith("How many times"):
            letter, word = re.findall(r'"([^"]*)"', it.question)
            word = word.replace(" ", "")
            assert len(it.slips) == 3 and len(set(it.slips)) == 3
            for slip in it.slips:
                walk, count = slip.rsplit(". ", 1)
                tallies = [int(step.split(" ")[2]) for step in walk.split(", ")]
                true = [word[:i + 1].count(letter) for i in range(len(word))]
                at = next(i for i, (t, u) in enumerate(zip(tallies, true)) if t != u)
                assert all(t - u == tallies[at] - true[at] in (-1, 1) for t, u in zip(tallies[at:], true[at:]))
                assert int(count) == tallies[-1] != int(it.answer)
        else:
            assert it.slips == ()  # words in a phrase are counted bare


def test_word_problem_slips_carry_into_the_next_step():
    items = instruct.unique_items(lambda r: instruct.wordprob_item(r, "+-", slip_pairs=2), 200, random.Random(6))
    two_step = [it for it in items if "takes away" in it.question]
    assert two_step and all(len(it.slips) == 2 for it in items)
    for it in two_step:
        a, b, c = (int(n) for n in re.findall(r"\d+", it.question))
        for slip in it.slips:
            lines = slip.split(". ")
            first = max(i for i, line in enumerate(lines) if re.fullmatch(rf"{a} \+ {b} = \d+", line))  # the step's own line
            total, result = int(lines[first].rsplit(" ", 1)[1]), int(slip.rsplit(" ", 1)[1])
            assert lines[-1] == f"{total} - {c} = {result}" and result != int(it.answer)  # works on what it wrote
            assert (total != a + b) != (result != total - c)  # one slip, in one of the two steps


def test_equivalent_problems_share_a_key_and_names_do_not_matter():
    r = random.Random(7)
    arith = {it.question: it.key for it in instruct.unique_items(lambda g: instruct.arith_item(g, 20, "+*-"), 250, r)}
    commuted = [q for q in arith if "-" not in q and "What is {2} {1} {0}?".format(*q[8:-1].split()) in arith]
    assert commuted and all(arith[q] == arith["What is {2} {1} {0}?".format(*q[8:-1].split())] for q in commuted)
    minus = instruct.arith_item(random.Random(0), 20, "-")
    assert minus.key == "expr:{}-{}".format(*re.findall(r"\d+", minus.question))  # a - b is not b - a
    wordprob = instruct.unique_items(lambda g: instruct.wordprob_item(g, "+-*"), 400, r)
    by_key: dict[str, set[str]] = {}
    for it in wordprob:
        by_key.setdefault(it.key, set()).add(it.question)
    renamed = [qs for qs in by_key.values() if len(qs) > 1]
    assert renamed  # the same numbers and operations asked about other people or things share a key
    shelf = instruct.wordprob_item(random.Random(0), "+-")
    assert shelf.key.startswith("expr:") and shelf.key.count("(") in (0, 1)
    count = instruct.unique_items(lambda g: instruct.count_item(g, ["banana"]), 30, r)
    assert {it.key for it in count if "letter" in it.question} <= {f"count:banana:{c}" for c in "abcdefghijklmnopqrstuvwxyz"}
    strings = instruct.unique_items(lambda g: instruct.string_item(g, ["banana", "python"]), 8, r)
    assert len(strings) == 8 and {it.key for it in strings} == {"string:banana", "string:python"}
    entries = [e for m in ("heapq", "json") for e in parse_pydoc(plain_text(m), f"http://127.0.0.1:8765/{m}.html")]
    docqa = {it.question: it.key for it in instruct.docqa_items(entries, random.Random(0))}
    assert docqa["What does heapq.heappush do?"] == docqa["What is the signature of heapq.heappush?"] \
        == docqa["Which module provides heappush?"] == "docqa:heapq:heappush" != docqa["What is the heapq module for?"]


def test_changing_one_held_out_share_leaves_the_other_split_alone():
    keys = [f"expr:{a}+{b}" for a in range(100) for b in range(a, 100)]
    base = {k: instruct.split_of(k, 0.1, 0.1) for k in keys}
    more_val = {k: instruct.split_of(k, 0.3, 0.1) for k in keys}
    more_test = {k: instruct.split_of(k, 0.1, 0.3) for k in keys}
    assert {k for k in keys if base[k] == "test"} == {k for k in keys if more_val[k] == "test"}
    assert {k for k in keys if base[k] == "val"} == {k for k in keys if more_test[k] == "val"}
    assert 0.07 < sum(s == "test" for s in base.values()) / len(keys) < 0.13


# -- docqa on real pydoc text ---------------------------------------------------------------------------


@pytest.mark.parametrize("render", [plain_text, html_text], ids=["plaintext", "html_extracted"])
def test_docqa_reads_functions_classes_and_module_of_json(render):
    entries = {(e.kind, e.name): e for e in parse_pydoc(render("json"), "http://127.0.0.1:8765/json.html", "Python: package json")}
    assert entries[("function", "dumps")].summary == "Serialize ``obj`` to a JSON formatted ``str``."
    assert entries[("function", "dumps")].signature.startswith("(obj, *, skipkeys=False, ensure_ascii=True")
    assert entries[("function", "loads")].summary.startswith("Deserialize ``s`` (a ``str``, ``bytes`` or ``bytearray`` instance")
    assert entries[("class", "JSONEncoder")].summary == "Extensible JSON <https://json.org> encoder for Python data structures."
    assert entries[("module", "")].summary.startswith("JSON (JavaScript Object Notation) <https://json.org> is a subset")
    assert {e.module for e in entries.values()} == {"json"}
    # mentions in prose ("``default(obj)`` is a function ...") are not entries
    assert ("function", "default") not in entries


@pytest.mark.parametrize("module", ["heapq", "textwrap", "os.path"])
def test_docqa_plaintext_and_extracted_html_agree(module):
    url = f"http://127.0.0.1:8765/{module}.html"
    plain = {(e.kind, e.name) for e in parse_pydoc(plain_text(module), url)}
    html = {(e.kind, e.name) for e in parse_pydoc(html_text(module), url)}
    assert plain == html and len(plain) >= 6


def test_docqa_lines_of_class_documentation_do_not_end_the_section():
    # typing's plain text has class documentation lines " |  name" (a section name in lower case)
    entries = {(e.kind, e.name) for e in parse_pydoc(plain_text("typing"), "http://127.0.0.1:8765/typing.html")}
    assert {("class", "Protocol"), ("class", "TypeVar"), ("function", "cast")} <= entries


def test_docqa_first_sentences_and_questions_of_heapq():
    entries = parse_pydoc(plain_text("heapq"), "http://127.0.0.1:8765/heapq.html")
    by_name = {e.name: e for e in entries}
    assert by_name[""].summary == "Heap queue algorithm (a.k.a. priority queue)."  # "a.k.a." does not end it
    assert by_name["heappush"].summary == "Push item onto heap, maintaining the heap invariant."
    qas = {qa.question: qa for qa in questions(entries)}
    assert qas["What does heapq.heappush do?"].answer == "Push item onto heap, maintaining the heap invariant."
    assert qas["What is the signature of heapq.heappush?"].answer == "heapq.heappush(heap, item, /)"
    assert qas["Which module provides heappush?"].answer == "heapq" and qas["Which module provides heappush?"].exact
    assert qas["What is the heapq module for?"].answer == "Heap queue algorithm (a.k.a. priority queue)."


def test_which_module_only_for_names_one_module_defines():
    entries = parse_pydoc(plain_text("json"), "/json.html") + parse_pydoc(plain_text("pickle"), "/pickle.html")
    asked = {qa.question for qa in questions(entries)}
    assert "Which module provides dumps?" not in asked  # json.dumps and pickle.dumps
    assert "Which module provides JSONEncoder?" in asked


def test_pages_that_are_not_module_docs_give_nothing():
    assert module_name("https://example.org/news.html", "News of the day", "Some article. | a | b |") is None
    assert parse_pydoc("Python topic text", "http://127.0.0.1:8765/topic-if.html", "Python topic: if") == []


# -- the stage ------------------------------------------------------------------------------------------


def test_stage_writes_all_tasks_with_disjoint_splits(tmp_path, corpus):
    result, rows = run_stage(tmp_path, corpus)
    tasks = {r["task"] for r in rows["chat"]}
    assert tasks == {"docqa", "arith", "count", "string", "wordprob"}
    for kind, kind_rows in rows.items():
        by_split = {s: [r for r in kind_rows if r["split"] == s] for s in instruct.SPLITS}
        assert sum(map(len, by_split.values())) == len(kind_rows) and by_split["val"] and by_split["test"], kind
        assert len({r["id"] for r in kind_rows}) == len(kind_rows)
        assert all(result.metrics[f"{kind}_{s}"] == len(by_split[s]) for s in instruct.SPLITS)
        assert all(r["key"] for r in kind_rows)
        # every task's held-out problems are in both held-out sets (docqa's prompts: its exact questions only)
        assert {r["task"] for r in by_split["test"]} == {r["task"] for r in by_split["val"]} == {r["task"] for r in kind_rows}
    # no prompt text is in two splits, across all three outputs
    keys = {s: set() for s in instruct.SPLITS}
    for kind, kind_rows in rows.items():
        for r in kind_rows:
            keys[r["split"]].add(instruct.prompt_key(instruct.row_prompt(r, kind)))
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    total = sum(map(len, keys.values()))
    assert 0.07 < len(keys["val"]) / total < 0.25 and 0.07 < len(keys["test"]) / total < 0.25  # 0.15 each
    assert {row["task"]: sum(row[f"chat_{s}"] for s in instruct.SPLITS) for row in result.tables["tasks"]}["arith"] == 200


def test_stage_rows_are_consistent(tmp_path, corpus):
    result, rows = run_stage(tmp_path, corpus)
    # each worked item's prefs: its near miss and its slip, with one prompt, chosen reply, key and split
    by_prompt: dict[str, list[dict]] = {}
    for r in rows["prefs"]:
        by_prompt.setdefault(instruct.prompt_key(r["prompt"]), []).append(r)
    slipped = [group for group in by_prompt.values() if len(group) > 1]
    assert len(slipped) == result.metrics["slip_pairs"] > 100
    assert {r["kind"] for r in rows["prefs"]} == {"near_miss", "slip"}
    for group in slipped:
        assert sorted(r["kind"] for r in group) == ["near_miss", "slip"] and group[0]["task"] in ("arith", "count", "wordprob")
        assert len({(json.dumps(r["chosen"]), r["key"], r["split"]) for r in group}) == 1
    for p in rows["prompts"]:
        assert p["verifier"] in ("numeric", "exact", "exact_case") and p["answer"]
    chat_reply = {instruct.prompt_key(r["messages"][:-1]): r["messages"][-1]["content"] for r in rows["chat"]}
    for p in rows["prompts"]:  # the chat reply of each prompt is graded correct
        assert verify(p["verifier"], chat_reply[instruct.prompt_key(p["prompt"])], p["answer"])
    for r in rows["prefs"]:
        assert r["chosen"] != r["rejected"] and r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
    docqa = [r["messages"] for r in rows["chat"] if r["task"] == "docqa"]
    assert [{"role": "user", "content": "What does json.dumps do?"},
            {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."}] in docqa


def problem(task: str, question: str, reference: str) -> tuple:
    """What a question asks, read back from its text alone (not from the stage's keys): the same
    problem with commuted operands, other names or objects, another question about the same word or
    docqa entry gives the same value."""
    quoted = [q.replace(" ", "") for q in re.findall(r'"([^"]*)"', question)]
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if task == "arith":
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        return ("expr", op, *(sorted((int(a), int(b))) if op in "+*" else (int(a), int(b))))
    if task == "wordprob":  # the templates' numbers, in the order the questions state them
        for phrase, op in (("takes away", "+-"), ("gets", "+"), ("gives", "-"), ("shares", "/"), ("boxes", "*"), ("reads", "*")):
            if phrase in question:
                if op == "+-":
                    return ("expr", op, *sorted(numbers[:2]), numbers[2])
                return ("expr", op, *(sorted(numbers) if op in "+*" else numbers))
    if task == "count":
        return ("count", *quoted) if question.startswith("How many times") else ("words", question)
    if task == "string":
        return ("string", quoted[0])
    if task == "docqa":  # the entry asked about: "json.dumps", or the module "json"
        for pattern in (r"What does (\S+) do\?", r"What is the signature of (\S+)\?", r"What is the (\S+) module for\?",
                        r"What is (\S+)\?"):
            if m := re.fullmatch(pattern, question):
                return ("docqa", m[1])
        name = re.fullmatch(r"Which module provides (\S+)\?", question)[1]
        return ("docqa", f"{reference}.{name}")
    raise AssertionError(question)


def test_real_output_test_split_shares_no_prompt_and_no_problem_with_any_train_set(tmp_path, corpus):
    """On the stage's own output: no test prompt is a prompt of SFT chat, prefs or RL prompts train rows,
    and no test problem (read back from the question text) is one of theirs; small operands and RL
    problems make commuted and renamed repeats common, so the check is not vacuous."""
    result, rows = run_stage(tmp_path, corpus, arith_max=20, rl_per_task=100)
    reference = {instruct.prompt_key(r["messages"][:-1]): r["messages"][-1]["content"] for r in rows["chat"]}
    prompts: dict[str, set] = {s: set() for s in instruct.SPLITS}
    problems: dict[tuple, set[str]] = {}
    wordings: dict[tuple, set[str]] = {}
    for kind, kind_rows in rows.items():
        for r in kind_rows:
            prompt = instruct.row_prompt(r, kind)
            question = prompt[0]["content"]
            answer = reference.get(instruct.prompt_key(prompt)) or r.get("answer")
            prompts[r["split"]].add(instruct.prompt_key(prompt))
            key = problem(r["task"], question, answer)
            problems.setdefault(key, set()).add(r["split"])
            wordings.setdefault(key, set()).add(question)
    assert prompts["test"] and not prompts["test"] & prompts["train"] and not prompts["val"] & prompts["train"]
    assert not prompts["test"] & prompts["val"]
    assert all(len(splits) == 1 for splits in problems.values()), [k for k, v in problems.items() if len(v) > 1][:5]
    repeated = Counter(k[0] for k, qs in wordings.items() if len(qs) > 1)
    assert repeated["expr"] > 20 and repeated["string"] > 5 and repeated["docqa"] > 20, repeated
    assert sum("test" in splits for k, splits in problems.items() if len(wordings[k]) > 1) > 5
    # the stage's own figures agree, and it reports what does overlap: 13-grams, docqa against the corpus
    for split in ("val", "test"):
        assert result.metrics[f"decontam/{split}_exact_overlap"] == 0 == result.metrics[f"decontam/{split}_key_overlap"]
    table = {(r["split"], r["task"], r["train_set"]): r for r in result.tables["decontam"]}
    assert {t for _, t, _ in table} == {"arith", "count", "docqa", "string", "wordprob"}
    assert all(r["exact"] == r["key"] == 0 for r in table.values() if r["train_set"] != "corpus")
    assert table[("test", "docqa", "corpus")]["ngram13"] > 0 == table[("test", "arith", "corpus")]["ngram13"]
    assert 0 < result.metrics["decontam/test_13gram_overlap/corpus"] < 1
    # no train preference pair rejects a held-out docqa question's answer (it would push that answer down)
    held = {r["chosen"][-1]["content"] for r in rows["prefs"] if r["task"] == "docqa" and r["split"] != "train"}
    rejected = [r["rejected"][-1]["content"] for r in rows["prefs"] if r["task"] == "docqa" and r["split"] == "train"]
    assert held and rejected and not held & set(rejected)


def test_stage_is_deterministic_and_held_out_prompts_do_not_depend_on_seed(tmp_path, corpus):
    _, a = run_stage(tmp_path / "a", corpus)
    _, b = run_stage(tmp_path / "b", corpus)
    assert a == b
    _, c = run_stage(tmp_path / "c", corpus, seed=1)
    split_a = {r["messages"][0]["content"]: r["split"] for r in a["chat"]}
    shared = [r for r in c["chat"] if r["messages"][0]["content"] in split_a]
    assert shared and all(split_a[r["messages"][0]["content"]] == r["split"] for r in shared)


def test_rl_problems_are_new_and_are_the_only_train_prompts(tmp_path, corpus):
    result, rows = run_stage(tmp_path / "rl", corpus, rl_per_task=50)
    _, plain = run_stage(tmp_path / "plain", corpus)
    assert rows["chat"] == plain["chat"] and rows["prefs"] == plain["prefs"]  # SFT and DPO data unchanged
    chat_questions = {r["messages"][0]["content"] for r in rows["chat"]}
    train = [r for r in rows["prompts"] if r["split"] == "train"]
    held = [r for r in rows["prompts"] if r["split"] != "train"]
    # GRPO practises on problems SFT never saw: 50 per generated task, less those held out
    docqa = [r for r in train if r["task"] == "docqa"]  # no generator: keeps its train prompts
    assert docqa == [r for r in plain["prompts"] if r["split"] == "train" and r["task"] == "docqa"] and docqa
    train = [r for r in train if r["task"] != "docqa"]
    assert train and not {r["prompt"][0]["content"] for r in train} & chat_questions
    assert {r["task"] for r in train} == {"arith", "count", "string", "wordprob"}
    assert result.metrics["rl_problems"] == 200 and 110 < len(train) < 190  # val_frac + test_frac = 0.3
    # the held-out prompts of the SFT items are all still there, in the same split, with the RL problems held out
    plain_held = [r for r in plain["prompts"] if r["split"] != "train"]
    assert {(r["id"], r["split"]) for r in plain_held} < {(r["id"], r["split"]) for r in held}
    assert len(held) - len(plain_held) == 200 - len(train)
    for r in train + held:
        assert r["verifier"] in ("numeric", "exact", "exact_case") and r["answer"]
    for r in train:
        if r["task"] == "arith":  # "What is 47 + 58?" -> "105"
            a, op, b = r["prompt"][0]["content"].removeprefix("What is ").removesuffix("?").split()
            assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b) if op == "-" else int(a) * int(b))


def test_user_files_are_appended_and_split(tmp_path, corpus, shared_data):
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
                               "split": "val"}) + "\n")
    result, rows = run_stage(tmp_path / "run", corpus, n_arith=0, n_count=0, n_string=0, n_wordprob=0, max_docqa=0,
                             chat_files=(str(shared_data / "alpaca/seed_tasks.jsonl"), f"{own}::messages"),
                             prompts_files=(str(shared_data / "gsm8k/train.first2000.jsonl"),),
                             prefs_files=(str(shared_data / "hh_rlhf/harmless-base_test.part1of2.jsonl.gz"),),
                             on_error="skip", max_skips=5)
    assert len(rows["prompts"]) == 2000 and {r["task"] for r in rows["prompts"]} == {"gsm8k"}
    assert len(rows["prefs"]) == 1153 and result.metrics["import_skipped"] == 3
    assert [r["split"] for r in rows["chat"] if r["source"] == "own.jsonl"] == ["val"]  # its own split kept
    assert {r["source"] for r in rows["chat"]} == {"seed_tasks.jsonl", "own.jsonl"}
    assert {s["format"] for s in result.tables["imports"]} == {"alpaca_seed", "messages", "gsm8k", "hh_rlhf"}
    assert 0 < result.metrics["prompts_val"] < 400


def test_user_val_prompt_that_is_also_in_train_moves_to_train(tmp_path, corpus):
    question = "What is 2 + 2?"
    both = tmp_path / "both.jsonl"
    both.write_text("".join(json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": a}],
                                        "split": s}) + "\n" for a, s in (("4", "train"), ("four", "val"))))
    result, rows = run_stage(tmp_path / "run", corpus, chat_files=(str(both),))
    assert [r["split"] for r in rows["chat"] if r["messages"][0]["content"] == question] == ["train", "train"]
    assert result.metrics["moved_to_train"] == 1


def test_bad_user_file_fails_with_file_and_line(tmp_path, corpus):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a\\n#### 1"}\n{"question": "q", "answer": "none"}\n')
    with pytest.raises(StageError) as e:
        run_stage(tmp_path / "run", corpus, prompts_files=(str(bad),))
    assert str(e.value) == (f"instruct: prompts_files: {bad}:2: gsm8k answer has no '#### N' line; "
                            "fix the record or set on_error='skip'")
    assert not (tmp_path / "run" / "out" / "chat").exists()  # nothing half-written


def test_user_file_of_the_wrong_kind_says_what_to_do(tmp_path, corpus, shared_data):
    hh = shared_data / "hh_rlhf/harmless-base_test.part1of2.jsonl.gz"
    with pytest.raises(StageError) as e:
        run_stage(tmp_path / "run", corpus, prompts_files=(str(hh),))
    assert str(e.value) == (f"instruct: prompts_files: {hh}: format hh_rlhf gives prefs or chat rows, not prompts; "
                            "check the path and name its format as PATH::FORMAT (see stages/chat/importers.py)")


def test_config_is_checked(tmp_path, corpus):
    with pytest.raises(StageError, match="val_frac and test_frac must be >= 0 with a sum below 1"):
        run_stage(tmp_path, corpus, val_frac=0.6, test_frac=0.4)
    with pytest.raises(StageError, match="n_arith must be >= 0"):
        run_stage(tmp_path, corpus, n_arith=-1)


def test_preference_problems_are_new_and_are_the_only_train_pairs(tmp_path, corpus):
    """pref_per_task draws further problems whose pairs replace the SFT items' train pairs: the reward
    model and DPO then rank replies to problems SFT never trained on (no question and no equivalence key
    of a chat train row), while every held-out pair of the SFT items stays where it was."""
    result, rows = run_stage(tmp_path / "pref", corpus, pref_per_task=40)
    _, plain = run_stage(tmp_path / "plain", corpus)
    assert rows["chat"] == plain["chat"]  # SFT data unchanged
    chat_train = [r for r in rows["chat"] if r["split"] == "train"]
    questions, keys = {r["messages"][0]["content"] for r in chat_train}, {r["key"] for r in chat_train}
    train = [r for r in rows["prefs"] if r["split"] == "train" and r["task"] != "docqa"]
    assert {r["task"] for r in train} == {"arith", "count", "string", "wordprob"}
    assert not {r["prompt"][0]["content"] for r in train} & questions and not {r["key"] for r in train} & keys
    assert {r["kind"] for r in train} == {"near_miss", "slip"} and 100 < result.metrics["pref_problems"] <= 160
    docqa = [r for r in rows["prefs"] if r["split"] == "train" and r["task"] == "docqa"]  # no generator: kept
    assert docqa == [r for r in plain["prefs"] if r["split"] == "train" and r["task"] == "docqa"] and docqa
    held = {(r["id"], r["split"]) for r in rows["prefs"] if r["split"] != "train"}
    assert {(r["id"], r["split"]) for r in plain["prefs"] if r["split"] != "train"} < held
    for split in ("val", "test"):
        assert result.metrics[f"decontam/{split}_exact_overlap"] == 0 == result.metrics[f"decontam/{split}_key_overlap"]


def test_open_book_docqa_rows_are_chat_only_with_the_entrys_passage_in_the_rag_form(tmp_path, corpus):
    from stages.chat.docqa import context_prompt

    _, closed = run_stage(tmp_path / "closed", corpus)
    _, both = run_stage(tmp_path / "open", corpus, docqa_open_book=1.0, open_book_passages=2)
    user = lambda r: r["messages"][0]["content"]  # noqa: E731
    opened = [r for r in both["chat"] if r["task"] == "docqa" and user(r).startswith("[1] ")]
    closed_docqa = {user(r): r for r in closed["chat"] if r["task"] == "docqa"}
    assert len(opened) == len(closed_docqa) > 0  # share 1.0: every docqa item once more, open-book
    assert len(both["prefs"]) == len(closed["prefs"]) and len(both["prompts"]) == len(closed["prompts"])
    for r in opened:
        question = user(r).rsplit("\n\nQuestion: ", 1)[1]
        twin = closed_docqa[question]  # the closed-book row of the same item: same reply, key and split
        assert r["messages"][1:] == twin["messages"][1:] and r["key"] == twin["key"] and r["split"] == twin["split"]
        parts = user(r).rsplit("\n\nQuestion: ", 1)[0].split("\n\n")
        assert [p[:4] for p in parts] == ["[1] ", "[2] "] and user(r) == context_prompt(question, parts)
        module, _, name = twin["key"].removeprefix("docqa:").partition(":")
        own = f"{module}.{name}" if name else module
        assert any(p.split("\n", 1)[0] == f"[{i + 1}] {own}" for i, p in enumerate(parts)), (own, parts)

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
from pathlib import Path

import pytest
import trafilatura

from stages import instruct
from stages.chat.docqa import module_name, parse_pydoc, questions
from stages.chat.verifiers import verify
from stages.contract import StageError
from storage.parquet import read_table, write_table
from tests.conftest import artifact, make_ctx

SMALL = dict(n_arith=200, n_count=100, n_string=100, n_wordprob=100, max_docqa=500, heldout_frac=0.2, rl_per_task=0)


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
    make = {"arith": instruct.arith_item, "wordprob": instruct.wordprob_item,
            "count": lambda r: instruct.count_item(r, list(words)), "string": lambda r: instruct.string_item(r, list(words))}[task]
    items = instruct.unique_items(make, 150, random.Random(0))  # 40 words x 4 string operations = 160 questions
    assert len(items) == 150 and len({it.question for it in items}) == 150
    for it in items:
        assert it.task == task and it.verifier in ("numeric", "exact", "exact_case")
        assert verify(it.verifier, it.reply, it.answer), it
        assert not verify(it.verifier, it.rejected, it.answer), it


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
    assert instruct.count_work("null", "u") == "n u 0, u u 1, l u 1, l u 1"
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
    assert instruct.column_work(47, 58, "+")[0] == "7 + 8 = 15, carry 1. 4 + 5 + 1 = 10, carry 1. 47 + 58 = 105"
    assert instruct.column_work(85, 47, "-")[0] == "15 - 7 = 8, borrow 1. 8 - 1 - 4 = 3. 85 - 47 = 38"
    assert instruct.column_work(305, 47, "-")[0] == ("15 - 7 = 8, borrow 1. 10 - 1 - 4 = 5, borrow 1. 3 - 1 - 0 = 2. "
                                                    "305 - 47 = 258")
    assert instruct.product_work(347, 58)[0] == "347 * 58 = 347 * 8 + 347 * 50 = 2776 + 17350 = 20126"
    assert instruct.product_work(34, 7)[0] == "34 * 7 = 238"
    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        assert check_column_work(instruct.column_work(a, b, "+")[0], a, "+", b) == a + b
        a, b = max(a, b), min(a, b)
        assert check_column_work(instruct.column_work(a, b, "-")[0], a, "-", b) == a - b


def test_worked_rejected_replies_differ_only_in_the_result():
    """A rejected worked reply is the right work with a near-miss result: no token after a mistake."""
    rng = random.Random(2)
    for _ in range(500):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        a, b = max(a, b), min(a, b)
        for op in "+-*":
            right, value = instruct.work(a, op, b, worked=True)
            wrong, result = instruct.work(a, op, b, worked=True, rng=rng)
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
        train = [r for r in kind_rows if r["split"] == "train"]
        val = [r for r in kind_rows if r["split"] == "val"]
        assert len(train) + len(val) == len(kind_rows) and val, kind
        assert not {r["id"] for r in train} & {r["id"] for r in val}
        assert len({r["id"] for r in kind_rows}) == len(kind_rows)
        assert result.metrics[f"{kind}_train"] == len(train) and result.metrics[f"{kind}_val"] == len(val)
    # no prompt text is in both splits, across all three outputs
    keys = {"train": set(), "val": set()}
    for kind, kind_rows in rows.items():
        for r in kind_rows:
            keys[r["split"]].add(instruct.prompt_key(instruct.row_prompt(r, kind)))
    assert not keys["train"] & keys["val"]
    assert 0.1 < len(keys["val"]) / (len(keys["train"]) + len(keys["val"])) < 0.3  # heldout_frac 0.2
    assert {row["task"]: row["chat_train"] + row["chat_val"] for row in result.tables["tasks"]}["arith"] == 200


def test_stage_rows_are_consistent(tmp_path, corpus):
    _, rows = run_stage(tmp_path, corpus)
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
    val = [r for r in rows["prompts"] if r["split"] == "val"]
    # GRPO practises on problems SFT never saw: 50 per generated task, less those held out
    docqa = [r for r in train if r["task"] == "docqa"]  # no generator: keeps its train prompts
    assert docqa == [r for r in plain["prompts"] if r["split"] == "train" and r["task"] == "docqa"] and docqa
    train = [r for r in train if r["task"] != "docqa"]
    assert train and not {r["prompt"][0]["content"] for r in train} & chat_questions
    assert {r["task"] for r in train} == {"arith", "count", "string", "wordprob"}
    assert result.metrics["rl_problems"] == 200 and 150 < len(train) < 200
    # the held-out prompts of the SFT items are all still there, with the RL problems that hashed to val
    plain_val = [r for r in plain["prompts"] if r["split"] == "val"]
    assert {r["id"] for r in plain_val} < {r["id"] for r in val}
    assert len(val) - len(plain_val) == 200 - len(train)
    for r in train + val:
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
    with pytest.raises(StageError, match="heldout_frac must be in"):
        run_stage(tmp_path, corpus, heldout_frac=1.5)
    with pytest.raises(StageError, match="n_arith must be >= 0"):
        run_stage(tmp_path, corpus, n_arith=-1)

"""Importers: every real file in shared/data, crafted TRL/sharegpt/alpaca files, and malformed records."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from stages.chat.importers import DataImportError, detect_format, import_file, parse_spec, read_records
from stages.chat.verifiers import verify
from storage.parquet import write_table

GSM8K = "gsm8k/train.first2000.jsonl"
HH = "hh_rlhf/harmless-base_test.part1of2.jsonl.gz"
ALPACA_SEED = "alpaca/seed_tasks.jsonl"


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# -- real files ---------------------------------------------------------------------------------------


def test_gsm8k_prompts_have_the_final_number_and_a_numeric_verifier(shared_data):
    rows, stats = import_file(shared_data / GSM8K)
    assert stats == {"format": "gsm8k", "kind": "prompts", "records": 2000, "rows": 2000, "skipped": 0, "skip_reasons": {}}
    originals = [json.loads(line) for line in (shared_data / GSM8K).read_text().splitlines()]
    for row, rec in zip(rows, originals):
        assert row["answer"] == rec["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert row["verifier"] == "numeric" and row["task"] == "gsm8k" and row["split"] is None
        assert row["prompt"] == [user(rec["question"].strip())]
    assert rows[0]["answer"] == "72"


def test_gsm8k_chat_keeps_the_worked_answer_without_calculator_annotations(shared_data):
    chat, _ = import_file(shared_data / GSM8K, "chat")
    prompts, _ = import_file(shared_data / GSM8K, "prompts")
    assert len(chat) == 2000
    assert chat[0]["messages"][1]["content"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                                "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
    assert not any("<<" in r["messages"][1]["content"] for r in chat)
    # the worked answer is graded correct by the verifier its prompt carries
    assert all(verify(p["verifier"], c["messages"][1]["content"], p["answer"]) for c, p in zip(chat, prompts))


def test_hh_rlhf_splits_each_pair_into_shared_prompt_and_final_replies(shared_data):
    rows, stats = import_file(shared_data / HH, on_error="skip")
    # three records end in an empty chosen reply ("\n\nAssistant: "): not a usable preference
    assert stats["records"] == 1156 and stats["rows"] == 1153
    assert stats["skip_reasons"] == {"chosen has an empty final Assistant turn": 3}
    with gzip.open(shared_data / HH, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    row = rows[0]
    assert row["prompt"][0] == user("what are some pranks with a pen i can do?")
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert row["chosen"] == [assistant(first["chosen"].rsplit("\n\nAssistant: ", 1)[1].strip())]
    assert row["rejected"] == [assistant(first["rejected"].rsplit("\n\nAssistant: ", 1)[1].strip())]
    for r in rows:  # every pair: prompt ends with the human, replies are one non-empty assistant turn each
        assert r["prompt"][-1]["role"] == "user" and r["prompt"][0]["role"] == "user"
        assert len(r["chosen"]) == len(r["rejected"]) == 1 and r["chosen"][0]["content"] and r["rejected"][0]["content"]


def test_hh_rlhf_raises_with_file_and_line_of_the_empty_reply(shared_data):
    with pytest.raises(DataImportError) as e:
        import_file(shared_data / HH)
    assert str(e.value) == f"{shared_data / HH}:87: chosen has an empty final Assistant turn"
    assert "\n" not in str(e.value)


def test_hh_rlhf_as_chat_is_the_chosen_dialogue(shared_data):
    rows, _ = import_file(shared_data / HH, "chat", on_error="skip")
    prefs, _ = import_file(shared_data / HH, "prefs", on_error="skip")
    assert len(rows) == 1153
    assert all(c["messages"] == p["prompt"] + p["chosen"] for c, p in zip(rows, prefs))


def test_alpaca_seed_tasks_give_one_chat_row_per_instance(shared_data):
    rows, stats = import_file(shared_data / ALPACA_SEED)
    records = [json.loads(line) for line in (shared_data / ALPACA_SEED).read_text().splitlines()]
    assert stats["format"] == "alpaca_seed" and stats["records"] == 175 and stats["skipped"] == 0
    assert len(rows) == sum(len(r["instances"]) for r in records)
    assert rows[1]["messages"] == [user("What is the relation between the given pairs?\n\nNight : Day :: Right : Left"),
                                   assistant("The relation between the given pairs is that they are opposites.")]
    assert rows[0]["messages"][0]["content"] == records[0]["instruction"]  # empty input: the instruction alone
    assert {r["task"] for r in rows} == {"alpaca"}


def test_formats_of_the_real_files_are_detected(shared_data):
    firsts = {name: next(read_records(shared_data / name))[1] for name in (GSM8K, HH, ALPACA_SEED)}
    assert {name: detect_format(rec) for name, rec in firsts.items()} == {GSM8K: "gsm8k", HH: "hh_rlhf", ALPACA_SEED: "alpaca_seed"}


# -- crafted files in the other formats ----------------------------------------------------------------


def test_trl_conversational_messages(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello."), user("2+2?"), assistant("4")]},
        {"messages": [user("Name a color."), assistant("Blue.")], "split": "test"},
    ])
    rows, stats = import_file(path)
    assert stats["format"] == "messages" and stats["kind"] == "chat"
    assert rows[0]["messages"][-1] == assistant("4") and rows[0]["task"] == "chat" and rows[0]["split"] is None
    assert rows[1]["split"] == "test"  # the record's own split is kept
    assert rows[0]["source"] == "chat.jsonl" and rows[0]["id"].startswith("chat.jsonl:")


def test_trl_preference_formats_conversational_standard_and_implicit(tmp_path):
    conversational = tmp_path / "prefs.json"
    conversational.write_text(json.dumps([{"prompt": [user("Capital of France?")], "chosen": [assistant("Paris.")],
                                           "rejected": [assistant("Lyon.")]}]))
    standard = write_table([{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}], tmp_path / "prefs.parquet",
                           pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())]))
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]}])
    (conv,), _ = import_file(conversational)
    (std,), _ = import_file(standard)
    (imp,), st = import_file(implicit)
    assert st["format"] == "trl_prefs"
    assert conv["prompt"] == [user("Capital of France?")] and conv["chosen"] == [assistant("Paris.")]
    assert std["prompt"] == [user("The sky is")] and std["chosen"] == [assistant("blue.")] and std["rejected"] == [assistant("green.")]
    assert imp["prompt"] == [user("Hi")] and imp["rejected"] == [assistant("Go away.")]
    (chat,), _ = import_file(conversational, "chat")  # SFT on the chosen replies
    assert chat["messages"] == [user("Capital of France?"), assistant("Paris.")]


def test_trl_prompt_completion_strings_and_lists_gzipped(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl.gz", [
        {"prompt": "Say hi.", "completion": "Hi!"},
        {"prompt": [user("Count to 3.")], "completion": [assistant("1 2 3")]},
    ], gz=True)
    rows, stats = import_file(path)
    assert stats["format"] == "trl_completion"
    assert [r["messages"] for r in rows] == [[user("Say hi."), assistant("Hi!")], [user("Count to 3."), assistant("1 2 3")]]


def test_sharegpt_roles_are_mapped(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "system", "value": "You are terse."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    (row,), stats = import_file(path)
    assert stats["format"] == "sharegpt" and row["task"] == "sharegpt"
    assert row["messages"] == [{"role": "system", "content": "You are terse."}, user("Hi"), assistant("Hello")]


def test_alpaca_52k_json_list(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                {"instruction": "Say hello.", "input": "", "output": "Hello"}], indent=4))
    rows, stats = import_file(path)
    assert stats["format"] == "alpaca"
    assert rows[0]["messages"] == [user("Add the numbers.\n\n2 and 3"), assistant("5")]
    assert rows[1]["messages"][0] == user("Say hello.")


def test_prompt_answer_prompts_with_verifier(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+3?", "answer": 5, "verifier": "numeric"},
                                              {"prompt": "Capital of Peru?", "solution": "Lima"}])
    rows, stats = import_file(path, "prompts")
    assert stats["format"] == "prompt_answer"
    assert [(r["answer"], r["verifier"]) for r in rows] == [("5", "numeric"), ("Lima", "exact")]


def test_explicit_format_and_path_spec(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    assert parse_spec(f"{path}::gsm8k") == (str(path), "gsm8k")
    assert parse_spec(str(path)) == (str(path), None)
    rows, stats = import_file(path, "chat", fmt="gsm8k", source="mine")
    assert stats["format"] == "gsm8k" and rows[0]["source"] == "mine"


# -- malformed records ---------------------------------------------------------------------------------


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a\n#### 1"}, '{"question": "q2", "answer": '])
    with pytest.raises(DataImportError, match=re.escape(f"{path}:2: not valid JSON")):
        import_file(path)


def test_gsm8k_record_without_final_answer_names_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a\n#### 1"}] * 16 + [{"question": "q", "answer": "no final line"}])
    with pytest.raises(DataImportError) as e:
        import_file(path)
    assert str(e.value) == f"{path}:17: gsm8k answer has no '#### N' line"


def test_missing_field_and_bad_role_name_their_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x", "output": None}])
    with pytest.raises(DataImportError, match=re.escape(f"{path}:2: missing field 'output'")):
        import_file(path)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "robot", "content": "x"}, assistant("y")]}])
    with pytest.raises(DataImportError, match=re.escape(f"{path}:1: messages[0] has role 'robot'")):
        import_file(path)


def test_skips_are_counted_by_reason_up_to_max_skips(tmp_path):
    good = {"question": "q", "answer": "a\n#### 1"}
    path = write_jsonl(tmp_path / "t.jsonl", [good, "not json", {"question": "q"}, good, {"question": "q", "answer": "#### x"}])
    rows, stats = import_file(path, on_error="skip")
    assert stats["rows"] == 2 and stats["skipped"] == 3
    assert set(stats["skip_reasons"]) == {"not valid JSON (Expecting value at column 1)", "missing field 'answer'",
                                          "gsm8k final answer 'x' is not a number"}
    with pytest.raises(DataImportError, match=re.escape(f"{path}:3: more than 1 bad records")):
        import_file(path, on_error="skip", max_skips=1)


def test_undetectable_and_unsupported_kind_are_one_line_errors(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}])
    with pytest.raises(DataImportError, match=re.escape(f"{path}:1: cannot tell the format from keys (foo)")):
        import_file(path)
    alpaca = write_jsonl(tmp_path / "al.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataImportError, match="format alpaca gives chat rows, not prefs"):
        import_file(alpaca, "prefs")
    with pytest.raises(DataImportError, match="unknown file type"):
        import_file(write_jsonl(tmp_path / "x.csv", [{"a": 1}]))

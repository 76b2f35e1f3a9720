"""Importers: the instruction-data formats people have -> rows of the `chat`, `prefs`, `prompts` schemas.

    fmt             record                                                gives
    messages        TRL conversational: {"messages": [{role, content}]}  chat
    trl_completion  TRL prompt-completion: {"prompt", "completion"} as   chat
                    strings (standard) or message lists (conversational)
    trl_prefs       TRL preference: {"prompt", "chosen", "rejected"} as  prefs, chat (prompt + chosen)
                    strings or message lists; without "prompt" (implicit
                    prompt) the shared leading turns are the prompt
    alpaca          {"instruction", "input", "output"} (Stanford Alpaca) chat
    alpaca_seed     {"instruction", "instances": [{input, output}]}      chat, one row per instance
                    (Alpaca / Self-Instruct seed_tasks.jsonl)
    sharegpt        {"conversations": [{"from", "value"}]}               chat
    gsm8k           {"question", "answer"} with a final "#### N" line    prompts (answer N, numeric), chat
    hh_rlhf         {"chosen", "rejected"} transcripts of "\\n\\nHuman:" /  prefs, chat (the chosen dialogue)
                    "\\n\\nAssistant:" turns (Anthropic HH-RLHF)
    prompt_answer   {"prompt", "answer"|"solution"|"ground_truth"} with   prompts
                    optional "verifier" (default exact), "task"

Files: .jsonl, .json (a list of records), either gzipped (.gz), or .parquet. The format is detected
from the keys of the first record unless given. Every record first becomes an `Example` (prompt
turns, reply turns, optional rejected reply / reference answer); the requested kind is a projection
of it. A record's own "split" field ("train", "val"/"validation", "test"/"heldout") is kept; otherwise the
split is left empty for the caller to assign.

A bad record raises DataImportError with one line naming the file, the line (or record number) and
what is wrong: "train.jsonl:17: gsm8k answer has no '#### N' line". With on_error="skip" it is counted
by reason instead, up to `max_skips`.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from stages.chat.verifiers import VERIFIERS, parse_number

Kind = Literal["chat", "prefs", "prompts"]
Message = dict[str, str]
ROLES = frozenset({"system", "user", "assistant", "tool"})
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "heldout": "test"}
GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")
GSM8K_CALC = re.compile(r"<<[^<>]*>>")  # calculator annotations: "48/2 = <<48/2=24>>24"
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


class DataImportError(ValueError):
    """A file or record that cannot be imported; the message is one line: "<file>:<line>: <what>".
    `line` is the bad record's line (or record number); None when the whole file is at fault."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


class RecordError(ValueError):
    """What is wrong with one record (the caller adds file and line)."""


@dataclass
class Example:
    """One record, format-independent: `prompt` turns, then the `reply` turns being taught."""

    prompt: list[Message]
    reply: list[Message]
    rejected: list[Message] | None = None
    answer: str | None = None
    verifier: str | None = None
    task: str | None = None
    split: str | None = None


# -- reading files ------------------------------------------------------------------------------------


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line or record number, record) for every record of a file; a record that is not valid JSON is
    yielded as a RecordError so the caller can raise or skip it with its line number."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    opener = gzip.open if name.endswith(".gz") else open
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".jsonl"):
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, RecordError(f"not valid JSON ({e.msg} at column {e.colno})")
    elif base.endswith(".json"):
        with opener(path, "rt", encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataImportError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file holds one list "
                                      "of records, use .jsonl for one record per line") from None
        if not isinstance(data, list):
            raise DataImportError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        yield from enumerate(data, start=1)
    else:
        raise DataImportError(f"{path}: unknown file type; use .jsonl, .json, .jsonl.gz, .json.gz or .parquet")


# -- field checks -------------------------------------------------------------------------------------


def _field(rec: dict, key: str, types: type | tuple[type, ...] = str) -> Any:
    if key not in rec or rec[key] is None:
        raise RecordError(f"missing field {key!r}")
    if not isinstance(rec[key], types):
        raise RecordError(f"field {key!r} is {type(rec[key]).__name__}, expected {getattr(types, '__name__', 'str or list')}")
    return rec[key]


def _text(rec: dict, key: str) -> str:
    value = _field(rec, key, str)
    if not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, (list, tuple)) or not value:
        raise RecordError(f"{where} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{where}[{i}] is not a {{role, content}} message")
        if m["role"] not in ROLES:
            raise RecordError(f"{where}[{i}] has role {m['role']!r}; expected one of {', '.join(sorted(ROLES))}")
        if not isinstance(m["content"], str):
            raise RecordError(f"{where}[{i}].content is {type(m['content']).__name__}, expected a string (text only)")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _turns(value: Any, where: str, role: str) -> list[Message]:
    """A TRL field that is a string (standard format) or a message list (conversational)."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"field {where!r} is empty")
        return [{"role": role, "content": value.strip()}]
    return _messages(value, where)


def _split_last_reply(messages: list[Message], where: str) -> tuple[list[Message], list[Message]]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RecordError(f"{where} has no assistant turn")
    if last == 0:
        raise RecordError(f"{where} starts with the assistant turn; there is no prompt")
    return messages[:last], messages[last:]


def _split(rec: dict) -> str | None:
    value = rec.get("split")
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in SPLITS:
        raise RecordError(f"field 'split' is {value!r}; expected one of {', '.join(SPLITS)}")
    return SPLITS[value.lower()]


def _task(rec: dict, default: str) -> str:
    return rec["task"] if isinstance(rec.get("task"), str) and rec["task"] else default


# -- one converter per format: record -> Examples ------------------------------------------------------


def from_messages(rec: dict) -> list[Example]:
    prompt, reply = _split_last_reply(_messages(_field(rec, "messages", list), "messages"), "messages")
    return [Example(prompt, reply, task=_task(rec, "chat"), split=_split(rec))]


def from_trl_completion(rec: dict) -> list[Example]:
    prompt = _turns(_field(rec, "prompt", (str, list)), "prompt", "user")
    reply = _turns(_field(rec, "completion", (str, list)), "completion", "assistant")
    return [Example(prompt, reply, task=_task(rec, "chat"), split=_split(rec))]


def from_trl_prefs(rec: dict) -> list[Example]:
    chosen = _turns(_field(rec, "chosen", (str, list)), "chosen", "assistant")
    rejected = _turns(_field(rec, "rejected", (str, list)), "rejected", "assistant")
    if rec.get("prompt") is not None:
        prompt = _turns(_field(rec, "prompt", (str, list)), "prompt", "user")
    else:  # implicit prompt: chosen and rejected are whole dialogues sharing their leading turns
        prompt, chosen = _split_last_reply(chosen, "chosen")
        rejected_prompt, rejected = _split_last_reply(rejected, "rejected")
        if rejected_prompt != prompt:
            raise RecordError("chosen and rejected differ before their final assistant turn (implicit prompt)")
    return [Example(prompt, chosen, rejected=rejected, task=_task(rec, "prefs"), split=_split(rec))]


def _alpaca_prompt(instruction: str, inp: str) -> list[Message]:
    content = f"{instruction.strip()}\n\n{inp.strip()}" if inp.strip() else instruction.strip()
    return [{"role": "user", "content": content}]


def from_alpaca(rec: dict) -> list[Example]:
    inp = rec.get("input") or ""
    if not isinstance(inp, str):
        raise RecordError(f"field 'input' is {type(inp).__name__}, expected str")
    reply = [{"role": "assistant", "content": _text(rec, "output").strip()}]
    return [Example(_alpaca_prompt(_text(rec, "instruction"), inp), reply, task=_task(rec, "alpaca"), split=_split(rec))]


def from_alpaca_seed(rec: dict) -> list[Example]:
    instruction = _text(rec, "instruction")
    instances = _field(rec, "instances", list)
    if not instances:
        raise RecordError("field 'instances' is empty")
    out = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise RecordError(f"instances[{i}] is not an {{input, output}} object")
        try:
            out += from_alpaca({"instruction": instruction, "input": inst.get("input"), "output": inst.get("output"),
                                "task": rec.get("task"), "split": rec.get("split")})
        except RecordError as e:
            raise RecordError(f"instances[{i}]: {e}") from None
    return out


def from_sharegpt(rec: dict) -> list[Example]:
    turns = _field(rec, "conversations", list)
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise RecordError(f"conversations[{i}] is not a {{from, value}} turn")
        role = SHAREGPT_ROLES.get(t["from"].lower())
        if role is None:
            raise RecordError(f"conversations[{i}] is from {t['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": t["value"]})
    prompt, reply = _split_last_reply(messages, "conversations")
    return [Example(prompt, reply, task=_task(rec, "sharegpt"), split=_split(rec))]


def from_gsm8k(rec: dict) -> list[Example]:
    question, solution = _text(rec, "question"), _text(rec, "answer")
    final = GSM8K_FINAL.search(solution)
    if final is None:
        raise RecordError("gsm8k answer has no '#### N' line")
    answer = final.group(1).replace(",", "").strip()
    try:
        parse_number(answer)
    except ValueError:
        raise RecordError(f"gsm8k final answer {final.group(1)!r} is not a number") from None
    worked = GSM8K_CALC.sub("", solution).strip()
    return [Example([{"role": "user", "content": question.strip()}], [{"role": "assistant", "content": worked}],
                    answer=answer, verifier="numeric", task=_task(rec, "gsm8k"), split=_split(rec))]


def parse_hh(transcript: str, where: str) -> list[Message]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    parts = HH_TURN.split(transcript if transcript.startswith("\n\n") else "\n\n" + transcript)
    if parts[0].strip() or len(parts) < 3:
        raise RecordError(f"{where} is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    speakers, texts = parts[1::2], parts[2::2]
    return [{"role": "user" if s == "Human" else "assistant", "content": t.strip()} for s, t in zip(speakers, texts)]


def from_hh_rlhf(rec: dict) -> list[Example]:
    chosen = parse_hh(_text(rec, "chosen"), "chosen")
    rejected = parse_hh(_text(rec, "rejected"), "rejected")
    prompt, chosen_reply = _split_last_reply(chosen, "chosen")
    rejected_prompt, rejected_reply = _split_last_reply(rejected, "rejected")
    if rejected_prompt != prompt:
        raise RecordError("chosen and rejected differ before their final Assistant turn")
    if prompt[-1]["role"] != "user":
        raise RecordError("the final Assistant turn does not answer a Human turn")
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if len(reply) != 1 or not reply[0]["content"]:
            raise RecordError(f"{name} has an empty final Assistant turn")
    return [Example(prompt, chosen_reply, rejected=rejected_reply, task=_task(rec, "hh_rlhf"), split=_split(rec))]


def from_prompt_answer(rec: dict) -> list[Example]:
    prompt = _turns(_field(rec, "prompt", (str, list)), "prompt", "user")
    key = next((k for k in ("answer", "solution", "ground_truth") if rec.get(k) is not None), "answer")
    answer = rec.get(key)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    answer = _text({key: answer}, key)
    verifier = rec.get("verifier") or "exact"
    if verifier not in VERIFIERS:
        raise RecordError(f"verifier {verifier!r} is unknown; expected one of {', '.join(VERIFIERS)}")
    if verifier == "numeric":
        try:
            parse_number(answer)
        except ValueError:
            raise RecordError(f"answer {answer!r} is not a number but the verifier is numeric") from None
    return [Example(prompt, [{"role": "assistant", "content": answer}], answer=answer, verifier=verifier,
                    task=_task(rec, "prompts"), split=_split(rec))]


CONVERTERS = {
    "messages": from_messages,
    "trl_completion": from_trl_completion,
    "trl_prefs": from_trl_prefs,
    "alpaca": from_alpaca,
    "alpaca_seed": from_alpaca_seed,
    "sharegpt": from_sharegpt,
    "gsm8k": from_gsm8k,
    "hh_rlhf": from_hh_rlhf,
    "prompt_answer": from_prompt_answer,
}
# the kinds each format can give, the first being what it gives when no kind is asked for
KINDS: dict[str, tuple[Kind, ...]] = {
    "messages": ("chat",), "trl_completion": ("chat",), "trl_prefs": ("prefs", "chat"), "alpaca": ("chat",),
    "alpaca_seed": ("chat",), "sharegpt": ("chat",), "gsm8k": ("prompts", "chat"), "hh_rlhf": ("prefs", "chat"),
    "prompt_answer": ("prompts",),
}


def detect_format(record: Any) -> str | None:
    """The format a record's keys say it is in, or None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys:
        chosen = record["chosen"]
        if "prompt" not in keys and isinstance(chosen, str) and "\n\nAssistant:" in chosen:
            return "hh_rlhf"
        return "trl_prefs"
    if {"prompt", "completion"} <= keys:
        return "trl_completion"
    if "prompt" in keys and keys & {"answer", "solution", "ground_truth"}:
        return "prompt_answer"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"instruction", "instances"} <= keys:
        return "alpaca_seed"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return None


# -- Example -> schema rows ---------------------------------------------------------------------------


def _row_id(source: str, kind: str, content: Any) -> str:
    digest = hashlib.sha1(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return f"{source}:{digest}"


def to_row(ex: Example, kind: Kind, source: str) -> dict[str, Any]:
    """One row of the `kind` schema; its id hashes its content, so identical records share an id."""
    if kind == "chat":
        row = {"messages": ex.prompt + ex.reply, "task": ex.task}
    elif kind == "prefs":
        row = {"prompt": ex.prompt, "chosen": ex.reply, "rejected": ex.rejected, "task": ex.task}
    else:
        row = {"prompt": ex.prompt, "answer": ex.answer, "verifier": ex.verifier, "task": ex.task}
    return {"id": _row_id(source, kind, row), **row, "source": source, "split": ex.split}


def import_records(records: Iterator[tuple[int, Any]], where: str, kind: Kind | None = None, fmt: str | None = None,
                   on_error: Literal["raise", "skip"] = "raise", max_skips: int | None = None,
                   source: str = "") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of `kind` from (line, record) pairs; see import_file."""
    if fmt is not None and fmt not in CONVERTERS:
        raise DataImportError(f"{where}: unknown format {fmt!r}; known: {', '.join(CONVERTERS)}")
    rows: list[dict[str, Any]] = []
    skips: Counter = Counter()
    n_records = 0
    for lineno, rec in records:
        n_records += 1
        try:
            if isinstance(rec, RecordError):
                raise rec
            if fmt is None:
                fmt = detect_format(rec)
                if fmt is None:
                    keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
                    raise DataImportError(f"{where}:{lineno}: cannot tell the format from keys ({keys}); "
                                          f"name it as PATH::FORMAT, one of {', '.join(CONVERTERS)}")
            if kind is None:
                kind = KINDS[fmt][0]
            elif kind not in KINDS[fmt]:
                raise DataImportError(f"{where}: format {fmt} gives {' or '.join(KINDS[fmt])} rows, not {kind}")
            if not isinstance(rec, dict):
                raise RecordError(f"record is a {type(rec).__name__}, expected an object")
            examples = CONVERTERS[fmt](rec)
        except RecordError as e:
            if on_error == "raise":
                raise DataImportError(f"{where}:{lineno}: {e}", lineno) from None
            skips[str(e)] += 1
            if max_skips is not None and sum(skips.values()) > max_skips:
                raise DataImportError(f"{where}:{lineno}: more than {max_skips} bad records (this one: {e}); "
                                      f"most common: {skips.most_common(1)[0][0]}", lineno) from None
            continue
        rows.extend(to_row(ex, kind, source) for ex in examples)
    stats = {"format": fmt, "kind": kind, "records": n_records, "rows": len(rows),
             "skipped": sum(skips.values()), "skip_reasons": dict(skips)}
    return rows, stats


def import_file(path: str | Path, kind: Kind | None = None, fmt: str | None = None,
                on_error: Literal["raise", "skip"] = "raise", source: str | None = None,
                max_skips: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the `kind` schema (chat, prefs, prompts; None: the format's own) from one file.

    fmt: one of CONVERTERS, or None to detect it from the first record's keys. on_error="raise"
    stops at the first bad record with DataImportError("<path>:<line>: <what>"); "skip" counts bad
    records by reason (raising once there are more than max_skips). source: the rows' `source`
    (default: the file name). `split` is the record's own split or None.

    Returns (rows, stats) with stats = {format, kind, records, rows, skipped, skip_reasons}.
    """
    path = Path(path)
    if not path.is_file():
        raise DataImportError(f"{path}: no such file")
    try:
        return import_records(read_records(path), str(path), kind, fmt, on_error, max_skips, source or path.name)
    except (OSError, EOFError, UnicodeDecodeError, pa.ArrowException) as e:  # truncated gzip, bad encoding, bad parquet
        raise DataImportError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"data/train.jsonl::sharegpt" -> ("data/train.jsonl", "sharegpt"); no "::" -> (spec, None)."""
    path, sep, fmt = spec.rpartition("::")
    return (path, fmt) if sep else (spec, None)

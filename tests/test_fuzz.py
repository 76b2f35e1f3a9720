"""Malformed input, fuzzed (hypothesis): every reader of user input — the dataset importers (TRL,
alpaca, sharegpt, GSM8K, hh-rlhf, ...), recipe files and `--set`, the HTML, WARC and local-file
readers — gives a result, a counted skip, or a one-line error naming what and where. Never a
traceback of another exception type."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flows.recipe import RecipeError, load_recipe, parse_override
from stages.chat.importers import CONVERTERS, DataImportError, import_file, import_records
from stages.contract import ConfigError
from stages.extract import Config as ExtractConfig
from stages.extract import extract_page
from stages.web.local import read_local
from stages.web.warc import read_warc

# derandomize: CI runs the same cases every time (main stays green); `pytest --hypothesis-seed=N` explores others
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KEYS = ["messages", "prompt", "completion", "chosen", "rejected", "instruction", "input", "output", "instances",
        "conversations", "from", "value", "question", "answer", "role", "content", "split", "task", "verifier", "solution"]
ROLES = ["user", "assistant", "system", "tool", "human", "gpt", "bot", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40),
                    st.sampled_from(["#### 42", "\n\nHuman: hi\n\nAssistant:", "\n\nHuman: a\n\nAssistant: b", "", " "]))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
        st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": children}),
        st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": children}),
    ),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


def one_line(e: Exception) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


@FUZZ
@given(recs=st.lists(st.one_of(records, json_values), min_size=1, max_size=4), fmt=st.sampled_from([None, *CONVERTERS]),
       kind=st.sampled_from([None, "chat", "prefs", "prompts"]))
@example(recs=[{"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: no"}], fmt=None, kind=None)
def test_importers_never_crash(recs, fmt, kind):
    """The hh-rlhf record with an empty final Assistant turn (the @example) among them."""
    for on_error in ("raise", "skip"):
        try:
            rows, stats = import_records(iter(enumerate(recs, 1)), "data.jsonl", kind, fmt, on_error)
        except DataImportError as e:
            one_line(e)
            assert str(e).startswith("data.jsonl")
            continue
        assert stats["records"] == len(recs) and stats["skipped"] + bool(rows) >= (1 if on_error == "skip" else 0) or rows
        for row in rows:
            assert isinstance(row["id"], str) and row["id"]


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet"]))
def test_import_file_on_arbitrary_bytes(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("imp") / f"train{suffix}"
    path.write_bytes(data)
    try:
        import_file(path, on_error="skip")
    except DataImportError as e:
        one_line(e)
        assert str(path) in str(e)


@FUZZ
@given(text=st.text(max_size=60))
@example(text="pretrain.max_steps=3e-5")
@example(text="sft.lora_targets=[1, 2")
@example(text="=")
@example(text="nosuchstage.x=1")
def test_set_overrides_are_a_value_or_one_line(text):
    try:
        keys, _ = parse_override(text)
    except RecipeError as e:
        one_line(e)
        return
    assert isinstance(keys, list)
    try:
        load_recipe("micro", [text])
    except ConfigError as e:  # RecipeError is one
        one_line(e)


@FUZZ
@given(doc=st.one_of(json_values, st.dictionaries(st.sampled_from(["name", "stages", "seed", "device", "extends", "register",
                                                                    "modules", "launch", "crawl", "pretrain", "x"]),
                                                   json_values, max_size=5)))
def test_recipe_files_are_a_recipe_or_one_line(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    try:
        load_recipe(str(path))
    except ConfigError as e:
        one_line(e)


@FUZZ
@given(text=st.text(max_size=200))
def test_recipe_text_that_is_not_yaml_is_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(str(path))
    except ConfigError as e:
        one_line(e)


html_bits = st.sampled_from(["<html>", "</html>", "<body>", "<p>", "</p>", "<div>", "<script>", "<!--", "-->", "<![CDATA[",
                             "<meta charset='utf-16'>", "&#0;", "&bogus;", "\x00", "<title>", "<table><tr><td>", "<svg>",
                             "The json module encodes objects. ", "é", "\ufffd", "<pre>", "<h1>"])


@FUZZ
@given(body=st.one_of(st.binary(max_size=400), st.lists(html_bits, max_size=40).map(lambda p: "".join(p).encode("utf-8", "surrogatepass"))),
       content_type=st.sampled_from(["text/html", "text/html; charset=latin-1", "text/plain", "text/markdown",
                                     "application/pdf", "", "text/html; charset=bogus"]),
       status=st.sampled_from([200, 404, 301, None]))
def test_html_reader_gives_a_doc_or_a_counted_reason(body, content_type, status):
    page = {"url": "http://x.test/p", "final_url": "http://x.test/p", "status": status, "content_type": content_type, "body": body}
    doc, excluded = extract_page(page, ExtractConfig())
    assert (doc is None) != (excluded is None)
    if excluded is not None:
        assert excluded["reason"]


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), st.just(b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 99999\r\n\r\nshort")))
def test_warc_reader_counts_what_it_cannot_read(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("warc") / "x.warc"
    path.write_bytes(data)
    failures, skipped = Counter(), Counter()
    rows = list(read_warc(path, failures, skipped, content_types=("text/html",), max_bytes=10_000))
    assert rows or failures or skipped or not data


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".md", ".html", ".jsonl", ".jsonl.gz", ".parquet", ".exe"]))
def test_local_reader_counts_what_it_cannot_read(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("local") / f"f{suffix}"
    path.write_bytes(gzip.compress(data) if suffix == ".jsonl.gz" and data[:1] == b"{" else data)
    failures = Counter()
    rows = list(read_local(path, failures, max_bytes=10_000))
    assert rows or failures


def test_the_real_hh_rlhf_failure_is_one_line(shared_data, tmp_path):
    """The record of the hh-rlhf sample whose final Assistant turn is empty, as a file: one line naming
    the file and the line."""
    src = next(Path(shared_data / "hh_rlhf").glob("*.jsonl*"))
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt") as f:
        lines = [line for line in f if line.strip()]
    bad = json.dumps({"chosen": "\n\nHuman: Can you help?\n\nAssistant:", "rejected": "\n\nHuman: Can you help?\n\nAssistant: No."})
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(lines[:3]) + bad + "\n")
    with pytest.raises(DataImportError) as e:
        import_file(path)
    one_line(e.value)
    assert str(e.value).startswith(f"{path}:4:")
    rows, stats = import_file(path, on_error="skip")
    assert stats["skipped"] == 1 and len(rows) == 3

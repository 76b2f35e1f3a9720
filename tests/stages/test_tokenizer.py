"""The tokenizer stage and models/tokenizer.py: BPE on real text, special ids, HF loading, the chat
template and assistant mask, and the token shards."""
from __future__ import annotations

import hashlib
import importlib
import json
import pydoc

import numpy as np
import pytest

from models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer
from stages import tokenizer as T
from stages.contract import StageError
from storage.parquet import write_table
from tests.conftest import artifact, make_ctx

MODULES = ("json", "textwrap", "heapq", "string", "shlex", "bisect", "fnmatch", "glob", "queue", "copy", "abc",
           "colorsys", "base64", "calendar", "csv", "difflib", "gettext", "hmac", "keyword", "operator")
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What does heapq.heappop do?"},
    {"role": "assistant", "content": "<think>\nIt pops.\n</think>\nIt removes and returns the smallest item — fast."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome. 😀"},
]


def docs_rows() -> list[dict]:
    rows = []
    for name in MODULES:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        rows.append(dict(id=f"pydoc:{name}", url=f"http://127.0.0.1/{name}.html", source="pydoc", title=name, text=text,
                         lang="en", lang_score=1.0, n_chars=len(text), n_words=len(text.split()),
                         sha256=hashlib.sha256(text.encode()).hexdigest(), cluster=None))
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizer")
    rows = docs_rows()
    write_table(rows, root / "docs_clean" / "part-00000.parquet", "docs")
    ctx = make_ctx(root / "stage", stage="tokenizer")
    cfg = T.Config(vocab_size=1024, val_frac=0.2)
    result = T.run(cfg, {"docs_clean": artifact("docs_clean", root / "docs_clean")}, ctx)
    return {"rows": rows, "result": result, "tok_dir": ctx.output("tokenizer"), "tokens": ctx.output("tokens"), "cfg": cfg}


def test_special_tokens_take_ids_0_to_7(built):
    tok = Tokenizer.load(built["tok_dir"])
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(8))
    assert (tok.eot_id, tok.pad_id, tok.im_start_id, tok.im_end_id, tok.think_id, tok.think_end_id) == (0, 0, 1, 2, 3, 4)
    assert tok.vocab_size == 1024 == built["result"].metrics["vocab_size"]
    assert tok.encode("<|im_start|>user") == [1] + tok.encode("user")  # special tokens are single ids in text


def test_encode_decode_round_trip_any_text(built):
    tok = Tokenizer.load(built["tok_dir"])
    for text in (built["rows"][0]["text"][:3000], "  leading spaces\ttabs\r\nCRLF", "naïve café — 東京 😀", ""):
        assert tok.decode(tok.encode(text)) == text
    # trained on English documentation, the tokenizer compresses it: well under one token per byte
    assert built["result"].metrics["tokens_per_byte"] < 0.45


def test_digits_are_one_token_each(built):
    tok = Tokenizer.load(built["tok_dir"])
    assert [tok.decode([i]) for i in tok.encode("What is 2024 + 17?") if tok.decode([i]).strip().isdigit()] == list("202417")


def test_shards_match_meta_and_split_by_document(built):
    out, rows = built["tokens"], built["rows"]
    meta = json.loads((out / "meta.json").read_text())
    train = np.memmap(out / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(out / "val.bin", dtype=meta["dtype"], mode="r")
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0 and meta["vocab_size"] == 1024
    assert (out / "train.bin").stat().st_size == 2 * meta["train_tokens"] == 2 * len(train)
    assert (out / "val.bin").stat().st_size == 2 * meta["val_tokens"] == 2 * len(val)
    assert meta["tokens_per_byte"] == pytest.approx(meta["train_tokens"] / meta["train_bytes"])
    assert meta["train_docs"] + meta["val_docs"] == len(rows) and meta["val_docs"] >= 1
    # each split decodes back to its documents, in order, each followed by <|endoftext|>
    tok = Tokenizer.load(built["tok_dir"])
    is_val = T.assign_splits([r["id"] for r in rows], built["cfg"].val_frac)
    for arr, want_val in ((train, False), (val, True)):
        texts = [r["text"] for r, v in zip(rows, is_val) if v == want_val]
        assert int((arr == 0).sum()) == len(texts) and arr[-1] == 0
        pieces = np.split(np.asarray(arr), np.nonzero(arr == 0)[0] + 1)[:-1]
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == texts
        split = "val" if want_val else "train"
        assert meta[f"{split}_bytes"] == sum(len(t.encode()) for t in texts)


def test_splits_are_deterministic_and_never_empty():
    ids = [f"doc-{i}" for i in range(1000)]
    a, b = T.assign_splits(ids, 0.05), T.assign_splits(list(ids), 0.05)
    assert a == b and 25 <= sum(a) <= 75
    assert sum(T.assign_splits(ids[:3], 1e-9)) == 1  # at least one val document
    assert sum(T.assign_splits(ids[:3], 0.999999)) == 2  # and at least one train document


def test_chat_template_and_assistant_mask(built):
    tok = Tokenizer.load(built["tok_dir"])
    text = tok.apply_chat_template(CHAT)
    assert text.startswith("<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\n")
    assert tok.apply_chat_template(CHAT[:2], add_generation_prompt=True).endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = tok.encode_chat(CHAT)
    assert ids == tok.encode(text) and len(mask) == len(ids)
    # the masked tokens are exactly the assistant contents, each closed by <|im_end|>
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "".join(m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant")
    assert sum(i == tok.im_end_id for i, m in zip(ids, mask) if m) == 2
    assert not mask[0] and not mask[-1]  # the first <|im_start|> and the final "\n" are not predicted


def test_assistant_content_with_leading_spaces_is_still_masked(built):
    tok = Tokenizer.load(built["tok_dir"])
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "    indented code"}]
    ids, mask = tok.encode_chat(chat)
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked.endswith("    indented code<|im_end|>")  # a token straddling "\n" + spaces counts as assistant


@pytest.mark.slow  # importing transformers alone takes seconds
def test_hf_auto_tokenizer_loads_and_agrees(built):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(built["tok_dir"]), local_files_only=True)
    tok = Tokenizer.load(built["tok_dir"])
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0 and hf.pad_token_id == 0 and hf.bos_token is None
    text = built["rows"][1]["text"][:2000] + " <|im_start|>user\n😀 12345 + 678"
    assert hf(text, add_special_tokens=True)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    for gen in (False, True):
        assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen) == tok.apply_chat_template(CHAT, gen)
    config = json.loads((built["tok_dir"] / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.slow
def test_chat_model_export_sets_eos_to_im_end(built, tmp_path):
    transformers = pytest.importorskip("transformers")
    Tokenizer.load(built["tok_dir"]).save(tmp_path, eos_token="<|im_end|>")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert hf.eos_token_id == 2 and hf.pad_token_id == 0


def test_too_few_documents_is_a_stage_error(tmp_path):
    rows = docs_rows()[:1]
    write_table(rows, tmp_path / "docs" / "part-00000.parquet", "docs")
    with pytest.raises(StageError, match=r"^tokenizer: docs_clean at .* has 1 document\(s\), need at least 2"):
        T.run(T.Config(), {"docs_clean": artifact("docs_clean", tmp_path / "docs")}, make_ctx(tmp_path / "s"))


def test_config_validation():
    with pytest.raises(ValueError, match="vocab_size must be >= 264"):
        T.Config(vocab_size=100).validate()
    with pytest.raises(ValueError, match="val_frac"):
        T.Config(val_frac=0.0).validate()

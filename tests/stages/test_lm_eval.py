"""stages/chat/lm_eval_check.py: EleutherAI's lm-evaluation-harness, on our HF export, agrees with our
evaluator's greedy answers and with our bits per byte.

The model is a random 2-layer GPT with a real byte-level BPE; its weights are scaled up from the
0.02 init so that logits are far apart (near-ties would let float noise between two correct
implementations pick different tokens) and greedy answers are not one repeated token. The
<|im_end|> row of the head copies a frequent token's, so some answers stop early and some run
to max_new_tokens: both ends of generation are checked.
"""
from __future__ import annotations

import json
import os
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from models.generate import generate
from models.gpt import GPT, GPTConfig
from models.hf_export import save_model_dir
from models.tokenizer import IM_END, Tokenizer
from stages.chat.evaluate import generate_answers, pick_heldout, prompt_ids
from stages.contract import StageError
from stages.tokenizer import train_bpe

WORDS = ["hot", "cold", "up", "down", "big", "small", "yes", "no", "day", "night", "left", "right"]
DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 12,  # longer than one 64-token window
    "café naïve — ünïcödé bytes: the byte count is not the character count.",
    "What is 12 + 30? 42. " * 9,
]


@pytest.fixture(scope="module")
def lm_eval_check():
    os.environ["HF_HUB_OFFLINE"] = "1"  # local directories only, never the hub
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    pytest.importorskip("lm_eval")
    from stages.chat import lm_eval_check
    return lm_eval_check


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[GPT, Tokenizer, Path]:
    """Our GPT, its tokenizer, and the hf/ export of its model directory (a chat model's: eos is <|im_end|>)."""
    root = tmp_path_factory.mktemp("lm_eval")
    texts = [f"opposite of {a}? {b}. What is 2 + 3? 5" for a, b in pairwise(WORDS)] * 4
    tok = Tokenizer(train_bpe(iter(texts), vocab_size=300, min_frequency=2))
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          max_seq_len=64, tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
        # a token greedy decoding picks often, found on one prompt; <|im_end|> takes a slightly larger row
        probe = generate_answers(model, tok, [[{"role": "user", "content": "opposite of hot?"}]], 32)
        ids = tok.encode(probe[0]) or [tok.eot_id]
        frequent = max(set(ids), key=ids.count)
        model.lm_head.weight[tok.im_end_id] = 1.05 * model.lm_head.weight[frequent]
    return model, tok, save_model_dir(model, root / "tok", root / "chat", eos_token=IM_END) / "hf"


def prompts_rows() -> list[dict]:
    rows = []
    for i in range(20):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 5 + 1) % len(WORDS)]
        question = f"opposite of {a}?" + (f" not {b}, and say it {i} times." if i % 3 else "")
        prompt = ([{"role": "system", "content": "Answer in one word."}] if i % 4 == 0 else []) + [
            {"role": "user", "content": question}]
        rows.append({"id": f"p{i:02d}", "prompt": prompt, "answer": b, "verifier": "exact", "task": "opposite",
                     "split": "test"})
    return rows


def test_lm_eval_answers_equal_our_evaluators(export, lm_eval_check):
    model, tok, hf_dir = export
    rows = prompts_rows()
    ours = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens=16, batch_size=32)
    new = generate(model, [prompt_ids(tok, r["prompt"]) for r in rows], 16, stop_ids=(tok.im_end_id, tok.eot_id))
    lengths = [len(t) for t in new]
    assert len(set(ours)) > 10 and min(lengths) < 8 and max(lengths) == 16, lengths  # early stops and full runs
    # lm-eval batches by 8 in its own order, ours by 32: left padding must not change an answer
    got = lm_eval_check.agreement(hf_dir, rows, ours, max_new_tokens=16, batch_size=8)
    assert got["token_mismatches"] == 0
    assert got["disagreements"] == [] and got["agreement"] == 1.0
    assert got["answers"] == [o.strip() for o in ours]
    assert got["lm_eval_acc"] == got["our_acc"]


def test_agreement_counts_a_different_answer(export, lm_eval_check):
    model, tok, hf_dir = export
    rows = prompts_rows()[:4]
    ours = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens=8)
    rows[1]["answer"] = ours[1]  # lm-eval grades its own answer with our verifier: this one is right
    ours[2] = ours[2] + " and more"
    got = lm_eval_check.agreement(hf_dir, rows, ours, max_new_tokens=8, batch_size=4)
    assert got["agreement"] == 0.75 and [d["id"] for d in got["disagreements"]] == ["p02"]
    assert got["lm_eval_acc"] == 0.25


def test_rolling_bpb_matches_ours(export, lm_eval_check):
    model, tok, hf_dir = export
    assert max(len(tok.encode(d)) for d in DOCS) > 2 * model.cfg.max_seq_len  # several windows per doc
    got = lm_eval_check.rolling_bpb(hf_dir, DOCS, model=model)
    assert got["max_len"] == model.cfg.max_seq_len and got["token_mismatches"] == 0
    assert got["bytes"] == sum(len(d.encode("utf-8")) for d in DOCS) > sum(map(len, DOCS))
    assert got["lm_eval_bpb"] == pytest.approx(got["lm_eval_bpb_from_logliks"], rel=1e-9)
    assert got["bpb_rel_diff"] < 0.01
    assert got["bpb_rel_diff"] < 1e-5  # in fact both compute one float32 forward pass each


@pytest.mark.parametrize("n,max_len", [(1, 4), (4, 4), (5, 4), (11, 4), (64, 16)])
def test_rolling_windows_are_lm_evals(lm_eval_check, n, max_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n))
    seq = [-1] + tokens
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, -1, max_len, context_len=1)]
    ours = lm_eval_check.rolling_windows(n, max_len)
    assert len(ours) == len(theirs)
    for (start, end, k), (context, pred) in zip(ours, theirs):
        assert end - start <= max_len
        assert seq[start:end] == context + pred[:-1] and tokens[end - k:end] == pred


def test_lm_eval_metrics_of_a_model_directory(export, lm_eval_check):
    *_, hf_dir = export
    rows = prompts_rows() + [{**prompts_rows()[0], "id": "v0", "split": "val"}]
    test_rows = pick_heldout(rows, 12, split="test")
    assert [r["id"] for r in test_rows] == [f"p{i:02d}" for i in range(12)]
    got = lm_eval_check.lm_eval_metrics(hf_dir.parent, test_rows, DOCS[:2], max_new_tokens=12)
    assert got["lm_eval/agreement"] == 1.0 and got["lm_eval/acc"] == got["lm_eval/our_acc"]
    assert got["lm_eval/bpb_rel_diff"] < 0.01 and got["lm_eval/token_mismatches"] == 0


def test_heldout_docs_are_the_val_documents(tmp_path, export, lm_eval_check):
    _, tok, _ = export
    ids = [t for d in DOCS for t in tok.encode(d) + [tok.eot_id]]
    np.asarray(ids, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "eot_id": tok.eot_id}))
    assert lm_eval_check.heldout_docs(tmp_path, tok) == DOCS


def test_missing_lm_eval_is_one_line(monkeypatch):
    from stages.chat import lm_eval_check

    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(StageError, match=r"lm-eval\[hf\]==0\.4\.13") as e:
        lm_eval_check.import_lm_eval()
    assert "\n" not in str(e.value)

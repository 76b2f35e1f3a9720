"""Pretrain stage: schedule, loader, baselines, learning, exact resume, DDP on two CPU processes.

The corpus is real text: docstrings of the Python standard library, tokenized by a byte-level BPE
trained here with `tokenizers` and written in the `tokenizer` / `tokens` layout of INTERFACES.md.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.gpt import GPT
from models.tokenizer import SPECIAL_TOKENS
from models.tokenizer import Tokenizer as FamilyTokenizer
from stages import pretrain
from stages.contract import StageError
from tests.conftest import REPO, artifact, make_ctx

# a model small enough for a few hundred CPU steps in seconds
TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64, batch_size=8, lr=3e-3, warmup_steps=10,
            log_every=10, eval_every=50, eval_tokens=4096, ckpt_every=50, sample_tokens=8, max_minutes=5.0)


def stdlib_docstrings(max_chars: int) -> list[str]:
    """Docstrings longer than 200 characters from the top-level stdlib modules, in file order."""
    docs, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
                    size += len(doc)
                    if size >= max_chars:
                        return docs
    return docs


def write_corpus(root: Path, docs: list[str], vocab_size: int = 512) -> tuple[Path, Path]:
    """A tokenizer dir and a tokens dir as the tokenizer stage writes them (1 doc in 10 goes to val)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok_dir, tokens_dir = root / "tokenizer", root / "tokens"
    tok_dir.mkdir(parents=True)
    tokens_dir.mkdir(parents=True)
    FamilyTokenizer(tok).save(tok_dir)
    split = {"train": ([], 0, 0), "val": ([], 0, 0)}
    for i, (doc, enc) in enumerate(zip(docs, tok.encode_batch(docs))):
        name = "val" if int(hashlib.sha1(str(i).encode()).hexdigest(), 16) % 10 == 0 else "train"
        ids, n_bytes, n_docs = split[name]
        ids.extend(enc.ids + [0])
        split[name] = (ids, n_bytes + len(doc.encode()), n_docs + 1)
    meta = {"dtype": "uint16", "vocab_size": tok.get_vocab_size(), "eot_id": 0}
    for name, (ids, n_bytes, n_docs) in split.items():
        np.asarray(ids, dtype=np.uint16).tofile(tokens_dir / f"{name}.bin")
        meta.update({f"{name}_tokens": len(ids), f"{name}_bytes": n_bytes, f"{name}_docs": n_docs})
    meta["tokens_per_byte"] = meta["train_tokens"] / meta["train_bytes"]
    (tokens_dir / "meta.json").write_text(json.dumps(meta))
    return tok_dir, tokens_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    tok_dir, tokens_dir = write_corpus(tmp_path_factory.mktemp("corpus"), stdlib_docstrings(300_000))
    return {"tokenizer": artifact("tokenizer", tok_dir), "tokens": artifact("tokens", tokens_dir)}


def run_stage(root: Path, corpus: dict, progress=None, **overrides):
    cfg = pretrain.Config(**{**TINY, **overrides})
    ctx = make_ctx(root, "pretrain")
    if progress is not None:
        ctx.progress = progress
    return pretrain.run(cfg, corpus, ctx), ctx


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    result, ctx = run_stage(root, corpus, max_steps=200)
    return result, ctx


# -- pure functions ------------------------------------------------------------------------------


def test_unigram_bpb_matches_hand_computation():
    train, val = np.array([1, 1, 1, 2], dtype=np.uint16), np.array([1, 2, 0], dtype=np.uint16)
    # add-one counts over V=3: [1, 4, 2] / 7
    bits = -(math.log2(4 / 7) + math.log2(2 / 7) + math.log2(1 / 7))
    assert pretrain.unigram_bpb(train, val, 3, val_bytes=5) == pytest.approx(bits / 5)
    assert pretrain.bits_per_byte(math.log(2), n_tokens=10, n_bytes=5) == pytest.approx(2.0)


def test_loader_is_deterministic_resumable_and_covers_each_epoch():
    tokens = np.arange(10 * 8 + 1, dtype=np.uint16)  # 10 windows of 8 + 1
    a = pretrain.PackedLoader(tokens, seq_len=8, batch_size=3, seed=7)
    batches = [a.next_batch() for _ in range(7)]
    x, y = batches[0]
    assert x.shape == (3, 8) and torch.equal(y, x + 1)  # targets are the inputs shifted by one token

    # one epoch = 3 batches of 3 windows (the tail window is skipped), no window twice within it
    firsts = torch.cat([b[0][:, 0] for b in batches[:3]]).tolist()
    assert len(set(firsts)) == 9 and all(f % 8 == 0 for f in firsts)
    second = torch.cat([b[0][:, 0] for b in batches[3:6]]).tolist()
    assert second != firsts  # a fresh permutation per epoch

    # resume: a new loader given the state after 4 batches yields batches 5..7
    b = pretrain.PackedLoader(tokens, seq_len=8, batch_size=3, seed=7)
    for _ in range(4):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))  # it travels through checkpoint meta.json
    assert state == {"epoch": 1, "position": 3}
    c = pretrain.PackedLoader(tokens, seq_len=8, batch_size=3, seed=7)
    c.load_state_dict(state)
    for want in batches[4:]:
        assert torch.equal(c.next_batch()[0], want[0])


def test_loader_ranks_split_the_global_batch():
    tokens = np.arange(40 * 4 + 1, dtype=np.uint16)
    single = pretrain.PackedLoader(tokens, seq_len=4, batch_size=6, seed=1)
    ranks = [pretrain.PackedLoader(tokens, seq_len=4, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(9):  # crosses an epoch boundary (40 windows // 6 = 6 batches)
        want = single.next_batch()[0]
        got = torch.cat([r.next_batch()[0] for r in ranks])
        assert torch.equal(got, want)


def test_missing_val_shard_is_a_stage_error(corpus, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    src = Path(corpus["tokens"].path)
    for name in ("train.bin", "meta.json"):
        (tokens / name).write_bytes((src / name).read_bytes())
    with pytest.raises(StageError, match=r"val\.bin is missing or empty"):
        run_stage(tmp_path / "run", {**corpus, "tokens": artifact("tokens", tokens)}, max_steps=1)


# -- training --------------------------------------------------------------------------------------


def test_loss_decreases_and_beats_unigram(trained):
    result, ctx = trained
    m = result.metrics
    curve = result.tables["eval_curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 200
    assert curve[-1]["val_loss"] < curve[0]["val_loss"] - 1.0
    assert m["val_bpb"] < m["unigram_bpb"] - 0.2, m
    assert m["steps"] == 200 and m["train_tokens_seen"] == 200 * 8 * 64
    assert ctx.tracker.metrics["train/loss"][-1][1] < ctx.tracker.metrics["train/loss"][0][1]
    assert "samples/final.md" in ctx.tracker.texts and "### The" in ctx.tracker.texts["samples/final.md"]


def test_output_loads_with_from_pretrained(trained, corpus):
    result, ctx = trained
    out = ctx.output("base")
    model = GPT.from_pretrained(out)
    assert model.num_params() == result.metrics["params"]
    assert (out / "tokenizer.json").is_file() and (out / "hf" / "config.json").is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stopped_by"] == "max_steps" and meta["metrics"]["val_bpb"] == result.metrics["val_bpb"]
    # the saved weights give the reported val loss
    val = np.fromfile(Path(corpus["tokens"].path) / "val.bin", dtype=np.uint16)
    starts = pretrain.eval_starts(len(val), 64, TINY["eval_tokens"])
    loss = pretrain.evaluate(model, val, starts, 64, 8, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert loss == pytest.approx(result.metrics["val_loss"], abs=1e-5)


class Crash(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(corpus, tmp_path):
    common = dict(max_steps=30, ckpt_every=8, log_every=1, eval_every=10)
    whole, whole_ctx = run_stage(tmp_path / "whole", corpus, **common)

    def crash_at_13(done, total, desc="", **metrics):
        if done == 13:
            raise Crash

    root = tmp_path / "resumed"
    with pytest.raises(Crash):
        run_stage(root, corpus, progress=crash_at_13, **common)
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == ["step-00000008"]
    resumed, resumed_ctx = run_stage(root, corpus, **common)

    assert resumed.metrics["val_loss"] == whole.metrics["val_loss"]
    assert resumed_ctx.tracker.metrics["train/loss"][-1] == whole_ctx.tracker.metrics["train/loss"][-1]
    a = load_file(str(whole_ctx.output("base") / "model.safetensors"))
    b = load_file(str(resumed_ctx.output("base") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # checkpoints: the last two only, the final step among them
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == ["step-00000024", "step-00000030"]
    # the whole model directory, meta.json included, is the same bytes: no timings, no paths in it
    assert dir_bytes(whole_ctx.output("base")) == dir_bytes(resumed_ctx.output("base"))


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_wall_clock_budget_stops_cleanly(corpus, tmp_path):
    result, ctx = run_stage(tmp_path, corpus, max_steps=10_000, max_minutes=0.02, log_every=5)
    meta = json.loads((ctx.output("base") / "meta.json").read_text())
    assert meta["stopped_by"] == "max_minutes" and 0 < meta["steps"] < 10_000
    assert math.isfinite(result.metrics["val_bpb"]) and (ctx.output("base") / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_torchrun(corpus, tmp_path):
    cfg = {**TINY, "max_steps": 20, "eval_every": 10, "ckpt_every": 10}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    (tmp_path / "i.json").write_text(json.dumps({k: a.path for k, a in corpus.items()}))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "stages.pretrain",
           "--config", str(tmp_path / "c.json"), "--inputs", str(tmp_path / "i.json"), "--run-dir", str(tmp_path / "run" / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    # two ranks of batch 8 each: 2 * 8 * 64 tokens per step
    assert result["metrics"]["steps"] == 20 and result["metrics"]["train_tokens_seen"] == 20 * 2 * 8 * 64
    assert result["metrics"]["val_loss"] < math.log(json.loads((Path(corpus["tokens"].path) / "meta.json").read_text())["vocab_size"])
    GPT.from_pretrained(tmp_path / "run" / "out" / "base")


@pytest.mark.slow
def test_hf_export_gives_the_same_logits(trained):
    transformers = pytest.importorskip("transformers")
    _, ctx = trained
    out = ctx.output("base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ours = GPT.from_pretrained(out).eval()
    x = torch.randint(0, ours.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)

"""Pretraining throughput: the stage against a plain loop, and our decoder against nanoGPT's.

    python -m bench.pretrain [--steps N] [--repeats R]

Same model size and data for every run: d_model 128, 4 layers, seq_len 256, batch 16, AdamW, grad
clip 1.0, fp32 on CPU (bf16 autocast on CUDA), on stdlib docstrings tokenized by a byte-level BPE
(vocab 4096) trained at the start. Interleaved repeats of three runs, medians reported:
  (a) stage:   stages.pretrain.run() with a NullTracker and no progress bar, checkpointing and
               evaluating every 10 steps (the default is every 100); its own tokens/s figure, which
               counts data loading, logging and checkpointing but not evaluation or sampling;
  (a) plain:   the same GPT in a minimal nanoGPT-style loop (random windows, forward, backward, clip,
               step) -> ratio stage / plain, target >= 1.0;
  (b) nanogpt: bench/nanogpt_ref.py of the same width/depth in the same plain loop -> ratio ours / nanoGPT.
Ratios are medians of the per-round ratios: the runs of one round are seconds apart, so a change in the
machine's load between rounds cancels out. MFU only on CUDA (flops_per_token * tokens/s / --peak-tflops). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bench.nanogpt_ref import NanoGPT, NanoGPTConfig
from models.gpt import GPT, GPTConfig
from models.tokenizer import SPECIAL_TOKENS
from models.tokenizer import Tokenizer as FamilyTokenizer
from stages import pretrain
from stages.contract import StageContext
from storage.artifacts import Artifact
from storage.tracking import NullTracker

D_MODEL, N_LAYERS, N_HEADS, N_KV_HEADS, SEQ_LEN, BATCH = 128, 4, 4, 2, 256, 16


def build_corpus(root: Path, vocab_size: int = 4096) -> dict[str, Artifact]:
    """Stdlib docstrings -> `tokenizer` and `tokens` artifacts in the layout of the tokenizer stage."""
    docs = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs += [d for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and (d := ast.get_docstring(n))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok_dir, tokens_dir = root / "tokenizer", root / "tokens"
    tok_dir.mkdir(parents=True)
    tokens_dir.mkdir(parents=True)
    FamilyTokenizer(tok).save(tok_dir)
    ids: dict[str, list[int]] = {"train": [], "val": []}
    n_bytes = {"train": 0, "val": 0}
    for i, (doc, enc) in enumerate(zip(docs, tok.encode_batch(docs))):
        split = "val" if int(hashlib.sha1(str(i).encode()).hexdigest(), 16) % 20 == 0 else "train"
        ids[split] += enc.ids + [0]
        n_bytes[split] += len(doc.encode())
    for split in ids:
        np.asarray(ids[split], dtype=np.uint16).tofile(tokens_dir / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": tok.get_vocab_size(), "eot_id": 0, "train_tokens": len(ids["train"]),
            "val_tokens": len(ids["val"]), "train_bytes": n_bytes["train"], "val_bytes": n_bytes["val"]}
    (tokens_dir / "meta.json").write_text(json.dumps(meta))
    return {"tokenizer": Artifact("tokenizer", str(tok_dir), "bench"), "tokens": Artifact("tokens", str(tokens_dir), "bench")}


def run_stage(corpus: dict[str, Artifact], steps: int, device: str) -> tuple[float, float]:
    """(the stage's own tokens/s, tokens / wall time of the whole run() call)."""
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        root = Path(tmp)
        ctx = StageContext(stage="pretrain", run_dir=root / "out", checkpoint_dir=root / "ckpt", state_dir=root / "state",
                           tracker=NullTracker(), device=device)
        cfg = pretrain.Config(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, seq_len=SEQ_LEN,
                              batch_size=BATCH, max_steps=steps, max_minutes=60.0, eval_every=10, ckpt_every=10, eval_tokens=16384)
        t0 = time.perf_counter()
        result = pretrain.run(cfg, corpus, ctx)
        wall = time.perf_counter() - t0
    return result.metrics["tokens_per_s"], result.metrics["train_tokens_seen"] / wall


def plain_loop(model: torch.nn.Module, data: np.ndarray, steps: int, device: torch.device) -> float:
    """nanoGPT train.py's inner loop and nothing else; tokens/s over all `steps` steps."""
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        ix = torch.randint(len(data) - SEQ_LEN - 1, (BATCH,), generator=gen).tolist()
        buf = np.stack([data[i : i + SEQ_LEN + 1] for i in ix]).astype(np.int64)  # (B, T+1)
        x, y = torch.from_numpy(buf[:, :-1].copy()).to(device), torch.from_numpy(buf[:, 1:].copy()).to(device)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three runs")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        corpus = build_corpus(Path(tmp))
        meta = json.loads((Path(corpus["tokens"].path) / "meta.json").read_text())
        train = np.memmap(Path(corpus["tokens"].path) / "train.bin", dtype=np.uint16, mode="r")
        vocab = meta["vocab_size"]
        print(f"corpus: {meta['train_tokens']:,} train tokens, vocab {vocab}; model d={D_MODEL} L={N_LAYERS} T={SEQ_LEN} "
              f"B={BATCH}, {args.steps} steps per run, {args.repeats} rounds, device {device}, threads {torch.get_num_threads()}")
        ours_cfg = GPTConfig(vocab_size=vocab, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, max_seq_len=SEQ_LEN)
        runs: dict[str, list[float]] = {"stage": [], "stage_end_to_end": [], "plain_ours": [], "plain_nanogpt": []}
        for r in range(args.repeats):
            own, e2e = run_stage(corpus, args.steps, device.type)
            runs["stage"].append(own)
            runs["stage_end_to_end"].append(e2e)
            torch.manual_seed(0)
            runs["plain_ours"].append(plain_loop(GPT(ours_cfg).to(device), train, args.steps, device))
            torch.manual_seed(0)
            nano = NanoGPT(NanoGPTConfig(vocab_size=vocab, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, max_seq_len=SEQ_LEN))
            runs["plain_nanogpt"].append(plain_loop(nano.to(device), train, args.steps, device))
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()) + " tok/s")
        flops_per_token = GPT(ours_cfg).flops_per_token(SEQ_LEN)

    med = {k: statistics.median(v) for k, v in runs.items()}
    figures = {
        "device": str(device),
        "stage_tokens_per_s": round(med["stage"]),
        "stage_end_to_end_tokens_per_s": round(med["stage_end_to_end"]),
        "plain_ours_tokens_per_s": round(med["plain_ours"]),
        "plain_nanogpt_tokens_per_s": round(med["plain_nanogpt"]),
        "ratio_stage_vs_plain": round(statistics.median(a / b for a, b in zip(runs["stage"], runs["plain_ours"])), 3),
        "ratio_ours_vs_nanogpt": round(statistics.median(a / b for a, b in zip(runs["plain_ours"], runs["plain_nanogpt"])), 3),
        "runs": {k: [round(x) for x in v] for k, v in runs.items()},
    }
    print(f"(a) stage {med['stage']:,.0f} tok/s vs plain loop {med['plain_ours']:,.0f} tok/s: ratio {figures['ratio_stage_vs_plain']:.3f} "
          f"(whole run() incl. setup, evals, export: {med['stage_end_to_end']:,.0f} tok/s)")
    print(f"(b) our decoder {med['plain_ours']:,.0f} tok/s vs nanoGPT {med['plain_nanogpt']:,.0f} tok/s: ratio {figures['ratio_ours_vs_nanogpt']:.3f}")
    if device.type == "cuda":
        figures["mfu_stage"] = round(flops_per_token * med["stage"] / (args.peak_tflops * 1e12), 4)
        figures["mfu_plain_ours"] = round(flops_per_token * med["plain_ours"] / (args.peak_tflops * 1e12), 4)
        print(f"MFU: stage {figures['mfu_stage']:.1%}, plain {figures['mfu_plain_ours']:.1%} of {args.peak_tflops:g} TFLOP/s")
    else:
        figures["mfu"] = None
        print("MFU: not measured (no GPU)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

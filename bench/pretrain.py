"""Pretraining throughput: the stage against a plain loop, and our decoder against nanoGPT's.

    python -m bench.pretrain [--steps N] [--repeats R] [--only decoder]

Same model size and data for every run: d_model 128, 4 layers, seq_len 256, batch 16, AdamW, grad
clip 1.0, fp32 on CPU (bf16 autocast on CUDA), on stdlib docstrings tokenized by a byte-level BPE
(vocab 4096) trained at the start. Interleaved repeats of three runs, medians reported:
  (a) stage:   stages.pretrain.run() with a NullTracker and no progress bar, checkpointing and
               evaluating every 10 steps (the default is every 100); its own tokens/s figure, which
               counts data loading, logging and checkpointing but not evaluation or sampling;
  (a) plain:   the same GPT in a minimal nanoGPT-style loop (random windows, forward, backward, clip,
               step) -> ratio stage / plain, target >= 1.0;
  (b) nanogpt: bench/nanogpt_ref.py of the same width/depth in the same plain loop -> ratio ours / nanoGPT;
  (c) ladder:  after the rounds, our decoder with its parts swapped for nanoGPT's one at a time, cumulatively
               (QK-norm -> none, RMSNorm -> LayerNorm, SwiGLU -> GELU MLP, RoPE -> learned positions,
               GQA -> MHA, then nanoGPT itself), one step of each variant in turn for --steps cycles. Each
               swap's saving as a share of our step time is the `explanation` of the gap; the shares add up to
               1 - t_nanogpt / t_ours of the ladder (tied embeddings are the same in both: no rung).
Ratios are medians of the per-round (ladder: per-cycle) ratios: the runs of one round are seconds apart, so a
change in the machine's load between rounds cancels out. FLOPs per token count matmuls only, the same formula
for both models (`flops_per_token`). MFU only on CUDA (flops_per_token * tokens/s / --peak-tflops).
--only decoder skips the stage runs (a) and needs nothing from stages/. Last line: one JSON object.
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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bench.nanogpt_ref import NanoGPT, NanoGPTConfig, NanoGPTMLP
from models.gpt import GPT, GPTAttention, GPTConfig
from models.tokenizer import SPECIAL_TOKENS
from models.tokenizer import Tokenizer as FamilyTokenizer
from storage.artifacts import Artifact

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
    # imported here so that --only decoder runs without stages/
    from stages import pretrain
    from stages.contract import StageContext
    from storage.tracking import NullTracker

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


def train_step(model: nn.Module, data: np.ndarray, device: torch.device) -> Callable[[], None]:
    """One step of nanoGPT train.py's inner loop and nothing else: random windows, forward, backward,
    clip, AdamW step. The returned closure owns its optimizer and its data generator."""
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        ix = torch.randint(len(data) - SEQ_LEN - 1, (BATCH,), generator=gen).tolist()
        buf = np.stack([data[i : i + SEQ_LEN + 1] for i in ix]).astype(np.int64)  # (B, T+1)
        x, y = torch.from_numpy(buf[:, :-1].copy()).to(device), torch.from_numpy(buf[:, 1:].copy()).to(device)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def plain_loop(model: nn.Module, data: np.ndarray, steps: int, device: torch.device) -> float:
    """`steps` train_step calls; tokens/s over all of them."""
    step = train_step(model, data, device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - t0)


def flops_per_token(model: nn.Module, n_layers: int, attn_width: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a decoder, matmuls only (PaLM, Chowdhery et al. 2022,
    appendix B):

        6 * N_matmul + 12 * n_layers * attn_width * seq_len

    N_matmul is the number of weights in every nn.Linear (a tied output head included, an embedding
    lookup, norm gains and elementwise ops not): each weight costs 2 FLOPs per token forward and 4 backward.
    The second term is QK^T and AV, 2 * seq_len * attn_width FLOPs each per token and layer forward, times
    3 with the backward, counted over the whole window as PaLM does (causal attention needs half).
    attn_width is n_heads * head_dim. GPT.flops_per_token is the same formula for our decoder."""
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6.0 * n_matmul + 12.0 * n_layers * attn_width * seq_len


class GPTAttentionWithoutRope(GPTAttention):
    """GPTAttention.forward copied without apply_rope (keep the two in step): positions come from
    LearnedPositions instead."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LearnedPositions(nn.Module):
    """nanoGPT's input layer in place of our embed_tokens: token embedding + learned absolute positions.
    `weight` stays the token table, so the tied head is unchanged."""

    def __init__(self, embed_tokens: nn.Embedding, max_seq_len: int):
        super().__init__()
        self.wte, self.weight = embed_tokens, embed_tokens.weight
        self.wpe = nn.Embedding(max_seq_len, embed_tokens.embedding_dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, d)


# (rung, the part of ours it swaps for nanoGPT's); each rung keeps the swaps above it
LADDER = (("qk_norm", "QK-norm -> none"), ("rmsnorm", "RMSNorm -> LayerNorm"), ("swiglu", "SwiGLU MLP -> GELU MLP"),
          ("rope", "RoPE -> learned positions"), ("gqa", "GQA -> MHA"), ("implementation", "the rest -> nanoGPT itself"))


def ladder_model(vocab_size: int, rung: int) -> nn.Module:
    """Our decoder with the first `rung` parts of LADDER swapped for nanoGPT's (0: ours; the last: nanoGPT)."""
    swapped = {name for name, _ in LADDER[:rung]}
    if "implementation" in swapped:
        return NanoGPT(NanoGPTConfig(vocab_size=vocab_size, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, max_seq_len=SEQ_LEN))
    cfg = GPTConfig(vocab_size=vocab_size, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS,
                    n_kv_heads=N_HEADS if "gqa" in swapped else N_KV_HEADS, max_seq_len=SEQ_LEN)
    model, nano_cfg = GPT(cfg), NanoGPTConfig(vocab_size=vocab_size, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        if "rope" in swapped:
            layer.self_attn = GPTAttentionWithoutRope(cfg, i)
            layer.self_attn.load_state_dict(attn.state_dict())
            attn = layer.self_attn
        if "qk_norm" in swapped:
            attn.q_norm = attn.k_norm = nn.Identity()
        if "rmsnorm" in swapped:
            layer.input_layernorm, layer.post_attention_layernorm = nn.LayerNorm(D_MODEL, bias=False), nn.LayerNorm(D_MODEL, bias=False)
        if "swiglu" in swapped:
            layer.mlp = NanoGPTMLP(nano_cfg)
    if "rmsnorm" in swapped:
        model.norm = nn.LayerNorm(D_MODEL, bias=False)
    if "rope" in swapped:
        model.embed_tokens = LearnedPositions(model.embed_tokens, SEQ_LEN)
    return model


def run_ladder(vocab_size: int, data: np.ndarray, cycles: int, device: torch.device) -> list[list[float]]:
    """Seconds per step of every rung (0 = ours ... len(LADDER) = nanoGPT), one step of each rung per cycle,
    the order rotated every cycle so that no rung always runs first; two untimed warm-up steps each."""
    steps = []
    for rung in range(len(LADDER) + 1):
        torch.manual_seed(0)
        steps.append(train_step(ladder_model(vocab_size, rung).to(device), data, device))
    for step in steps:
        step(), step()
    times: list[list[float]] = [[] for _ in steps]
    for c in range(cycles):
        for rung in [(c + j) % len(steps) for j in range(len(steps))]:
            t0 = time.perf_counter()
            steps[rung]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[rung].append(time.perf_counter() - t0)
    return times


def explain_gap(times: list[list[float]]) -> dict:
    """Each rung's step time over ours, median of the per-cycle ratios; a swap's share of our step time is the
    drop from the rung above. The shares sum to 1 - t_nanogpt / t_ours, and t_nanogpt / t_ours is the ladder's
    tokens/s ratio ours / nanoGPT."""
    rel = [statistics.median(t / t0 for t, t0 in zip(ts, times[0])) for ts in times]  # rel[0] == 1
    return {
        "ratio_ours_vs_nanogpt_in_ladder": round(rel[-1], 3),
        "gap_share_of_our_step_time": round(1 - rel[-1], 3),
        "share_of_our_step_time_by_part": {what: round(rel[i] - rel[i + 1], 3) for i, (_, what) in enumerate(LADDER)},
        "tokens_per_s_by_rung": {name: round(BATCH * SEQ_LEN / statistics.median(ts))
                                 for name, ts in zip(["ours"] + [f"-{n}" for n, _ in LADDER[:-1]] + ["nanogpt"], times)},
        "tied_embeddings": "tied in both: no rung",
        "how": "our decoder with parts swapped for nanoGPT's one at a time, cumulatively, in this order; a share is "
               "(step time before the swap - after) / our step time; > 0: that part of ours costs time",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three runs")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    ap.add_argument("--only", choices=("all", "decoder"), default="all", help="decoder: skip the stage runs (a)")
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
        nano_cfg = NanoGPTConfig(vocab_size=vocab, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, max_seq_len=SEQ_LEN)
        stage_runs = args.only == "all"
        runs: dict[str, list[float]] = {"stage": [], "stage_end_to_end": []} if stage_runs else {}
        runs |= {"plain_ours": [], "plain_nanogpt": []}
        for r in range(args.repeats):
            if stage_runs:
                own, e2e = run_stage(corpus, args.steps, device.type)
                runs["stage"].append(own)
                runs["stage_end_to_end"].append(e2e)
            torch.manual_seed(0)
            runs["plain_ours"].append(plain_loop(GPT(ours_cfg).to(device), train, args.steps, device))
            torch.manual_seed(0)
            runs["plain_nanogpt"].append(plain_loop(NanoGPT(nano_cfg).to(device), train, args.steps, device))
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()) + " tok/s")
        explanation = explain_gap(run_ladder(vocab, train, args.steps, device))
        fpt_ours = flops_per_token(GPT(ours_cfg), N_LAYERS, N_HEADS * ours_cfg.head_dim, SEQ_LEN)
        fpt_nano = flops_per_token(NanoGPT(nano_cfg), N_LAYERS, D_MODEL, SEQ_LEN)

    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio_ours_vs_nano = statistics.median(a / b for a, b in zip(runs["plain_ours"], runs["plain_nanogpt"]))
    figures = {
        "device": str(device),
        "stage_tokens_per_s": round(med["stage"]) if stage_runs else None,
        "stage_end_to_end_tokens_per_s": round(med["stage_end_to_end"]) if stage_runs else None,
        "plain_ours_tokens_per_s": round(med["plain_ours"]),
        "plain_nanogpt_tokens_per_s": round(med["plain_nanogpt"]),
        "ratio_stage_vs_plain": round(statistics.median(a / b for a, b in zip(runs["stage"], runs["plain_ours"])), 3) if stage_runs else None,
        "ratio_ours_vs_nanogpt": round(ratio_ours_vs_nano, 3),
        "flops_per_token_ours": fpt_ours,
        "flops_per_token_nanogpt": fpt_nano,
        # (tokens/s * FLOPs/token) ours over nanoGPT's: < ratio_ours_vs_nanogpt when ours needs fewer FLOPs per token
        "achieved_flops_ratio": round(ratio_ours_vs_nano * fpt_ours / fpt_nano, 3),
        "explanation": explanation,
        "runs": {k: [round(x) for x in v] for k, v in runs.items()},
    }
    if stage_runs:
        print(f"(a) stage {med['stage']:,.0f} tok/s vs plain loop {med['plain_ours']:,.0f} tok/s: ratio {figures['ratio_stage_vs_plain']:.3f} "
              f"(whole run() incl. setup, evals, export: {med['stage_end_to_end']:,.0f} tok/s)")
    print(f"(b) our decoder {med['plain_ours']:,.0f} tok/s vs nanoGPT {med['plain_nanogpt']:,.0f} tok/s: ratio {figures['ratio_ours_vs_nanogpt']:.3f}; "
          f"{fpt_ours / 1e6:.2f} vs {fpt_nano / 1e6:.2f} MFLOP/token -> {fpt_ours * med['plain_ours'] / 1e9:.1f} vs "
          f"{fpt_nano * med['plain_nanogpt'] / 1e9:.1f} GFLOP/s, ratio {figures['achieved_flops_ratio']:.3f}")
    print(f"(c) ladder: ours/nanoGPT {explanation['ratio_ours_vs_nanogpt_in_ladder']:.3f}; share of our step time by part: "
          + ", ".join(f"{k} {v:+.1%}" for k, v in explanation["share_of_our_step_time_by_part"].items()))
    if device.type == "cuda":
        figures["mfu_stage"] = round(fpt_ours * med["stage"] / (args.peak_tflops * 1e12), 4) if stage_runs else None
        figures["mfu_plain_ours"] = round(fpt_ours * med["plain_ours"] / (args.peak_tflops * 1e12), 4)
        stage_mfu = f"stage {figures['mfu_stage']:.1%}, " if stage_runs else ""
        print(f"MFU: {stage_mfu}plain {figures['mfu_plain_ours']:.1%} of {args.peak_tflops:g} TFLOP/s")
    else:
        figures["mfu"] = None
        print("MFU: not measured (no GPU)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

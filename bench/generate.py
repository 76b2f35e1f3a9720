"""Greedy generation speed: our KV cache against recomputing the sequence, and against HF transformers.

    python -m bench.generate [--repeats R] [--new-tokens N]

A randomly initialised tiny decoder (d_model 128, 4 layers, 4 heads, 2 kv heads, vocab 4096), random
32-token prompts, 64 new tokens, greedy, no stop token, at batch 1 and 16. Per round and batch size,
interleaved so machine noise hits every run alike:
  ours_cache:    models.generate.generate (prefill, then one token per step through the KVCache);
  ours_nocache:  the same with use_cache=False (the whole sequence recomputed each step);
  hf:            transformers' generate on the same weights exported by models.hf_export (Qwen3ForCausalLM,
                 its own dynamic cache and SDPA); skipped with a note when transformers is missing.
Time is the whole call (prefill included); tokens/s = batch * new tokens / time, median over rounds.
The outputs are checked to be token-identical across the three.
Sampling (GRPO's rollouts, evaluate's pass@k): one draw per row from (128, 4096) probabilities, our
models.generate.draw (the row's CDF inverted at one uniform) against torch.multinomial (one
exponential per vocabulary entry), interleaved, median ms per call; and the total-variation distance
of 200,000 draws of each from a fixed 6-token distribution (sampling noise alone: ~0.003).
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from models.generate import draw, generate
from models.gpt import GPT, GPTConfig
from models.hf_export import export_hf

VOCAB, PROMPT_LEN, BATCHES = 4096, 32, (1, 16)


def timed(fn) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians are reported")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_new = args.new_tokens

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                          max_seq_len=PROMPT_LEN + n_new)).to(device).eval()
    prompts = torch.randint(1, VOCAB, (max(BATCHES), PROMPT_LEN)).tolist()

    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        import transformers
    except ImportError:
        transformers = None
        print("transformers is not installed: the HF comparison is skipped")
    hf = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-generate-")
    if transformers is not None:
        export_hf(model, None, tmp.name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp.name).to(device).eval()

    def run_hf(batch: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(batch, device=device)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=0)
        return out[:, PROMPT_LEN:].tolist()

    runners = {"ours_cache": lambda b: generate(model, b, n_new),
               "ours_nocache": lambda b: generate(model, b, n_new, use_cache=False)}
    if hf is not None:
        runners["hf"] = run_hf
    print(f"model d=128 L=4 H=4 KV=2 V={VOCAB}, prompt {PROMPT_LEN}, {n_new} new tokens, greedy, device {device}, "
          f"threads {torch.get_num_threads()}, {args.repeats} rounds")

    times = {(name, B): [] for B in BATCHES for name in runners}
    identical = True
    for B in BATCHES:  # warm-up: first calls pay for allocator and kernel selection
        for run in runners.values():
            run(prompts[:B])
    for r in range(args.repeats):
        for B in BATCHES:
            outs = {}
            for name, run in runners.items():
                t, outs[name] = timed(lambda: run(prompts[:B]))
                times[name, B].append(t)
            identical &= all(o == outs["ours_cache"] for o in outs.values())
        print(f"round {r + 1}: " + "  ".join(f"{name}@B{B} {B * n_new / times[name, B][-1]:,.0f}"
                                             for B in BATCHES for name in runners) + " tok/s")
    tmp.cleanup()

    figures: dict = {"device": str(device), "prompt_len": PROMPT_LEN, "new_tokens": n_new,
                     "outputs_identical": identical, "hf_compared": hf is not None}
    for B in BATCHES:
        tps = {name: B * n_new / statistics.median(times[name, B]) for name in runners}
        for name, v in tps.items():
            figures[f"{name}_b{B}_tokens_per_s"] = round(v, 1)
        figures[f"ratio_cache_vs_nocache_b{B}"] = round(tps["ours_cache"] / tps["ours_nocache"], 3)
        line = (f"B={B:>2}: cache {tps['ours_cache']:,.0f} tok/s | no cache {tps['ours_nocache']:,.0f} tok/s "
                f"(x{figures[f'ratio_cache_vs_nocache_b{B}']:.2f})")
        if hf is not None:
            figures[f"ratio_cache_vs_hf_b{B}"] = round(tps["ours_cache"] / tps["hf"], 3)
            line += f" | HF generate {tps['hf']:,.0f} tok/s (ours x{figures[f'ratio_cache_vs_hf_b{B}']:.2f})"
        print(line)
    print(f"outputs identical across runs: {identical}")
    figures.update(sampling(args.repeats, device))
    print(f"sampling (128, 4096): draw {figures['draw_ms_b128']:.2f} ms, torch.multinomial "
          f"{figures['multinomial_ms_b128']:.2f} ms (x{figures['ratio_multinomial_vs_draw']:.1f}); total variation "
          f"from the true distribution {figures['draw_tv']:.4f} vs {figures['multinomial_tv']:.4f}")
    print(json.dumps(figures))


def sampling(repeats: int, device: torch.device) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    probs = (torch.randn(128, 4096, generator=g, device=device) * 3).softmax(-1)
    samplers = {"draw": lambda p: draw(p, g), "multinomial": lambda p: torch.multinomial(p, 1, generator=g).squeeze(-1)}
    ms: dict[str, list[float]] = {k: [] for k in samplers}
    for f in samplers.values():
        f(probs)
    for _ in range(repeats):
        for name, f in samplers.items():
            t0 = time.perf_counter()
            for _ in range(20):
                f(probs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms[name].append((time.perf_counter() - t0) / 20 * 1000)
    true = torch.tensor([0.05, 0.5, 0.0, 0.15, 0.25, 0.05], device=device)
    out = {f"{k}_ms_b128": round(statistics.median(v), 3) for k, v in ms.items()}
    out["ratio_multinomial_vs_draw"] = round(out["multinomial_ms_b128"] / out["draw_ms_b128"], 2)
    for name, f in samplers.items():
        freq = torch.bincount(f(true.repeat(200_000, 1)), minlength=len(true)).double() / 200_000
        out[f"{name}_tv"] = round(0.5 * float((freq - true.double()).abs().sum()), 4)
    return out


if __name__ == "__main__":
    main()

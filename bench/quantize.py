"""Size and CPU generation speed of the quantized members: ours (fp32, int8, int4) against llama.cpp
on the GGUF files of the same models, side by side in one run.

    python -m bench.quantize [--home DIR] [--new-tokens N] [--repeats R] [--threads T]

After `family run` (the quantize stage built): for the chat model and `small`, the bytes of our model
directories (fp32 model.safetensors, int8 and int4 with packed codes) and of the GGUF files (F16,
Q8_0, Q4_0); then greedy generation at batch 1 from the same chat prompt, N new tokens without a
stop token, the time of the whole call (prefill included), median over R interleaved rounds:
  ours_fp32, ours_int8, ours_int4: models/generate.py with the plain GPT and with QuantLinear (which
      dequantizes its weights on every call: smaller, not faster);
  llama_f16, llama_q8_0, llama_q4_0: llama-cpp-python (llama.cpp) on the GGUF files, T threads,
      the same prompt tokens and argmax decoding; skipped with a note when llama_cpp is not installed.
torch runs with T threads too. Last line: one JSON object {model: {sizes, tokens_per_s}}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from models.generate import generate
from models.quant import load_model
from models.tokenizer import Tokenizer
from stages.chat.evaluate import prompt_ids

PROMPT = [{"role": "user", "content": "What is 47 + 58?"}]


def latest(home: Path, stage: str) -> Path | None:
    found = sorted((home / "artifacts" / stage).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def ours(model_dir: Path, ids: list[int], n: int) -> float:
    model = load_model(model_dir).eval()
    t0 = time.perf_counter()
    out = generate(model, [ids], n)
    assert len(out[0]) == n
    return n / (time.perf_counter() - t0)


def plain_cpu_kernels() -> None:
    """llama.cpp's CPU extra buffer types (AMX / repacked Q4_0, Q8_0 weights) crash this build on our
    tiny tensors (tests/models/test_llama_cpp.py): load with the plain kernels (llama.cpp --no-repack)."""
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params


def llama(path: Path, ids: list[int], n: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids) + n + 8, n_threads=threads, n_batch=64, verbose=False,
                logits_all=True)
    t0 = time.perf_counter()
    llm.eval(ids)
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    rate = n / (time.perf_counter() - t0)
    llm.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=".family")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    home = Path(args.home)
    q = latest(home, "quantize")
    if q is None:
        raise SystemExit(f"bench.quantize: no quantize artifact in {home}; run `family run` first")
    try:
        import llama_cpp  # noqa: F401
        plain_cpu_kernels()
        have_llama = True
    except ImportError:
        have_llama = False
        print("note: llama_cpp is not installed (pip install -e '.[test]'): llama.cpp columns skipped")
    grpo = latest(home, "grpo") / "grpo"
    small = latest(home, "distill") / "small"
    report = {}
    for member, fp32 in (("chat", grpo), ("small", small)):
        tok = Tokenizer.load(fp32)
        ids = prompt_ids(tok, PROMPT)
        dirs = {"ours_fp32": fp32, "ours_int8": q / f"{member}_int8", "ours_int4": q / f"{member}_int4"}
        ggufs = {f"llama_{t}": q / "gguf" / f"{member}-{t}.gguf" for t in ("f16", "q8_0", "q4_0")}
        sizes = {k: (d / "model.safetensors").stat().st_size for k, d in dirs.items()}
        sizes |= {k: p.stat().st_size for k, p in ggufs.items()}
        rates: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for k, d in dirs.items():
                rates.setdefault(k, []).append(ours(d, ids, args.new_tokens))
            if have_llama:
                for k, p in ggufs.items():
                    rates.setdefault(k, []).append(llama(p, ids, args.new_tokens, args.threads))
        tps = {k: statistics.median(v) for k, v in rates.items()}
        report[member] = {"bytes": sizes, "tokens_per_s": tps,
                          "size_vs_fp32": {k: sizes["ours_fp32"] / v for k, v in sizes.items()}}
        print(f"{member}: " + ", ".join(f"{k} {v / 1e6:.2f} MB {tps.get(k, float('nan')):.0f} tok/s" for k, v in sizes.items()))
    report["new_tokens"], report["threads"], report["llama_cpp"] = args.new_tokens, args.threads, have_llama
    print(json.dumps(report))


if __name__ == "__main__":
    main()

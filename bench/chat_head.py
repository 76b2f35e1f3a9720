"""What the output head costs the chat trainers: a training step with the head on every position
against the head only where the loss reads (GPT.forward's `at`), side by side in one run.

    python -m bench.chat_head [--reps N] [--threads T]

The tiny recipe's shapes, random weights (the cost does not depend on them), on batches shaped like
the stages' own:
  sft       8 packed rows of 256 tokens, conversations of ~49 tokens (doc_ids), 41% of the
            positions are assistant targets (the tiny chat data's share),
  distill   the half-width student's training step plus the teacher's forward, on 16 right-padded
            conversations of up to 80 tokens, 20% of the positions scored (the tiny data's share of a
            padded batch),
  logps     a DPO / GRPO policy step (stages/chat/preference.token_logps, forward + backward) on 16
            sequences of 96 tokens with a 32-token response each.
Each case: the median seconds of `reps` steps each way after one warm-up, and their ratio; the losses
of both ways agree (checked here). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from models.gpt import GPT, GPTConfig
from stages.chat.preference import response_mask, token_logps
from stages.distill import IGNORE, distill_loss

TINY = dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=256)
STUDENT = TINY | dict(d_model=64, n_heads=2, n_kv_heads=1, d_ff=160)


def timed(fn, reps: int) -> tuple[float, float]:
    """(median seconds of a call after one warm-up, the last call's loss)."""
    loss = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def steps_of(model: GPT, loss_of: Callable[[bool], torch.Tensor]) -> Callable[[bool], Callable[[], float]]:
    """step(at) -> a training step (loss_of(at): the forward's loss, with the head at the scored
    positions or everywhere; then backward) that returns the loss."""
    def step(at: bool):
        def run() -> float:
            loss = loss_of(at)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.item()
        return run
    return step


def sft_case(reps: int) -> dict[str, float]:
    model = GPT(GPTConfig(**TINY)).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 4096, (8, 256), generator=g)
    docs = (torch.arange(256) // 49).expand(8, 256).contiguous()
    y = torch.where(torch.rand(8, 256, generator=g) < 0.41, x.roll(-1, 1), torch.full_like(x, IGNORE))

    return compare(steps_of(model, lambda at: model(x, y, doc_ids=docs, at=y != IGNORE if at else None)[1]), reps)


def distill_case(reps: int) -> dict[str, float]:
    student, teacher = GPT(GPTConfig(**STUDENT)).train(), GPT(GPTConfig(**TINY)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(20, 81, (16,), generator=g)
    x = torch.randint(3, 4096, (16, 80), generator=g)
    pos = torch.arange(80)[None]
    y = torch.where((pos < lengths[:, None]) & (torch.rand(16, 80, generator=g) < 0.33), x.roll(-1, 1),
                    torch.full_like(x, IGNORE))

    mask = y != IGNORE

    def loss_of(at: bool) -> torch.Tensor:
        s = student(x, at=mask if at else None)[0]
        with torch.no_grad():
            t = teacher(x, at=mask if at else None)[0]
        return distill_loss(s, t, y[mask] if at else y, 0.5)[0]
    return compare(steps_of(student, loss_of), reps)


def logps_case(reps: int) -> dict[str, float]:
    model = GPT(GPTConfig(**TINY)).train()
    ids = torch.randint(3, 4096, (16, 96), generator=torch.Generator().manual_seed(2))
    mask = response_mask([64] * 16, [96] * 16, 96)

    def loss_of(at: bool) -> torch.Tensor:
        lp = token_logps(model, ids, mask) if at else token_logps(model, ids) * mask
        return -lp.sum() / mask.sum()
    return compare(steps_of(model, loss_of), reps)


def compare(step, reps: int) -> dict[str, float]:
    full_s, full_loss = timed(step(False), reps)
    at_s, at_loss = timed(step(True), reps)
    if abs(full_loss - at_loss) > 1e-4 * max(1.0, abs(full_loss)):
        raise SystemExit(f"bench.chat_head: the losses differ ({full_loss} vs {at_loss})")
    return {"full_s": round(full_s, 4), "at_s": round(at_s, 4), "speedup": round(full_s / at_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"bench": "chat_head", "threads": args.threads}
    for name, case in (("sft", sft_case), ("distill", distill_case), ("logps", logps_case)):
        out[name] = case(args.reps)
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

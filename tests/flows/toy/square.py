"""Toy stage: squares the numbers, after a checkpointed "training loop" that can be killed mid-way."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from stages.contract import StageContext, StageResult
from storage import checkpoints
from storage.parquet import read_table
from tests.flows.toy.common import NUMBERS, log_call


@dataclass(frozen=True)
class Config:
    power: int = 2
    steps: int = 5
    step_sleep_s: float = 0.0
    warn: str = ""  # a warning the result carries, as a trainer's safety cap that fired does


INPUTS = ("numbers",)
OUTPUTS = ("squares",)


def run(cfg: Config, inputs, ctx: StageContext) -> StageResult:
    xs = read_table(inputs["numbers"].path, NUMBERS).column("x").to_pylist()
    start, acc = 0, 0
    ckpt_dir = ctx.checkpoint_dir / f"rank{ctx.rank}" if ctx.world_size > 1 else ctx.checkpoint_dir
    last = checkpoints.latest(ckpt_dir)
    if last is not None:
        _, _, meta = checkpoints.load(last)
        start, acc = meta["step"], meta["acc"]
    out = ctx.output("squares")
    out.mkdir(parents=True, exist_ok=True)
    for step in range(start, cfg.steps):
        acc += step
        checkpoints.save(ckpt_dir, step + 1, {}, meta={"acc": acc})
        ctx.progress(step + 1, cfg.steps, "steps")
        ctx.tracker.log_metrics({"acc": acc}, step=step)
        (out / "squares.json").write_text("[1, 4")  # a half-written output while "training"
        time.sleep(cfg.step_sleep_s)
    squares = [x**cfg.power for x in xs]
    (out / "squares.json").write_text(json.dumps(squares))
    log_call("square")
    return StageResult(outputs={"squares": {"n": len(xs)}}, metrics={"sum": float(sum(squares)), "resumed_from": float(start), "acc": float(acc)},
                       warnings=[cfg.warn] if cfg.warn else [])


if __name__ == "__main__":
    import sys

    from stages.contract import main

    raise SystemExit(main(sys.modules[__name__]))

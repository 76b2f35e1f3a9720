"""Toy stage: writes the numbers 0..n-1 as Parquet shards."""
from __future__ import annotations

import time
from dataclasses import dataclass

from stages.contract import StageContext, StageError, StageResult
from storage.parquet import ShardWriter
from tests.flows.toy.common import NUMBERS, log_call


@dataclass(frozen=True)
class Config:
    n: int = 10
    sleep_s: float = 0.0
    fail: bool = False
    notes_file: str = ""  # a user file: its content is part of the fingerprint


INPUTS: tuple[str, ...] = ()
OUTPUTS = ("numbers",)
INPUT_FILES = ("notes_file",)


def run(cfg: Config, inputs, ctx: StageContext) -> StageResult:
    if cfg.fail:
        raise StageError("source: asked to fail (source.fail=true)")
    with ShardWriter(ctx.output("numbers"), NUMBERS, rows_per_shard=4) as w:
        for i in range(cfg.n):
            w.write({"x": i})
            ctx.progress(i + 1, cfg.n, "numbers")
            time.sleep(cfg.sleep_s)
    log_call("source")
    return StageResult(outputs={"numbers": {"rows": cfg.n}}, metrics={"rows": cfg.n})

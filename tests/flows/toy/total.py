"""Toy stage: adds up the squares."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stages.contract import StageContext, StageResult
from tests.flows.toy.common import log_call


@dataclass(frozen=True)
class Config:
    scale: float = 1.0
    crash: bool = False  # an internal error (a bug), not a user error


INPUTS = ("squares",)
OUTPUTS = ("total",)


def run(cfg: Config, inputs, ctx: StageContext) -> StageResult:
    squares = json.loads((Path(inputs["squares"].path) / "squares.json").read_text())
    if cfg.crash:
        {}["no such key"]
    total = cfg.scale * sum(squares)
    ctx.output("total").write_text(json.dumps({"total": total}))
    log_call("total")
    return StageResult(outputs={"total": {}}, metrics={"total": total}, tables={"rows": [{"total": total}]})

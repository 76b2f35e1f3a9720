"""Shared bits of the toy stages used to test the backbone's mechanics."""
from __future__ import annotations

import os

import pyarrow as pa

NUMBERS = pa.schema([("x", pa.int64())])


def log_call(name: str) -> None:
    """Append the stage name to $TOY_CALLS_LOG, so tests can see which stage bodies actually ran."""
    log = os.environ.get("TOY_CALLS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")

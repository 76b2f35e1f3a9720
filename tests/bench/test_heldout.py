"""bench.heldout: fresh problems are new by question and by problem (equivalence key), seeded."""
from __future__ import annotations

from bench import heldout
from stages import instruct


def test_fresh_problems_skip_written_questions_and_trained_problems():
    cfg = instruct.Config(arith_max=30, arith_ops="+", n_count=0)
    first, _ = heldout.fresh_items(cfg, set(), set(), list(instruct.FALLBACK_WORDS), 50, seed=0)
    again, _ = heldout.fresh_items(cfg, set(), set(), list(instruct.FALLBACK_WORDS), 50, seed=0)
    other, _ = heldout.fresh_items(cfg, set(), set(), list(instruct.FALLBACK_WORDS), 50, seed=1)
    assert first == again and first["arith"] != other["arith"]
    trained = {it.key for it in first["arith"][:10]}  # "a + b" trained: "b + a" is not new either
    seen = {it.question for it in first["string"][:5]}
    items, dropped = heldout.fresh_items(cfg, seen, trained, list(instruct.FALLBACK_WORDS), 50, seed=0)
    assert not {it.key for it in items["arith"]} & trained and not {it.question for it in items["string"]} & seen
    assert dropped["arith"] >= 10 and dropped["string"] >= 5
    assert len(items["arith"]) == 50

"""Pairwise accuracy shared by reward and DPO: ties count half, groups by task and kind, intervals."""
from __future__ import annotations

import math

import pytest
import torch

from models.gpt import GPT, GPTConfig
from stages.chat.preference import (
    Pair, accuracy_by_kind, accuracy_by_task, compare, compare_markdown, mean_ci95, pair_scores, response_mask,
    token_logps, wilson,
)
from stages.contract import StageError


def pairs(kinds: str) -> list[Pair]:
    return [Pair(str(i), [], [], [], [], [], task="arith" if i % 2 else "count", kind={"n": "near_miss", "s": "slip"}[k])
            for i, k in enumerate(kinds)]


def test_a_tie_is_half_right():
    assert pair_scores(torch.tensor([1.0, 0.0, -2.0, 0.0])) == [1.0, 0.5, 0.0, 0.5]
    assert sum(pair_scores(torch.zeros(7))) / 7 == 0.5  # the reference against itself is at chance


def test_accuracy_by_task_and_kind():
    ps, scores = pairs("nnss"), [1.0, 0.0, 0.5, 1.0]
    assert accuracy_by_kind(ps, scores, "pair_acc") == {"pair_acc/near_miss": 0.5, "pair_acc/slip": 0.75}
    assert accuracy_by_task(ps, scores, "pair_acc") == {"pair_acc/arith": 0.5, "pair_acc/count": 0.75}
    assert accuracy_by_kind([Pair("x", [], [], [], [], [])], [1.0], "a") == {}  # an imported pair has no kind


def test_interval_and_paired_gain_by_hand():
    mean, half = mean_ci95([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and half == pytest.approx(1.96 * math.sqrt(0.25 / 4))
    lo, hi = wilson(1.0, 16)  # all right: the interval still has width (a normal one would be 0)
    assert hi == 1.0 and lo == pytest.approx(16 / (16 + 1.96 ** 2))
    lo, hi = wilson(0.5, 100)
    assert (lo, hi) == (pytest.approx(0.5 - 0.0958, abs=1e-3), pytest.approx(0.5 + 0.0958, abs=1e-3))
    ps = pairs("nnnsss")
    rows = {r["pairs"]: r for r in compare(ps, [1, 1, 1, 1, 0, 1], {"prior": [1, 1, 1, 0, 0, 1]})}
    assert set(rows) == {"all", "near_miss", "slip", "near_miss/arith", "near_miss/count", "slip/arith", "slip/count"}
    slip = rows["slip"]
    assert (slip["n"], slip["acc"], slip["prior"], slip["gain_over_prior"]) == (3, pytest.approx(2 / 3), pytest.approx(1 / 3),
                                                                                pytest.approx(1 / 3))
    # differences 1, 0, 0: mean 1/3, sample variance ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3
    assert slip["gain_over_prior_ci95"] == pytest.approx(1.96 * math.sqrt(1 / 3 / 3))
    assert rows["near_miss"]["gain_over_prior"] == 0 == rows["near_miss"]["gain_over_prior_ci95"]
    md = compare_markdown(list(rows.values()), "trained", {"prior": "untrained prior"})
    assert md.splitlines()[0] == "| pairs | n | trained | untrained prior | gain over it |"


def test_trainers_never_read_the_test_split(tmp_path):
    """reward and DPO read train and val pairs only; the held-out prompts every chat stage scores are val."""
    from stages.chat.evaluate import pick_heldout
    from stages.chat.preference import train_val_pairs
    from storage.parquet import write_table
    from tests.stages.alignment_toy import make_tokenizer

    turn = lambda role, text: [{"role": role, "content": text}]
    rows = [{"id": f"{split}{i}", "prompt": turn("user", f"Say {i}."), "chosen": turn("assistant", "a"),
             "rejected": turn("assistant", "b"), "task": "t", "source": "toy", "split": split, "key": f"k{i}",
             "kind": "near_miss"} for i, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 3)]
    write_table(rows, tmp_path / "prefs" / "part-00000.parquet", "prefs")
    train, val, _ = train_val_pairs(tmp_path / "prefs", make_tokenizer(), 64, 2, 10, "x")
    assert {p.id[:-1] for p in train} == {"train"} and {p.id[:-1] for p in val} == {"val"}
    assert {r["split"] for r in pick_heldout(rows, 10)} == {"val"}
    assert len(train_val_pairs(tmp_path / "prefs", make_tokenizer(), 64, 2, 10, "x", train_kinds=("near_miss",))[0]) == 4
    with pytest.raises(StageError, match="0 train of kinds \\['slip'\\]"):
        train_val_pairs(tmp_path / "prefs", make_tokenizer(), 64, 2, 10, "x", train_kinds=("slip",))


def test_token_logps_on_a_mask_equal_the_full_ones_there_and_are_zero_elsewhere():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)).eval()
    ids = torch.randint(0, 61, (3, 10))
    mask = response_mask([4, 2, 9], [10, 7, 10], 10)  # (3, 9)
    full, part = token_logps(model, ids), token_logps(model, ids, mask)
    torch.testing.assert_close(part[mask], full[mask])
    assert (part[~mask] == 0).all() and mask.sum() == 6 + 5 + 1


def test_batch_order_buckets_by_length_within_windows_and_resumes():
    import numpy as np

    from stages.chat.preference import BatchOrder
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=203).tolist()
    plain, bucketed = BatchOrder(203, 8, 3), BatchOrder(203, 8, 3, lengths=lengths, window=4)
    epoch_plain = [plain.next() for _ in range(25)]
    epoch_bucketed = [bucketed.next() for _ in range(25)]
    # without lengths the order is the seeded permutation, as before
    assert sum(epoch_plain, []) == np.random.default_rng([3, 0]).permutation(203)[:200].tolist()
    # the same examples in the epoch, each window holding the plain order's examples of that window
    assert sorted(sum(epoch_bucketed, [])) == sorted(sum(epoch_plain, []))
    for w in range(0, 25, 4):
        assert sorted(sum(epoch_bucketed[w:w + 4], [])) == sorted(sum(epoch_plain[w:w + 4], []))

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(epoch_bucketed) < 0.5 * padding(epoch_plain)
    # a new epoch reshuffles; a resumed order continues exactly
    nxt = bucketed.next()
    assert nxt not in epoch_bucketed
    again = BatchOrder(203, 8, 3, lengths=lengths, window=4)
    again.load_state_dict({"epoch": 0, "position": 80})
    assert [again.next() for _ in range(16)] == epoch_bucketed[10:] + [nxt]
    with pytest.raises(ValueError, match="3 lengths for 203"):
        BatchOrder(203, 8, 3, lengths=[1, 2, 3])

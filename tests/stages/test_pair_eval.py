"""stages/chat/pair_eval.py: the reward model and DPO on the test preference pairs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages import reward
from stages.chat.pair_eval import pair_figures
from stages.report import html
from storage.parquet import read_table, write_table
from tests.conftest import artifact, make_ctx
from tests.stages.alignment_toy import make_model_dir, write_prefs


def test_pair_figures_on_test_pairs_match_the_stages_own_on_the_same_pairs(tmp_path):
    """The test rows here are the val rows under another split name, so the reward model's test
    figures must be what the reward stage measured on val, its prior the stage's step-0 accuracy; DPO
    given the reference itself ties every pair: chance exactly."""
    sft = make_model_dir(tmp_path / "sft")
    rows = read_table(write_prefs(tmp_path / "toy"), "prefs").to_pylist()
    rows = [r | {"kind": "slip" if i % 3 == 0 else "near_miss"} for i, r in enumerate(rows)]
    rows += [r | {"id": "t:" + r["id"], "split": "test"} for r in rows if r["split"] == "val"]
    write_table(rows, tmp_path / "prefs" / "part-00000.parquet", "prefs")
    prefs = tmp_path / "prefs"
    ctx = make_ctx(tmp_path / "rm")
    cfg = reward.Config(max_steps=20, batch_size=8, lr=3e-3, eval_every=20, ckpt_every=20, eval_pairs=10_000)
    stage = reward.run(cfg, {"sft": artifact("sft", sft), "prefs": artifact("prefs", prefs)}, ctx).metrics

    figures, table = pair_figures(prefs, sft, ctx.output("reward_model"), sft, 10_000, 16, torch.device("cpu"))
    n_val = sum(r["split"] == "val" for r in rows)
    assert figures["reward_model/pairs"] == n_val
    for at in ("", "/slip", "/near_miss"):
        assert figures[f"reward_model/pair_acc{at}"] == pytest.approx(stage[f"val_pair_acc{at}"])
        assert figures[f"reward_model/prior_pair_acc{at}"] == pytest.approx(stage[f"val_prior_pair_acc{at}"])
        assert figures[f"reward_model_vs_prior/pair_acc_delta{at}"] == pytest.approx(stage[f"val_pair_gain{at}"])
        lo, hi = figures[f"reward_model/pair_acc_lo{at}"], figures[f"reward_model/pair_acc_hi{at}"]
        assert lo <= figures[f"reward_model/pair_acc{at}"] <= hi
        assert figures[f"dpo/pair_acc{at}"] == 0.5 and figures[f"dpo_vs_chance/pair_acc_delta{at}"] == 0.0
        assert figures[f"dpo_policy_vs_ref/pair_acc_delta{at}"] == 0.0
    assert {r["member"] for r in table} == {"reward_model", "dpo", "dpo policy likelihood"}
    page = html.pairs_section({"pairs": table})
    assert page.count("<tr>") == len(table) + 1 and "untrained prior" in page


def test_no_test_pairs_gives_nothing(tmp_path):
    sft = make_model_dir(tmp_path / "sft", steps=2)
    prefs = write_prefs(tmp_path / "prefs")  # train and val only
    assert pair_figures(prefs, sft, None, Path(sft), 100, 16, torch.device("cpu")) == ({}, [])
    assert "No test preference pairs" in html.pairs_section({"pairs": []})

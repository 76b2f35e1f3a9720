"""Reward stage: the Bradley-Terry loss, a short run that learns the toy preference, exact resume."""
from __future__ import annotations

import math

import pytest
import torch

from models.heads import RewardModel, score
from models.tokenizer import Tokenizer
from stages import reward
from stages.contract import StageError
from storage.parquet import read_table, write_table
from tests.conftest import artifact, make_ctx
from tests.stages.alignment_toy import make_model_dir, write_prefs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_world")
    sft = make_model_dir(root)
    return {"sft": artifact("sft", sft), "prefs": artifact("prefs", write_prefs(root / "prefs")),
            "easy_prefs": artifact("prefs", write_prefs(root / "easy_prefs", refusals=True))}


def test_bradley_terry_loss_by_hand():
    losses = reward.bradley_terry_loss(torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0]))
    expected = [math.log(1 + math.exp(-1.0)), math.log(2.0), math.log(1 + math.exp(3.0))]
    torch.testing.assert_close(losses, torch.tensor(expected))


def test_short_run_separates_an_easy_preference(world, tmp_path):
    ctx = make_ctx(tmp_path)
    cfg = reward.Config(max_steps=30, batch_size=16, lr=1e-3, eval_every=15, ckpt_every=30, log_every=10)
    result = reward.run(cfg, {"sft": world["sft"], "prefs": world["easy_prefs"]}, ctx)
    assert result.metrics["val_pair_acc"] > 0.9, result.summary
    assert result.metrics["val_pair_acc/refusal"] == result.metrics["val_pair_acc"]  # one task: the same pairs
    assert [r["step"] for r in result.tables["eval_curve"]] == [0, 15, 30]
    # the untrained prior (step 0, the SFT model's own likelihood) beside it, on the same pairs
    assert result.metrics["val_prior_pair_acc"] == result.tables["eval_curve"][0]["val_pair_acc"]
    (row,) = [r for r in result.tables["versus_prior"] if r["pairs"] == "all"]
    assert row["prior"] == pytest.approx(result.metrics["val_prior_pair_acc"]) and row["acc"] == pytest.approx(result.metrics["val_pair_acc"])
    assert result.metrics["val_pair_gain"] == pytest.approx(row["acc"] - row["prior"]) and row["gain_over_prior_ci95"] >= 0
    out = ctx.output("reward_model")
    rm, tok = RewardModel.from_pretrained(out), Tokenizer.load(out)
    prompt = [{"role": "user", "content": "Just c."}]  # a held-out phrasing
    assert score(rm, tok, prompt, "c") > score(rm, tok, prompt, "I will not say that.")
    assert (out / "tokenizer.json").is_file() and (out / "meta.json").is_file()


def test_reward_learns_which_letter_was_asked(world, tmp_path):
    """The harder preference: the reward must compare the reply with the prompt."""
    cfg = reward.Config(max_steps=80, batch_size=16, lr=3e-3, eval_every=80, ckpt_every=80)
    result = reward.run(cfg, {"sft": world["sft"], "prefs": world["prefs"]}, make_ctx(tmp_path))
    assert result.metrics["val_pair_acc"] > 0.75, result.summary


def test_pair_accuracy_counts_ties_half_and_reports_kinds(world, tmp_path):
    """A head that cannot tell the replies apart scores chance, 0.5; each kind of pair is reported."""
    rows = [r | {"kind": "slip" if i % 3 == 0 else "near_miss"} for i, r in enumerate(read_table(world["prefs"].path, "prefs").to_pylist())]
    write_table(rows, tmp_path / "prefs" / "part-00000.parquet", "prefs")
    cfg = reward.Config(max_steps=2, batch_size=8, lr=1e-3, eval_every=2, ckpt_every=2)
    result = reward.run(cfg, {"sft": world["sft"], "prefs": artifact("prefs", tmp_path / "prefs")}, make_ctx(tmp_path / "run"))
    assert {"val_pair_acc/slip", "val_pair_acc/near_miss", "val_prior_pair_acc/slip", "val_pair_gain/slip",
            "val_pair_gain_ci95/slip", "val_pair_acc_ci95/near_miss"} <= set(result.metrics)
    assert {r["pairs"] for r in result.tables["versus_prior"]} == {"all", "near_miss", "slip", "near_miss/letter", "slip/letter"}
    assert "| slip |" in result.summary and "untrained prior" in result.summary


def test_resume_continues_exactly(world, tmp_path):
    cfg = reward.Config(max_steps=4, batch_size=8, lr=1e-3, ckpt_every=2, eval_every=2, eval_pairs=8)
    straight = make_ctx(tmp_path / "straight")
    world = {"sft": world["sft"], "prefs": world["prefs"]}
    reward.run(cfg, world, straight)
    resumed = make_ctx(tmp_path / "resumed")
    reward.run(reward.Config(**{**cfg.__dict__, "max_steps": 2}), world, resumed)  # "crashes" after step 2
    reward.run(cfg, world, resumed)
    a = RewardModel.from_pretrained(straight.output("reward_model")).state_dict()
    b = RewardModel.from_pretrained(resumed.output("reward_model")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_few_pairs_is_a_stage_error(world, tmp_path):
    with pytest.raises(StageError, match="batch_size=1000"):
        reward.run(reward.Config(batch_size=1000), {"sft": world["sft"], "prefs": world["prefs"]}, make_ctx(tmp_path))


def chosen_loglik(model_dir, prefs) -> float:
    """The mean log-likelihood of the val pairs' chosen replies under a reward model's backbone."""
    rm, tok = RewardModel.from_pretrained(model_dir), Tokenizer.load(model_dir)
    _, val, _ = reward.train_val_pairs(prefs.path, tok, rm.backbone.cfg.max_seq_len, 8, 64, "reward")
    with torch.no_grad():
        _, _, loglik, _ = reward.pair_rewards(rm.eval(), val, tok.pad_id, torch.device("cpu"), with_loglik=True)
    return loglik.mean().item()


def test_lm_coef_adds_the_chosen_replies_language_modelling_loss(world, tmp_path):
    """With lm_coef the backbone also learns to write the chosen replies: their held-out likelihood rises
    above a Bradley-Terry-only run of the same steps; a negative weight is one line."""
    inputs = {"sft": world["sft"], "prefs": world["prefs"]}
    base = dict(max_steps=20, batch_size=8, lr=1e-3, eval_every=20, ckpt_every=20)
    plain, lm = make_ctx(tmp_path / "plain"), make_ctx(tmp_path / "lm")
    reward.run(reward.Config(**base), inputs, plain)
    reward.run(reward.Config(**base, lm_coef=2.0), inputs, lm)
    assert chosen_loglik(lm.output("reward_model"), world["prefs"]) > chosen_loglik(plain.output("reward_model"), world["prefs"]) + 0.05
    with pytest.raises(ValueError, match="lm_coef must be >= 0"):
        reward.Config(lm_coef=-1.0).validate()

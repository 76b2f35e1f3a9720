"""Reward stage: the Bradley-Terry loss, a short run that learns the toy preference, exact resume."""
from __future__ import annotations

import math

import pytest
import torch

from models.heads import RewardModel, score
from models.tokenizer import Tokenizer
from stages import reward
from stages.contract import StageError
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

"""DPO stage: the loss against hand-computed values and TRL's sigmoid formula, a short run, exact resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.gpt import GPT
from stages import dpo
from tests.conftest import artifact, make_ctx
from tests.stages.alignment_toy import make_model_dir, write_prefs, write_prompts


def trl_sigmoid_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing):
    """TRL's DPOTrainer.dpo_loss for loss_type="sigmoid", re-typed from its documentation and source."""
    logratios = chosen_logps - rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = logratios - ref_logratios
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def test_dpo_loss_by_hand():
    # h = (-1 - -1.5) - (-2 - -1.5) = 1; beta h = 0.5
    args = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])]
    losses, rc, rr = dpo.dpo_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    assert (rc.item(), rr.item()) == pytest.approx((0.25, -0.25))
    smoothed, _, _ = dpo.dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5)))


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
    logps = torch.tensor([-3.0, -7.0])
    losses, rc, rr = dpo.dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))
    assert rc.abs().max() == 0 and rr.abs().max() == 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_equals_trl_sigmoid_formula(label_smoothing):
    g = torch.Generator().manual_seed(0)
    inputs = [-20 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4)]
    ours = dpo.dpo_loss(*inputs, beta=0.1, label_smoothing=label_smoothing)
    theirs = trl_sigmoid_dpo(*inputs, beta=0.1, label_smoothing=label_smoothing)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo.dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # -beta * sigma(0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_world")
    return {"sft": artifact("sft", make_model_dir(root)), "prefs": artifact("prefs", write_prefs(root / "prefs")),
            "prompts": artifact("prompts", write_prompts(root / "prompts"))}


def test_short_run_increases_margins_and_accuracy(world, tmp_path):
    ctx = make_ctx(tmp_path)
    cfg = dpo.Config(max_steps=60, batch_size=16, lr=2e-3, beta=0.5, rpo_alpha=0.2, eval_every=30, ckpt_every=30, log_every=10)
    result = dpo.run(cfg, world, ctx)
    margins = [m for _, m in ctx.tracker.metrics["train/rewards/margins"]]
    assert margins[-1] > margins[0] and margins[-1] > 0, margins
    curve = result.tables["eval_curve"]
    assert curve[0]["val_pref_acc"] == 0.5  # the policy is the reference: every margin is exactly 0, a tie, chance
    assert curve[0]["val_logp_acc"] == curve[0]["val_ref_logp_acc"] == result.metrics["val_ref_logp_acc"]
    assert result.metrics["val_pref_acc"] > 0.8, result.summary
    assert [k for k in result.metrics if k.startswith("val_pref_acc/")] == ["val_pref_acc/letter"]
    # against chance and against the reference's own likelihood preference, with intervals
    chance = {r["pairs"]: r for r in result.tables["versus_chance"]}["all"]
    assert chance["chance"] == 0.5 and chance["acc"] == pytest.approx(result.metrics["val_pref_acc"])
    assert chance["ci95"] > 0 and chance["gain_over_chance"] == pytest.approx(chance["acc"] - 0.5)
    ref = {r["pairs"]: r for r in result.tables["versus_reference"]}["all"]
    assert ref["reference"] == pytest.approx(result.metrics["val_ref_logp_acc"]) and ref["n"] == 24  # 2 templates x 4 x 3
    assert result.metrics["val_logp_gain"] == pytest.approx(ref["acc"] - ref["reference"])
    assert "Likelihood preference" in result.summary
    assert result.metrics["acc/say"] > result.metrics["sft_acc/say"], result.summary
    out = ctx.output("dpo")
    assert {"model.safetensors", "config.json", "tokenizer.json", "meta.json"} <= {p.name for p in out.iterdir()}
    heldout = json.loads((out / "meta.json").read_text())["heldout"]  # what grpo reuses instead of re-decoding
    assert heldout["acc"]["acc/say"] == result.metrics["acc/say"] and heldout["sft_acc"]["acc/say"] == result.metrics["sft_acc/say"]
    assert (out / "hf" / "model.safetensors").is_file()
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies"):
        assert key in ctx.tracker.metrics


def test_resume_continues_exactly(world, tmp_path):
    cfg = dpo.Config(max_steps=4, batch_size=8, lr=1e-3, ckpt_every=2, eval_every=2, eval_pairs=8, eval_per_task=0)
    straight = make_ctx(tmp_path / "straight")
    dpo.run(cfg, world, straight)
    resumed = make_ctx(tmp_path / "resumed")
    dpo.run(dpo.Config(**{**cfg.__dict__, "max_steps": 2}), world, resumed)  # "crashes" after step 2
    dpo.run(cfg, world, resumed)
    a = GPT.from_pretrained(straight.output("dpo")).state_dict()
    b = GPT.from_pretrained(resumed.output("dpo")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

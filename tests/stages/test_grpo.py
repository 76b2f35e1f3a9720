"""GRPO stage: advantages and loss against hand-computed cases, a short run that learns, exact resume."""
from __future__ import annotations

import math

import pytest
import torch

from models.gpt import GPT
from models.heads import RewardModel
from stages import grpo
from tests.conftest import artifact, make_ctx
from tests.stages.alignment_toy import make_model_dir, write_prompts


def test_advantages_by_hand():
    adv = grpo.grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]), eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal -> std 0, advantage 0 (eps avoids 0/0)
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv[0], torch.tensor([s, -s, -s, s]))
    adv2 = grpo.grpo_advantages(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), eps=1e-4)
    assert adv2.abs().max() == 0


def test_loss_with_ratio_one_is_the_policy_gradient_plus_k3_kl():
    logps = torch.tensor([[-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -9.0]])
    mask = torch.tensor([[True, True, False]])  # the third token is padding
    loss, stats = grpo.grpo_loss(logps, logps, ref, torch.tensor([2.0]), mask, clip_eps=0.2, beta=0.1)
    kl1 = math.exp(-0.5) + 0.5 - 1  # k3 at ref - logp = -0.5; 0 at the second token
    assert loss.item() == pytest.approx(((-2.0 + 0.1 * kl1) + (-2.0)) / 2)
    assert stats["kl"].item() == pytest.approx(kl1 / 2)
    assert stats["clip_frac"].item() == 0


def test_loss_clips_the_ratio_only_where_it_helps_the_objective():
    old = torch.zeros(2, 1)
    logps = torch.full((2, 1), math.log(1.5))  # ratio 1.5, outside [0.8, 1.2]
    mask = torch.ones(2, 1, dtype=torch.bool)
    # A = +1: min(1.5, 1.2) = 1.2, clipped; A = -1: min(-1.5, -1.2) = -1.5, not clipped
    loss, stats = grpo.grpo_loss(logps, old, logps, torch.tensor([1.0, -1.0]), mask, clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-(1.2 - 1.5) / 2)
    assert stats["clip_frac"].item() == pytest.approx(0.5)


def test_loss_is_normalised_over_all_tokens_of_the_batch():
    """DAPO token-level mean: a 3-token completion weighs three times a 1-token one."""
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, _ = grpo.grpo_loss(logps, logps.detach(), logps.detach(), torch.tensor([1.0, -1.0]), mask, 0.2, 0.0)
    loss.backward()
    expected = torch.tensor([[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]])  # -A / 4 tokens at each real token
    torch.testing.assert_close(logps.grad, expected)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_world")
    sft = make_model_dir(root)
    rm = RewardModel(GPT.from_pretrained(sft))
    rm.save_pretrained(root / "rm")
    return {"dpo": artifact("dpo", sft), "sft": artifact("sft", sft), "prompts": artifact("prompts", write_prompts(root / "prompts", always="c")),
            "reward_model": artifact("reward_model", root / "rm")}


def test_short_run_learns_the_verifiable_task(world, tmp_path):
    """The model answers a random letter; the reward wants "c": 25% right at the start."""
    ctx = make_ctx(tmp_path)
    cfg = grpo.Config(prompts_per_step=8, group_size=8, max_new_tokens=6, lr=3e-3, beta=0.04, max_steps=20, ckpt_every=10)
    result = grpo.run(cfg, world, ctx)
    m = result.metrics
    assert m["reward_last5"] > m["reward_first5"] + 0.3, result.summary
    assert m["acc/say"] >= m["start_acc/say"] + 0.5, result.summary
    assert m["sft_acc/say"] == m["start_acc/say"]  # here the "dpo" input is the sft model itself
    assert m["gen_seconds"] > 0 and m["train_seconds"] > 0
    for key in ("train/reward/mean", "train/reward/std", "train/accuracy", "train/kl", "train/completion_len", "train/clip_frac", "train/gen_seconds"):
        assert len(ctx.tracker.metrics[key]) == 20
    assert (ctx.output("grpo") / "hf" / "config.json").is_file()


def test_resume_continues_exactly(world, tmp_path):
    cfg = grpo.Config(prompts_per_step=4, group_size=4, max_new_tokens=4, lr=1e-3, max_steps=4, ckpt_every=2, mu=2,
                      eval_per_task=0)
    straight = make_ctx(tmp_path / "straight")
    a_result = grpo.run(cfg, world, straight)
    resumed = make_ctx(tmp_path / "resumed")
    grpo.run(grpo.Config(**{**cfg.__dict__, "max_steps": 2}), world, resumed)  # "crashes" after step 2
    b_result = grpo.run(cfg, world, resumed)
    a = GPT.from_pretrained(straight.output("grpo")).state_dict()
    b = GPT.from_pretrained(resumed.output("grpo")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p["reward/mean"] for p in a_result.tables["train_curve"]] == [p["reward/mean"] for p in b_result.tables["train_curve"]]
    files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(straight.output("grpo")) == files(resumed.output("grpo"))  # meta.json too: no timings in it


def test_reward_model_term_is_mixed_in(world, tmp_path):
    cfg = grpo.Config(prompts_per_step=4, group_size=2, max_new_tokens=4, max_steps=1, rm_weight=1.0, eval_per_task=0)
    result = grpo.run(cfg, world, make_ctx(tmp_path))
    assert result.metrics["steps"] == 1


def test_uniform_groups_are_left_out_of_the_update(world, tmp_path):
    """A group whose samples all got the same reward has zero advantage: with drop_uniform_groups it takes
    no part in the update (and a step with only such groups takes none), so the weights do not move."""
    cfg = grpo.Config(prompts_per_step=4, group_size=4, max_new_tokens=4, max_steps=2, eval_per_task=0, format_weight=0.0,
                      beta=0.5, temperature=1e-3, ckpt_every=1)  # near-greedy: every sample of a prompt is the same
    ctx = make_ctx(tmp_path)
    result = grpo.run(cfg, world, ctx)
    assert [p["groups_used"] for p in result.tables["train_curve"]] == [0.0, 0.0]
    before = GPT.from_pretrained(world["dpo"].path).state_dict()
    after = GPT.from_pretrained(ctx.output("grpo")).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tasks_choose_the_train_prompts(world, tmp_path):
    assert {r["task"] for r in grpo.train_prompts(world["prompts"].path, ("say",))} == {"say"}
    assert grpo.train_prompts(world["prompts"].path, ("arith",)) == []
    with pytest.raises(grpo.StageError, match="of tasks \\['arith'\\]"):
        grpo.run(grpo.Config(tasks=("arith",), eval_per_task=0), world, make_ctx(tmp_path))


def test_start_and_sft_accuracy_are_read_from_the_dpo_record_when_it_matches(world, tmp_path):
    """The DPO stage writes its held-out accuracies with a key of the prompts and answer length; GRPO
    reuses them for the same key instead of decoding every prompt twice more, and measures otherwise."""
    import json
    import shutil

    from stages.chat.evaluate import heldout_key, pick_heldout
    from storage.parquet import iter_rows
    from tests.conftest import artifact

    dpo_dir = tmp_path / "dpo"
    shutil.copytree(world["dpo"].path, dpo_dir)
    cfg = grpo.Config(prompts_per_step=4, group_size=2, max_new_tokens=4, max_steps=1, eval_per_task=3, eval_new_tokens=5)
    val = pick_heldout(iter_rows(world["prompts"].path), 3)
    fake = {"acc/say": 0.123, "acc": 0.123}
    (dpo_dir / "meta.json").write_text(json.dumps({"heldout": {"key": heldout_key(val, 5), "acc": fake, "sft_acc": fake}}))
    inputs = {**world, "dpo": artifact("dpo", dpo_dir)}
    m = grpo.run(cfg, inputs, make_ctx(tmp_path / "a")).metrics
    assert m["start_acc/say"] == m["sft_acc/say"] == 0.123  # read, not measured
    other = grpo.run(grpo.Config(**{**cfg.__dict__, "eval_new_tokens": 6}), inputs, make_ctx(tmp_path / "b")).metrics
    assert other["start_acc/say"] != 0.123  # another answer length: measured

"""stages/distill.py: the KD loss against F.kl_div and by hand, pruning, and the stage on a toy teacher."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.gpt import GPT, GPTConfig
from stages import distill as D
from stages.contract import StageError
from tests.conftest import artifact, make_ctx
from tests.stages.compress_toy import make_world


def logits(seed: int, shape=(2, 5, 7)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_beta_0_and_1_are_forward_and_reverse_kl():
    s, t, y = logits(0), logits(1), torch.randint(0, 7, (2, 5))
    log_q, log_p = F.log_softmax(s.view(-1, 7), -1), F.log_softmax(t.view(-1, 7), -1)
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # KL(p || q)
    reverse = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")  # KL(q || p)
    torch.testing.assert_close(D.distill_loss(s, t, y, alpha=0.0, beta=0.0)[0], forward)
    torch.testing.assert_close(D.distill_loss(s, t, y, alpha=0.0, beta=1.0)[0], reverse)


def test_jsd_mixes_in_probability_space():
    s, t = logits(2).view(-1, 7), logits(3).view(-1, 7)
    p, q = t.softmax(-1), s.softmax(-1)
    m = 0.3 * p + 0.7 * q
    naive = 0.3 * (p * (p / m).log()).sum(-1) + 0.7 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(D.divergence(p.log(), q.log(), 0.3), naive)


def test_loss_is_zero_when_student_equals_teacher():
    s, y = logits(4), torch.randint(0, 7, (2, 5))
    for beta in (0.0, 0.5, 1.0):
        assert D.distill_loss(s, s.clone(), y, alpha=0.0, temperature=2.0, beta=beta)[0].abs().item() < 1e-6


def test_masked_tokens_do_not_count_and_t_squared_scales():
    s, t = logits(5), logits(6)
    y = torch.randint(0, 7, (2, 5))
    y[0, :3] = -100
    loss, stats = D.distill_loss(s, t, y, alpha=0.25, temperature=2.0)
    s2, t2 = s.clone(), t.clone()
    s2[0, :3] += 100 * torch.randn(3, 7)  # ignored positions: anything there changes nothing
    t2[0, :3] -= 50
    torch.testing.assert_close(D.distill_loss(s2, t2, y, alpha=0.25, temperature=2.0)[0], loss)
    keep = y != -100
    by_hand = 4.0 * F.kl_div(F.log_softmax(s[keep] / 2, -1), F.log_softmax(t[keep] / 2, -1), log_target=True,
                             reduction="batchmean")
    ce = F.cross_entropy(s[keep], y[keep])  # CE at T = 1
    torch.testing.assert_close(stats["kd"], by_hand)
    torch.testing.assert_close(loss, 0.25 * ce + 0.75 * by_hand)
    assert D.distill_loss(s, None, y, alpha=1.0)[0].item() == pytest.approx(ce.item())


def test_pruning_to_the_teachers_own_shape_is_the_teacher():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)).eval()
    x = torch.randint(0, 50, (3, 12))
    imp = D.importances(teacher, [(x, None)])
    same = D.prune(teacher, teacher.cfg, imp).eval()
    torch.testing.assert_close(same(x)[0], teacher(x)[0])
    half = D.student_config(teacher.cfg, D.Config())
    small = D.prune(teacher, half, imp)
    assert (half.d_model, half.n_heads, half.n_kv_heads, half.head_dim) == (16, 2, 1, 8)
    assert small.num_params(non_embedding=True) <= 0.25 * teacher.num_params(non_embedding=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("distill_world"))
    return {"grpo": artifact("grpo", w["teacher"]), "chat": artifact("chat", w["chat"]), "prompts": artifact("prompts", w["prompts"])}


def test_stage_trains_the_student_and_its_ce_only_baseline(world, tmp_path):
    ctx = make_ctx(tmp_path, stage="distill")
    cfg = D.Config(max_steps=12, batch_size=8, warmup_steps=2, eval_per_task=8, max_new_tokens=4, on_policy=0.5,
                   gen_tokens=4, lr=3e-3)
    result = D.run(cfg, world, ctx)
    m = result.metrics
    for key in ("acc/say", "teacher_acc/say", "ce_only_acc/say", "kl_to_teacher", "top1_agreement", "params",
                "teacher_params", "kd_gain/say", "kd_gain_ci95/say", "acc_ci95/say", "ce_only_top1_agreement"):
        assert key in m, key
    assert m["body_ratio"] <= 0.25 and m["params"] < m["teacher_params"]
    assert m["ce_only_steps"] > m["steps"] == 12  # equal compute: no teacher forwards buys CE-only more steps
    assert m["ce_only_flops"] == pytest.approx(m["train_flops"], rel=0.15)
    assert 0 <= m["top1_agreement"] <= 1 and m["kl_to_teacher"] >= 0
    assert any(p["train/on_policy"] > 0 for p in result.tables["train_curve"])
    small = ctx.output("small")
    assert (small / "hf" / "config.json").is_file() and (small / "tokenizer.json").is_file()
    meta = json.loads((small / "meta.json").read_text())
    assert meta["derived"]["init"] == "pruned teacher" and meta["heldout"]["acc"]["acc/say"] == m["acc/say"]
    student = GPT.from_pretrained(small)
    assert student.cfg.vocab_size == GPT.from_pretrained(world["grpo"].path).cfg.vocab_size


def test_a_student_with_another_vocabulary_is_one_line(world, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from models.tokenizer import SPECIAL_TOKENS, Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["another corpus entirely"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    other = tmp_path / "other"
    GPT(GPTConfig(vocab_size=280, d_model=32, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=64)).save_pretrained(other)
    Tokenizer(hf).save(other)
    with pytest.raises(StageError, match=r"^distill: the student at .* has another vocabulary"):
        D.run(D.Config(student_dir=str(other), max_steps=1), world, make_ctx(tmp_path / "x", stage="distill"))


def test_a_too_large_student_is_refused(world, tmp_path):
    with pytest.raises(StageError, match=r"max_body_ratio=0.25"):
        D.run(D.Config(d_model=64, n_heads=2, max_steps=1), world, make_ctx(tmp_path, stage="distill"))


@pytest.mark.slow  # importing transformers takes seconds
def test_small_exports_as_hf_qwen3_with_the_same_logits(world, tmp_path):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    ctx = make_ctx(tmp_path, stage="distill")
    D.run(D.Config(max_steps=2, batch_size=8, warmup_steps=1, eval_per_task=2, max_new_tokens=2, ce_baseline=False), world, ctx)
    small = ctx.output("small")
    hf = transformers.AutoModelForCausalLM.from_pretrained(small / "hf").eval()
    ours = GPT.from_pretrained(small).eval()
    x = torch.randint(0, ours.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-4
    assert math.isfinite(float(json.loads((small / "meta.json").read_text())["metrics"]["kl_to_teacher"]))

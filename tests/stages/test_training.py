"""The shared training policy (stages/training.py) against hand-computed cases, and what every
trainer must share: optimizer groups, schedules, the clock, the checkpoint tail, input models,
configs whose every field is used."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.heads import RewardModel
from models.lora import apply_lora
from stages import training
from stages.contract import StageError
from tests.conftest import artifact, make_ctx

TRAINERS = ("pretrain", "sft", "reward", "dpo", "grpo")
STAGES = ("crawl", "extract", "dedupe", "filter", "tokenizer", "instruct") + TRAINERS


# -- schedules -------------------------------------------------------------------------------------


def test_warmup_is_linear_from_one_step():
    assert [training.lr_multiplier(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_by_hand():
    # warmup 10, total 110: p = (step - 10) / 99; p = 0 at step 10, 0.5 at 59.5, 1 at the last step 109
    m = lambda s: training.lr_multiplier(s, 110, 10, "cosine", 0.1)  # noqa: E731
    assert m(10) == pytest.approx(1.0)
    assert m(109) == pytest.approx(0.1)
    p = (60 - 10) / 99
    assert m(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    assert m(500) == pytest.approx(0.1)  # past the budget: stays at the floor


def test_wsd_by_hand():
    # total 100, decay_ratio 0.2: stable through step 79, then 1 - 0.9 * (step - 79) / 20 down to 0.1 at step 99
    m = lambda s: training.lr_multiplier(s, 100, 5, "wsd", 0.1, 0.2)  # noqa: E731
    assert [m(s) for s in (5, 50, 79)] == [1.0, 1.0, 1.0]
    assert m(80) == pytest.approx(1 - 0.9 * 1 / 20)
    assert m(89) == pytest.approx(1 - 0.9 * 10 / 20)
    assert m(99) == pytest.approx(0.1)


def test_constant_after_warmup_and_unknown_schedules_fail():
    assert [training.lr_multiplier(s, 10, 2, "constant", 0.1) for s in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert training.lr_multiplier(0, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        training.lr_multiplier(3, 10, 1, "linear")


# -- optimizer groups ------------------------------------------------------------------------------


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16))


@pytest.mark.parametrize("make", [tiny_gpt, lambda: RewardModel(tiny_gpt()),
                                  lambda: (m := tiny_gpt(), apply_lora(m, ("q_proj", "v_proj"), 2, 4.0, 0.0))[0]],
                         ids=["gpt", "reward_model", "lora"])
def test_optimizer_never_decays_1d_parameters(make):
    model = make()
    opt = training.adamw(model, training.TrainConfig(lr=1e-3, weight_decay=0.1), torch.device("cpu"))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter once, frozen ones never
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8  # TrainConfig defaults
        if g["weight_decay"] > 0:
            assert all(p.dim() >= 2 for p in g["params"])
    one_d = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    assert bool(one_d) == (not any("lora" in n for n, _ in model.named_parameters()))  # LoRA freezes the gains
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not decayed & {id(p) for p in one_d}


def test_decay_leaves_a_norm_gain_alone():
    """One AdamW step with zero gradient: decay shrinks a matrix by lr * wd, a gain not at all."""
    model = tiny_gpt()
    opt = training.adamw(model, training.TrainConfig(lr=0.1, weight_decay=0.5), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["norm.weight"], before["norm.weight"])
    torch.testing.assert_close(after["layers.0.mlp.up_proj.weight"], before["layers.0.mlp.up_proj.weight"] * (1 - 0.1 * 0.5))


def test_no_trainable_parameters_is_a_stage_error():
    model = tiny_gpt().requires_grad_(False)
    with pytest.raises(StageError, match="no trainable parameters"):
        training.adamw(model, training.TrainConfig(lr=1e-3, weight_decay=0.0), torch.device("cpu"))


# -- clipping --------------------------------------------------------------------------------------


def test_clip_gradients_by_hand():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    norm = training.clip_gradients([a, b], 1.0)
    assert norm.item() == pytest.approx(5.0)  # the norm before clipping is what gets logged
    assert a.grad.item() == pytest.approx(0.6, rel=1e-5) and b.grad.item() == pytest.approx(0.8, rel=1e-5)
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    assert training.clip_gradients([a, b], 0.0).item() == pytest.approx(5.0)  # 0: measured, not clipped
    assert a.grad.item() == 3.0
    frozen = torch.nn.Parameter(torch.zeros(1))
    assert training.clip_gradients([frozen], 1.0).item() == 0.0  # no gradient at all


# -- the clock -------------------------------------------------------------------------------------


class FakeTime:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    t = FakeTime()
    monkeypatch.setattr(training.time, "perf_counter", t)
    return t


def test_clock_pauses_during_evaluation(fake_time):
    clock = training.Clock()
    fake_time.now += 10
    with clock.paused():
        fake_time.now += 100  # evaluation: not training time
        with clock.paused():  # nested pauses are one pause
            fake_time.now += 5
    fake_time.now += 2
    assert clock.seconds == pytest.approx(12)
    assert clock.paused_s == pytest.approx(105)
    assert clock.rate(1200) == pytest.approx(100)  # 1200 tokens in 12 training seconds


def test_clock_laps_and_cap(fake_time):
    clock = training.Clock(start_s=50.0)  # resumed: 50 s spent by the earlier run
    fake_time.now += 4
    assert clock.lap(400) == pytest.approx(100)
    with clock.paused():
        fake_time.now += 60
    fake_time.now += 1
    assert clock.lap(50) == pytest.approx(50)  # 50 tokens in the 1 training second since the last lap
    assert clock.rate(450) == pytest.approx(90)  # this run only: 5 s
    assert not clock.over(1.0) and clock.seconds == pytest.approx(55)
    fake_time.now += 6
    assert clock.over(1.0)  # 61 s of training (the 60 s paused do not count)


def test_stop_reason_and_the_loud_warning():
    assert training.stopped_by(10, 10) == "max_steps" and training.budget_warnings("dpo", "max_steps", 10, 10, 3.0) == []
    assert training.stopped_by(7, 10) == "max_minutes"
    (w,) = training.budget_warnings("dpo", "max_minutes", 7, 10, 3.0)
    assert w.startswith("stopped_by: max_minutes: dpo stopped at step 7 of 10 after the 3-minute safety cap")
    assert "dpo.max_steps" in w and "dpo.max_minutes" in w


# -- the checkpoint tail ---------------------------------------------------------------------------


class Order:
    """A stand-in for a data loader: its state is one integer."""

    def __init__(self):
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_checkpoint_every_n_keep_k_and_final(tmp_path, fake_time):
    ctx = make_ctx(tmp_path)
    model = tiny_gpt()
    opt = training.adamw(model, training.TrainConfig(lr=1e-3, weight_decay=0.0), torch.device("cpu"))
    cfg, clock = training.TrainConfig(ckpt_every=4, keep_checkpoints=2), training.Clock()
    written = [s for s in range(1, 12) if training.checkpoint(ctx, s, model, opt, cfg, clock)]
    assert written == [4, 8]
    assert not training.checkpoint(ctx, 8, model, opt, cfg, clock, final=True)  # already there
    fake_time.now += 7
    order = Order()
    order.position = 5
    assert training.checkpoint(ctx, 11, model, opt, cfg, clock, final=True, order=order, curve=[{"step": 0}])
    assert sorted(p.name for p in ctx.checkpoint_dir.iterdir()) == ["step-00000008", "step-00000011"]
    meta = json.loads((ctx.checkpoint_dir / "step-00000011" / "meta.json").read_text())
    assert meta["elapsed_s"] == 7.0 and meta["order"] == {"position": 5} and meta["curve"] == [{"step": 0}]
    assert meta["config"]["ckpt_every"] == 4
    not_main = dataclasses.replace(ctx, rank=1)
    assert not training.checkpoint(not_main, 12, model, opt, cfg, clock)


def test_resume_restores_weights_optimizer_loader_and_meta(tmp_path, fake_time):
    ctx = make_ctx(tmp_path)
    model = tiny_gpt()
    opt = training.adamw(model, training.TrainConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    x = torch.randint(0, 32, (2, 8))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    clock = training.Clock()
    fake_time.now += 3.5
    order = Order()
    order.position = 7
    training.checkpoint(ctx, 2, model, opt, training.TrainConfig(ckpt_every=1, keep_checkpoints=1), clock, order=order)

    fresh, fresh_order = GPT(model.cfg), Order()
    fresh_opt = training.adamw(fresh, training.TrainConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    ck = training.resume(ctx, fresh, fresh_opt, torch.device("cpu"), order=fresh_order)
    assert ck["step"] == 2 and ck["elapsed_s"] == 3.5 and fresh_order.position == 7
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    # the optimizer moments came back: one more identical step gives identical weights
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x, x)[1].backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert training.resume(make_ctx(tmp_path / "none"), fresh, fresh_opt, torch.device("cpu")) == {}


def test_a_checkpoint_that_does_not_load_is_one_line(tmp_path):
    ctx = make_ctx(tmp_path)
    model = tiny_gpt()
    opt = training.adamw(model, training.TrainConfig(lr=1e-3, weight_decay=0.0), torch.device("cpu"))
    training.checkpoint(ctx, 3, model, opt, training.TrainConfig(ckpt_every=1), training.Clock())
    with pytest.raises(StageError, match=r"^test: checkpoint .*step-00000003 does not load \(KeyError"):
        training.resume(ctx, model, opt, torch.device("cpu"), order=Order())  # saved without an order
    weights = ctx.checkpoint_dir / "step-00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(StageError, match=r"^test: checkpoint .*step-00000003 does not load .*delete it"):
        training.resume(ctx, model, opt, torch.device("cpu"))


# -- input models ----------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path) -> Path:
    from models.hf_export import save_model_dir
    from tests.stages.test_sft import tiny_tokenizer

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save(tok_dir)
    from models.tokenizer import Tokenizer

    model = GPT(GPTConfig(vocab_size=Tokenizer.load(tok_dir).vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                          max_seq_len=16))
    return save_model_dir(model, tok_dir, tmp_path / "sft", hf=False)


def test_open_model_input_loads_a_model_directory(model_dir):
    d, tok, model = training.open_model_input({"sft": artifact("sft", model_dir)}, "sft", "dpo")
    assert d == model_dir and tok.vocab_size <= model.cfg.vocab_size


@pytest.mark.parametrize("damage, says", [
    ("missing_dir", "is not a model directory (no config.json)"),
    ("no_weights", "is not a model directory (no model.safetensors)"),
    ("truncated_weights", "does not load as a model (SafetensorError"),
    ("bad_config", "does not load as a model (JSONDecodeError"),
    ("bad_tokenizer", "tokenizer.json does not load"),
])
def test_open_model_input_errors_are_one_line(model_dir, tmp_path, damage, says):
    if damage == "missing_dir":
        model_dir = tmp_path / "nothing"
    elif damage == "no_weights":
        (model_dir / "model.safetensors").unlink()
    elif damage == "truncated_weights":
        w = model_dir / "model.safetensors"
        w.write_bytes(w.read_bytes()[:50])
    elif damage == "bad_config":
        (model_dir / "config.json").write_text("{not json")
    else:
        (model_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(StageError) as e:
        training.open_model_input({"sft": artifact("sft", model_dir)}, "sft", "dpo")
    msg = str(e.value)
    assert msg.startswith("dpo: input 'sft'") and says in msg and "\n" not in msg
    assert msg.endswith("rebuild the stage that writes 'sft'")


def test_write_run_meta_has_the_same_keys_for_every_trainer_and_no_timings(tmp_path):
    from stages import reward

    path = training.write_run_meta(tmp_path, "reward", 5, 10, "max_minutes", {"val_pair_acc": 0.9, "samples_per_s": 812.0},
                                   {"train_pairs": 4, "samples_per_s": 3.0}, reward.Config(),
                                   [{"step": 1, "loss": 0.5, "gen_seconds": 1.2, "train_seconds": 0.3}], val={"pair_acc": 0.9})
    meta = json.loads(path.read_text())
    assert {k: meta[k] for k in ("stage", "steps", "total_steps", "stopped_by")} == {
        "stage": "reward", "steps": 5, "total_steps": 10, "stopped_by": "max_minutes"}
    assert meta["config"]["lr"] == reward.Config().lr and meta["val"] == {"pair_acc": 0.9}
    # a model directory's bytes must not depend on the machine's speed: timings live in the result only
    assert meta["metrics"] == {"val_pair_acc": 0.9} and meta["derived"] == {"train_pairs": 4}
    assert meta["curve"] == [{"step": 1, "loss": 0.5}]
    assert training.is_timing("train/tokens_per_s") and training.is_timing("stage_seconds") and not training.is_timing("steps")


# -- what every trainer shares ---------------------------------------------------------------------


@pytest.mark.parametrize("name", STAGES)
def test_every_config_field_is_used(name):
    """torchtune's airtight configs: a field no code reads is a knob that does nothing."""
    module = importlib.import_module(f"stages.{name}")
    source = Path(module.__file__).read_text()
    if issubclass(module.Config, training.TrainConfig):  # the policy reads some of its own knobs
        source += Path(training.__file__).read_text()
    unused = [f.name for f in dataclasses.fields(module.Config)
              if not re.search(rf"\b(cfg|self|config)\.{f.name}\b", source)]
    assert unused == [], f"stages/{name}.py: Config fields never read: {unused}"


@pytest.mark.parametrize("name", TRAINERS)
def test_trainers_share_the_policy_fields(name):
    """Every trainer exposes the same optimizer, schedule and budget knobs, with a generous time cap."""
    module = importlib.import_module(f"stages.{name}")
    fields = {f.name: f.default for f in dataclasses.fields(module.Config)}
    for knob in ("lr", "schedule", "min_lr_ratio", "decay_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                 "adam_eps", "grad_clip", "max_minutes", "ckpt_every", "keep_checkpoints"):
        assert knob in fields, f"stages/{name}.py: Config has no {knob}"
    assert "max_steps" in fields
    assert fields["max_minutes"] >= 10, "max_minutes is a safety cap, not the budget"
    assert issubclass(module.Config, training.TrainConfig)
    with pytest.raises(StageError, match="lr must be > 0"):
        from stages.contract import build_config

        build_config(module.Config, {"lr": 0.0}, name)


@pytest.mark.parametrize("name", TRAINERS)
def test_trainers_import_the_policy_instead_of_copying_it(name):
    source = Path(importlib.import_module(f"stages.{name}").__file__).read_text()
    for copied in ("torch.optim.AdamW(", "clip_grad_norm_(", "checkpoints.save(", "checkpoints.resume(", "def lr_multiplier",
                   "time.perf_counter() - t_start", "torch.autocast(", "beta1: float", "keep_checkpoints: int"):
        assert copied not in source, f"stages/{name}.py copies {copied!r}: import it from stages/training.py"
    run_src = source[source.index("\ndef run("):source.index('\nif __name__ == "__main__"')]
    assert len(run_src.strip().splitlines()) <= 125, f"stages/{name}.py: run() is {len(run_src.splitlines())} lines"


# -- every trainer's report is a pure function -------------------------------------------------------


def test_reports_build_without_training_and_warn_when_the_cap_fired():
    from stages import dpo, grpo, pretrain, reward, sft

    acc = {"acc/arith": 0.9, "acc/count": 0.5, "acc": 0.7}
    base = {"acc/arith": 0.0, "acc/count": 0.1, "acc": 0.05}
    rows = [{"task": "arith"}] * 3 + [{"task": "count"}]
    reports = {
        "pretrain": pretrain.summarize(pretrain.Config(), {"params": 1000, "unigram_bpb": 2.5, "total_steps": 10}, 7,
                                       "max_minutes", 7000, 1234.0, 3.1, 3.0, 1.3, [{"step": 0}], "### The\nThe end"),
        "sft": sft.summarize(sft.Config(), {"params": 1000, "trainable_params": 1000, "lora_layers": 0, "total_steps": 10}, 7,
                             "max_minutes", 0.5, 100.0, rows, acc, base, base, [], [{"step": 0}]),
        "reward": reward.summarize(reward.Config(max_steps=10), {"train_pairs": 50, "val_pairs": 8}, 7, "max_minutes",
                                   {"pair_acc": 0.8, "loss": 0.4, "margin": 1.0, "pair_acc/arith": 1.0}, []),
        "dpo": dpo.summarize(dpo.Config(max_steps=10), {"val_pairs": 8}, 7, "max_minutes",
                             {"pref_acc": 0.8, "loss": 0.4, "margin": 1.0}, acc, base, []),
        "grpo": grpo.summarize(grpo.Config(max_steps=10), {}, 7, "max_minutes", acc, base, base,
                               [{"reward/mean": r} for r in (0.1, 0.2, 0.3)], 1.0, 2.0),
    }
    for name, r in reports.items():
        assert r.metrics["steps"] == 7.0, name
        (w,) = r.warnings
        assert w.startswith(f"stopped_by: max_minutes: {name} stopped at step 7 of 10"), name
        assert "7 of 10" in r.summary and "(max_minutes)" in r.summary, name
    # the chat stages share one accuracy table
    assert reports["sft"].tables["eval"] == [
        {"task": "arith", "prompts": 3, "most common answer": 0.0, "base (few-shot)": 0.0, "sft": 0.9},
        {"task": "count", "prompts": 1, "most common answer": 0.1, "base (few-shot)": 0.1, "sft": 0.5}]
    assert "| task | prompts | most common answer | base (few-shot) | sft |" in reports["sft"].summary
    assert [r["task"] for r in reports["dpo"].tables["heldout_accuracy"]] == ["arith", "count"]
    assert reports["grpo"].metrics["reward_first5"] == pytest.approx(0.2)
    assert pretrain.summarize(pretrain.Config(), {"params": 1, "unigram_bpb": 2.5, "total_steps": 7}, 7, "max_steps", 1, 1.0,
                              None, 3.0, 1.3, [], "").warnings == []


def test_accuracy_table_marks_missing_columns():
    from stages.chat.evaluate import accuracy_table

    rows, md = accuracy_table({"sft": {"acc/a": 0.5}, "dpo": {"acc/a": 0.75, "acc/b": 1.0}})
    assert rows == [{"task": "a", "sft": 0.5, "dpo": 0.75}, {"task": "b", "sft": None, "dpo": 1.0}]
    assert md.splitlines() == ["| task | sft | dpo |", "|---|---|---|", "| a | 0.500 | 0.750 |", "| b | - | 1.000 |"]
    assert accuracy_table({"sft": {}}) == ([], "")

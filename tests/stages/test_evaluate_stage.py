"""The evaluate stage: its statistics against hand-computed cases, the gates, the test-row choices,
and one run on a toy chat line (members absent, a gate that passes and one that fails)."""
from __future__ import annotations

import json
import math
import re

import pytest

from stages import evaluate
from stages.contract import ConfigError, StageError, build_config
from stages.report import gates
from storage.parquet import write_table
from tests.conftest import artifact, make_ctx
from tests.stages.alignment_toy import LETTERS, chat, make_model_dir, questions


def test_wilson_interval_matches_hand_computed_values():
    lo, hi = evaluate.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (10 + 1.96**2), abs=1e-4)  # 0.2775: not the Wald (0, 0)
    lo, hi = evaluate.wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert evaluate.wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_is_the_two_sided_binomial_test_on_discordant_pairs():
    assert evaluate.mcnemar_exact(0, 0) == 1.0
    assert evaluate.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert evaluate.mcnemar_exact(1, 9) == evaluate.mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert evaluate.mcnemar_exact(5, 5) == 1.0  # capped


def test_paired_delta_counts_gains_and_losses_on_the_same_prompts():
    old = [True, True, False, False, False, True]
    new = [True, False, True, True, False, True]
    d = evaluate.paired_delta(old, new)
    assert (d["gained"], d["lost"], d["n"]) == (2, 1, 6)
    assert d["delta"] == pytest.approx(1 / 6)
    se = math.sqrt((3 / 6 - (1 / 6) ** 2) / 6)
    assert (d["lo"], d["hi"]) == (pytest.approx(1 / 6 - 1.96 * se, abs=1e-3), pytest.approx(1 / 6 + 1.96 * se, abs=1e-3))
    assert d["p"] == pytest.approx(evaluate.mcnemar_exact(2, 1))
    with pytest.raises(ValueError):
        evaluate.paired_delta([True], [True, False])


def test_pass_at_k_is_the_unbiased_estimator():
    assert evaluate.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert evaluate.pass_at_k(4, 1, 4) == 1.0 and evaluate.pass_at_k(4, 0, 4) == 0.0
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 5, 1)


def test_headroom_is_greedy_wrong_and_a_sample_right():
    assert evaluate.headroom([True, False, False, True], [0, 0, 2, 4]) == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        evaluate.headroom([True], [1, 2])


def test_mean_interval_and_loss_increase():
    m, lo, hi = evaluate.mean_interval([0.0, 1.0, 1.0, 0.0])
    assert m == 0.5 and (lo, hi) == (pytest.approx(0.5 - 1.96 * 0.5774 / 2, abs=1e-3), pytest.approx(0.5 + 1.96 * 0.5774 / 2, abs=1e-3))
    fp = [10.0, 20.0, 30.0, 40.0]
    q = [11.0, 21.0, 31.0, 41.0]
    inc, lo, hi = evaluate.loss_increase(fp, q, n_boot=200)
    assert inc == pytest.approx(4 / 100) and lo <= inc <= hi
    assert evaluate.loss_increase(fp, fp, n_boot=50) == (0.0, 0.0, 0.0)


def test_gates_compare_figures_and_say_why_a_rule_could_not_be_checked():
    figures = {"grpo/acc": 0.76, "sft/acc_lo": 0.69, "chat_int4/loss_increase": 0.07, "small/acc": 0.3}
    rules = {"grpo": {"acc": {"min": "sft/acc_lo"}}, "chat_int4": {"loss_increase": {"max": 0.05}},
             "small": {"acc": {"min": "small/baseline"}}, "vl": {"acc": {"min": 0.5}}}
    rows = gates.evaluate_gates(rules, figures, present={"grpo", "chat_int4", "small"})
    by = {r["member"]: r for r in rows}
    assert by["grpo"]["passed"] and by["grpo"]["threshold"] == 0.69 and by["grpo"]["against"] == "sft/acc_lo"
    assert not by["chat_int4"]["passed"] and by["chat_int4"]["op"] == "<=" and by["chat_int4"]["note"] == ""
    assert not by["small"]["passed"] and by["small"]["note"] == "small/baseline not measured"
    assert not by["vl"]["passed"] and by["vl"]["note"] == "member absent"
    assert gates.promoted(rows) == {"grpo": True, "chat_int4": False, "small": False, "vl": False}


@pytest.mark.parametrize("values, message", [
    ({"gates": {"grpo": {"acc": {"above": 0.5}}}}, "gates.grpo.acc: expected"),
    ({"gates": {"grpo": {"acc": {"min": "sft"}}}}, "a number or a figure like 'sft/acc_lo'"),
    ({"gates": {"chat": {"acc": {"min": 0.5}}}}, "gates.chat: not a member"),
    ({"samples": 2, "pass_k": 4}, "pass_k (4) must be <= samples (2)"),
    ({"sample_members": ["base"]}, "are not chat models"),
])
def test_config_names_what_is_wrong(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(evaluate.Config, values, "evaluate")


def row(i: int, task: str, answer: str, split: str = "test") -> dict:
    return {"id": f"{task}:{i:03d}", "prompt": [{"role": "user", "content": f"q{i}"}], "answer": answer,
            "verifier": "numeric" if task == "arith" else "exact", "task": task, "source": "t", "split": split}


def test_test_rows_distractors_and_baseline():
    rows = [row(i, t, str(i % 3)) for t in ("arith", "string") for i in range(6)] + [row(99, "arith", "7", "val")]
    picked = evaluate.pick_heldout(rows, 4, split="test")
    assert [r["id"] for r in picked] == [f"{t}:{i:03d}" for t in ("arith", "string") for i in range(4)]
    assert evaluate.first_per_task(picked, 2) == [0, 1, 4, 5]
    d = evaluate.distractors(picked, 3, seed=0)
    assert d == evaluate.distractors(picked, 3, seed=0)  # the same in every run
    for r, ds in zip(picked, d):
        assert r["answer"] not in ds and set(ds) <= {"0", "1", "2", "3"} and len(ds) == len(set(ds))
    train = [row(i, "arith", "2", "train") for i in range(3)] + [row(7, "arith", "1", "train")]
    assert evaluate.majority_correct(train, picked[:4]) == [False, False, True, False]
    assert evaluate.first_line("\n\n  42 apples\nmore") == "42 apples" and evaluate.first_line(" \n") == ""


def write_world(root, with_test: bool = True):
    """Toy prompts and chat data: the alignment toy's questions, its val ones relabelled test."""
    split = (lambda s: "test" if s == "val" else s) if with_test else (lambda s: s)
    prompts = [{"id": q, "prompt": chat(q, a)[0], "answer": a, "verifier": "exact", "task": "say", "source": "toy",
                "split": split(s)} for s in ("train", "val") for q, a in questions(s)]
    convs = [{"id": q, "messages": chat(q, a)[0] + chat(q, a)[1], "task": "say", "source": "toy", "split": split(s)}
             for s in ("train", "val") for q, a in questions(s)]
    write_table(prompts, root / "prompts" / "part-00000.parquet", "prompts")
    write_table(convs, root / "chat" / "part-00000.parquet", "chat")
    return root / "prompts", root / "chat"


def test_run_on_a_toy_chat_line(tmp_path):
    model = make_model_dir(tmp_path / "m", steps=20)
    prompts, chat_rows = write_world(tmp_path)
    inputs = {"prompts": artifact("prompts", prompts), "chat": artifact("chat", chat_rows)}
    inputs |= {name: artifact(name, model) for name in ("sft", "dpo", "grpo")}
    cfg = build_config(evaluate.Config, {"max_new_tokens": 4, "samples": 2, "pass_k": 2, "sample_per_task": 4, "gates": {
        "grpo": {"acc": {"min": "sft/acc_lo"}}, "vl": {"acc": {"min": 0.1}}}}, "evaluate")
    ctx = make_ctx(tmp_path / "run", "evaluate")
    result = evaluate.run(cfg, inputs, ctx)

    ev = json.loads((ctx.output("report") / "evaluation.json").read_text())
    n = len(questions("val"))
    assert ev["prompts"]["rows"] == n and ev["split"] == "test"
    assert {m: s["status"] for m, s in ev["members"].items() if s["status"] != "absent"} == \
        {"sft": "measured", "dpo": "measured", "grpo": "measured"}
    assert ev["members"]["vl"]["status"] == "absent" and ev["members"]["base"]["status"] == "absent"
    m = result.metrics
    for name in ("sft", "dpo", "grpo"):
        assert m[f"{name}/acc_lo"] <= m[f"{name}/acc"] <= m[f"{name}/acc_hi"] and m[f"{name}/prompts"] == n
        assert f"{name}/baseline" in m and f"{name}/rank_acc" in m
    # the same weights on the same prompts: no discordant pair, p = 1
    assert m["grpo_vs_dpo/acc_delta"] == 0.0 and m["grpo_vs_dpo/acc_mcnemar_p"] == 1.0
    assert m["grpo/pass@1_lo"] <= m["grpo/pass@1"] <= m["grpo/pass@2"] <= 1.0 and 0.0 <= m["grpo/headroom@2"] <= 1.0
    assert m["rank_chance"] == pytest.approx(1 / len(LETTERS))  # three distractors: the other letters
    assert [(g["member"], g["passed"], g["note"]) for g in ev["gates"]] == [("grpo", True, ""), ("vl", False, "member absent")]
    assert result.outputs["report"]["promote"] == {"grpo": True, "vl": False}
    assert [h["member"] for h in ev["headline"]] == ["sft", "dpo", "grpo"] and all(h["split"] == "test" for h in ev["headline"])
    html = (ctx.output("report") / "report.html").read_text()
    assert html.count("<img ") >= 3 and not re.search(r"<script|<link|src=\"(?!data:)", html)  # nothing loaded from elsewhere
    assert "PASS grpo/acc" in (ctx.output("report") / "summary.txt").read_text()
    assert ctx.tracker.artifacts == [str(ctx.output("report") / "report.html")]


def test_no_test_rows_is_one_line_naming_the_file(tmp_path):
    model = make_model_dir(tmp_path / "m", steps=2)
    prompts, _ = write_world(tmp_path, with_test=False)
    ctx = make_ctx(tmp_path / "run", "evaluate")
    with pytest.raises(StageError, match=r"evaluate: the prompts at .*prompts have no rows of split 'test' \(splits: train, val\)"):
        evaluate.run(evaluate.Config(), {"prompts": artifact("prompts", prompts), "sft": artifact("sft", model)}, ctx)


def test_a_recipe_without_members_shows_them_absent(tmp_path):
    ctx = make_ctx(tmp_path / "run", "evaluate")
    result = evaluate.run(evaluate.Config(), {}, ctx)
    ev = json.loads((ctx.output("report") / "evaluation.json").read_text())
    assert {s["status"] for s in ev["members"].values()} == {"absent"} and ev["headline"] == []
    assert "Absent from this recipe" in (ctx.output("report") / "report.html").read_text()
    assert result.outputs["report"]["promote"] == {}

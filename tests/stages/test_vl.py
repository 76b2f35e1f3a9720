"""stages/vl.py: the pure functions by hand, and the stage on a toy chat model: three phases, every
headline metric, a loadable `vl` directory, a resumed run with the same bytes, bad inputs in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from models.vision import VLModel
from stages import images as I
from stages import vl as V
from stages.contract import StageError, build_config
from storage.parquet import iter_rows, write_table
from tests.conftest import artifact, make_ctx
from tests.stages.compress_toy import make_world

SMALL = {"vit_d_model": 32, "vit_layers": 1, "vit_heads": 2, "vit_steps": 8, "vit_batch_size": 16, "align_steps": 4,
         "max_steps": 6, "batch_size": 8, "warmup_steps": 1, "log_every": 2, "text_tasks": ["say"],
         "text_eval_per_task": 4, "text_max_new_tokens": 4, "eval_batch_size": 32}


def test_pure_functions_by_hand():
    assert V.is_correct(" Top Left. ", "top left") and not V.is_correct("left", "top left")
    p, half = V.accuracy_ci([True, True, False, True])
    assert p == 0.75 and half == pytest.approx(1.96 * (0.75 * 0.25 / 4) ** 0.5)
    d, h = V.paired_delta([True, False, True], [True, True, True])
    assert d == pytest.approx(-1 / 3) and h == pytest.approx(1.96 * (1 / 3) ** 0.5 / 3 ** 0.5)
    rows = [{"task": "t", "answer": a} for a in ("x", "y", "x", "z")]
    assert V.majority_answers(rows) == {"t": "x"}
    swap = V.swap_partners(rows)
    assert all(rows[j]["answer"] != rows[i]["answer"] for i, j in enumerate(swap))
    t = V.attribute_targets([{"colour": "red", "shape": "circle"}, {"word": "cat"}, {"colour": "pink"}],
                            {"shape": ["circle", "square"], "colour": ["blue", "red"], "word": ["cat"]})
    assert t.tolist() == [[1, 0, -100], [-100, -100, 0], [-100, -100, -100]]  # columns: colour, shape, word
    blind = V.blind_partners(rows)  # one partner per answer of the task, never the row itself
    assert blind == [(0, 2), (0, 1), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (2, 3), (3, 0), (3, 1)]
    assert V.swap_partners([rows[0]]) == [0]
    # balanced: as many of each answer as the rarest allows (and n // answers), kept in input order
    rows = [{"task": "a", "answer": x} for x in "xxxyxy"] + [{"task": "b", "answer": "z"}]
    assert [(r["task"], r["answer"]) for r in V.balanced_per_task(rows, 10)] == [("a", "x"), ("a", "x"), ("a", "y"), ("a", "y"), ("b", "z")]
    assert [r["answer"] for r in V.balanced_per_task(rows, 2)] == ["x", "y", "z"]
    logits = torch.randn(5, 7)
    assert float(V.text_kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    expected = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(V.text_kl(student, teacher), expected)
    s1, s2 = V.Stream(5, [0, 1]), V.Stream(5, [0, 1])
    assert s1.take(7) == s2.take(7) and sorted(V.Stream(5, [0, 1]).take(5)) == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    w = make_world(root)
    I.run(I.Config(scenes_per_task=30), {}, make_ctx(root / "img"))
    w["images"] = root / "img" / "out" / "images"
    return root, w


def inputs(w) -> dict:
    return {"grpo": artifact("grpo", w["teacher"]), "images": artifact("images", w["images"]),
            "chat": artifact("chat", w["chat"]), "prompts": artifact("prompts", w["prompts"])}


def test_stage_trains_measures_and_resumes_to_the_same_bytes(world):
    root, w = world
    cfg = build_config(V.Config, SMALL, "vl")
    ctx = make_ctx(root / "run")
    res = V.run(cfg, inputs(w), ctx)
    m = res.metrics
    tested = {r["task"] for r in res.tables["eval"]}
    assert len(tested) >= 4
    for task in tested:
        for prefix in ("acc", "acc_ci95", "blind_acc", "swap_acc", "majority_acc"):
            assert f"{prefix}/{task}" in m, (prefix, task)
    assert {"text_acc/say", "chat_text_acc/say", "text_delta/say", "vit_val_acc/colour", "vit_val_acc/word"} <= set(m)
    assert any(k.startswith("comp_acc/") for k in m) and any(k.startswith("blank_acc/") for k in m)
    assert all(v <= cfg.eval_per_task for v in res.tables["eval"][0].values() if isinstance(v, int))
    out = ctx.output("vl")
    model = VLModel.from_pretrained(out)
    assert model.vcfg.image_tokens == 9 + model.vcfg.pool_queries and (out / "tokenizer.json").is_file()  # patches + queries
    assert {c["phase"] for c in json.loads((out / "meta.json").read_text())["curve"]} == {"vit", "align", "instruct"}
    first = (out / "model.safetensors").read_bytes()

    # a second run with the first one's checkpoint dir (the last phase done) writes the same bytes
    ctx2 = make_ctx(root / "run2")
    shutil.rmtree(ctx2.checkpoint_dir)
    shutil.copytree(ctx.checkpoint_dir, ctx2.checkpoint_dir)
    V.run(cfg, inputs(w), ctx2)
    assert (ctx2.output("vl") / "model.safetensors").read_bytes() == first
    assert (ctx2.output("vl") / "meta.json").read_bytes() == (out / "meta.json").read_bytes()


def test_lora_scopes_gated_adapters_leave_text_alone_a_full_lora_is_merged(world):
    root, w = world
    res = json.loads((root / "run" / "out" / "vl" / "meta.json").read_text())["metrics"]  # the default: "conversation"
    assert res["text_acc/say"] == res["chat_text_acc/say"] and res["text_delta/say"] == 0.0
    assert "lora_A" in json.dumps(list(VLModel.from_pretrained(root / "run" / "out" / "vl").state_dict()))
    for scope, text_loss in (("image", "kl"), ("all", "kl"), ("all", "ce")):
        cfg = build_config(V.Config, {**SMALL, "lora_scope": scope, "text_loss": text_loss, "max_steps": 3}, "vl")
        out = root / f"{scope}-{text_loss}"
        res = V.run(cfg, inputs(w), make_ctx(out))
        state = json.dumps(list(VLModel.from_pretrained(out / "out" / "vl").state_dict()))
        if scope == "image":
            assert res.metrics["text_acc/say"] == res.metrics["chat_text_acc/say"]  # text-only input is the chat model
            assert "lora_A" in state
        else:
            assert "lora_A" not in state  # merged into the decoder's weights


def test_bad_inputs_are_one_line(world, tmp_path):
    _root, w = world
    cfg = build_config(V.Config, SMALL, "vl")
    with pytest.raises(StageError, match="no images dataset"):
        V.run(cfg, {**inputs(w), "images": artifact("images", tmp_path / "nothing")}, make_ctx(tmp_path / "a"))
    rows = list(iter_rows(w["images"]))
    rows[0]["image"] = b"not a png"
    write_table(rows, tmp_path / "bad" / "part-00000.parquet", "images")
    with pytest.raises(StageError, match="holds no readable image"):
        V.run(cfg, {**inputs(w), "images": artifact("images", tmp_path / "bad")}, make_ctx(tmp_path / "b"))
    rows = list(iter_rows(w["images"]))
    rows[0]["messages"][0]["content"] += "<|image_pad|>"
    write_table(rows, tmp_path / "two" / "part-00000.parquet", "images")
    with pytest.raises(StageError, match="2 images in its first turn; one is supported"):
        V.run(cfg, {**inputs(w), "images": artifact("images", tmp_path / "two")}, make_ctx(tmp_path / "c"))
    with pytest.raises(StageError, match="not a model directory"):
        V.run(cfg, {**inputs(w), "grpo": artifact("grpo", tmp_path)}, make_ctx(tmp_path / "d"))
    assert not (tmp_path / "a" / "out" / "vl").exists()
    torch.manual_seed(0)

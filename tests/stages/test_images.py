"""stages/images.py: every task renders, answers are uniform-ish, splits follow the key, and the
compositional split holds every scene with a held-out colour x shape pair (and train none)."""
from __future__ import annotations

import io
from collections import Counter

from PIL import Image

from stages import images as I
from stages.contract import build_config
from storage.parquet import iter_rows
from tests.conftest import make_ctx


def test_stage_writes_every_task_with_captions_and_splits(tmp_path):
    cfg = build_config(I.Config, {"scenes_per_task": 60}, "images")
    res = I.run(cfg, {}, make_ctx(tmp_path))
    rows = list(iter_rows(tmp_path / "out" / "images"))
    scenes = 60 * (len(I.TASKS) - 2) + 60 * cfg.word_factor + 60 * cfg.relation_factor  # more word and relation scenes
    assert len(rows) == 2 * scenes and res.metrics["rows"] == len(rows)
    tasks = Counter(r["task"] for r in rows)
    assert tasks["caption"] == scenes and all(tasks[t] == 60 for t in I.TASKS if t not in ("word", "relation"))
    assert tasks["word"] == 60 * cfg.word_factor and tasks["relation"] == 60 * cfg.relation_factor
    assert {r["split"] for r in rows} <= {"train", "val", "test", "test_comp"}
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.size == (48, 48) and img.mode == "RGB"
        assert r["messages"][0]["content"].startswith(I.IMAGE) and r["messages"][1]["content"] == r["answer"]
    held = set(cfg.heldout_combos)
    for r in rows:  # no train row names a held-out pair in its caption
        if r["task"] == "caption" and r["split"] == "train":
            assert not any(c in r["answer"] for c in held), r["answer"]
    assert any(r["split"] == "test_comp" for r in rows)


def test_same_seed_same_bytes_and_split_by_key(tmp_path):
    cfg = I.Config(scenes_per_task=20)
    I.run(cfg, {}, make_ctx(tmp_path / "a"))
    I.run(cfg, {}, make_ctx(tmp_path / "b"))
    a = (tmp_path / "a" / "out" / "images" / "part-00000.parquet").read_bytes()
    assert a == (tmp_path / "b" / "out" / "images" / "part-00000.parquet").read_bytes()
    scene = {"objects": [{"colour": "red", "shape": "circle"}]}
    assert I.split_of("k", scene, cfg) == I.split_of("k", scene, cfg)
    assert I.split_of("k", {"objects": [{"colour": "red", "shape": "triangle"}]}, cfg) == "test_comp"


def test_answers_are_what_the_scene_shows():
    import random

    rng = random.Random(0)
    for _ in range(50):
        scene, question, answer, caption, key = I.make_scene("count", rng, 48)
        assert answer == str(len(scene["objects"]))
        scene, question, answer, caption, key = I.make_scene("relation", rng, 48)
        left, right = scene["objects"]
        assert left["x"] < right["x"]
        subject = f"{left['colour']} {left['shape']}" if answer == "left" else f"{right['colour']} {right['shape']}"
        assert question.startswith(f"Is the {subject} ")
        scene, question, answer, caption, key = I.make_scene("chart", rng, 48)
        assert answer == scene["labels"][scene["bars"].index(max(scene["bars"]))]


def test_attributes_read_back_what_each_scene_shows():
    import random

    rng = random.Random(1)
    for task in I.TASKS:
        scene, _question, answer, caption, _key = I.make_scene(task, rng, 48)
        attrs = I.attributes(task, answer, caption)
        objs = scene.get("objects", [])
        if task in ("colour", "shape", "position", "count"):
            assert (attrs["colour"], attrs["shape"]) == (objs[0]["colour"], objs[0]["shape"])
        if task == "relation":
            assert attrs == {"left_colour": objs[0]["colour"], "left_shape": objs[0]["shape"],
                             "right_colour": objs[1]["colour"], "right_shape": objs[1]["shape"]}
        if task in ("position", "count", "word", "chart"):
            assert attrs[task] == answer
    assert I.attributes("word", "cat", "the word cat") == {"word": "cat"}


def test_words_fit_inside_the_image():
    import random

    from PIL import ImageFont

    rng = random.Random(2)
    for _ in range(200):
        scene = I.make_scene("word", rng, 48)[0]
        _left, _top, right, bottom = ImageFont.load_default(size=scene["font_size"]).getbbox(scene["word"])
        assert scene["x"] + right <= 48 and scene["y"] + bottom <= 48

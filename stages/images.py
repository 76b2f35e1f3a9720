"""Image data: synthetic rendered scenes, their captions and short-answer questions, for the VL member.

What: writes `images` (schema `images`: id, PNG bytes, messages, answer, task, split), rendered with
Pillow from the seed. Every scene is `image_size` pixels square on a white background and gives two
rows: a caption (task "caption", for aligning the projector) and one question (for instruction
tuning), both in ChatML messages whose user turn holds the image as `<|vision_start|><|image_pad|>
<|vision_end|>` (one pad; the VL model repeats it to its image-token count). The tasks:

    colour    one shape                       "What colour is the shape?"            -> red
    shape     one shape                       "What shape is this?"                  -> circle
    count     1-4 equal shapes (3x3 cells)    "How many shapes are there?"           -> 3
    position  one shape in a quadrant         "Where is the shape?"                  -> top left
    relation  two shapes, one each side       "Is the red circle left or right of the blue square?" -> left
    word      a rendered word (OCR)           "What word is written?"                -> fox
    chart     three labelled bars             "Which bar is the highest?"            -> C

Answers are drawn uniformly; the hash split leaves each split's answers only roughly uniform, and the
VL stage scores an answer-balanced subset of each (stages/vl.py `balanced_per_task`), where the
majority answer of a task is its chance level. Words come from a fixed list of 8, drawn at 14-16 px
in bold ink, `word_factor` times as many scenes as the other tasks (reading them is recognising one
of 8 renderings at random places, sizes and ink colours, not open-vocabulary OCR). The font is
Pillow's built-in default (`load_default`), so no system font is needed.

Splits: a scene's equivalence key is its discrete description (kind, colours, shapes, cells, word,
bar heights; not the pixel jitter): its hash puts it in train, val (tuning) or test (reported only),
so a scene and its re-renderings never straddle splits. Compositional split `test_comp`: every
scene showing one of `heldout_combos` (colour x shape pairs: red triangle, green circle, ...) goes
there and nowhere else, so no train row ever shows those combinations; the colour, shape, count,
position and relation questions are scored on it beside `test`.

Run:
    python -m stages.images --config c.json --run-dir DIR        (c.json e.g. {"scenes_per_task": 500})
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from dataclasses import dataclass
from typing import Any

from stages.contract import StageContext, StageError, StageResult, main
from storage.artifacts import Artifact
from storage.parquet import write_table

INPUTS: tuple[str, ...] = ()
OUTPUTS = ("images",)

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20),
           "purple": (140, 50, 190), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
# eight words: at 24 (~40 train scenes each) the from-scratch tower read 13% of val words, see stages/vl.py
WORDS = ("cat", "dog", "sun", "box", "pen", "hat", "key", "owl")
LETTERS = "ABCDEFGH"
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("one", "two", "three", "four")
TASKS = ("colour", "shape", "count", "position", "relation", "word", "chart")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

QUESTIONS = {
    "colour": ("What colour is the shape?", "Which colour does the shape have?"),
    "shape": ("What shape is this?", "Which shape is shown?"),
    "count": ("How many shapes are there?", "Count the shapes."),
    "position": ("Where is the shape?", "In which part of the image is the shape?"),
    "word": ("What word is written?", "Read the word in the image."),
    "chart": ("Which bar is the highest?", "Which label has the tallest bar?"),
}


@dataclass(frozen=True)
class Config:
    scenes_per_task: int = 1200  # scenes drawn per task, before the split
    # reading needs the most examples: word scenes are word_factor x scenes_per_task. Measured on the
    # tiny tower (800 steps, all tasks, val): thin ink at 1200 word scenes read 0.42 of the words, bold
    # ink 0.64 at 1200 and 0.95 at 2400
    word_factor: int = 2
    # relation scenes are relation_factor x scenes_per_task: a third go to test_comp, and its blind
    # figure is decided by the question (which side the named objects are on), so it needs more test
    # questions than the others to tell chance apart (at 148 test scenes, blind 0.57 +- 0.07)
    relation_factor: int = 3
    image_size: int = 48
    val_frac: float = 0.1
    test_frac: float = 0.2  # at 0.1 the answer-balanced test sets of count and position held 28 and 60 questions
    heldout_combos: tuple[str, ...] = ("red triangle", "green circle", "blue square", "yellow diamond")

    def validate(self) -> None:
        if self.scenes_per_task < 10:
            raise ValueError(f"scenes_per_task must be >= 10, got {self.scenes_per_task}")
        if self.word_factor < 1 or self.relation_factor < 1:
            raise ValueError(f"word_factor and relation_factor must be >= 1, got {self.word_factor}, {self.relation_factor}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (the shapes and words need the room), got {self.image_size}")
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError("val_frac and test_frac must be in (0, 1) with a sum below 1")
        for combo in self.heldout_combos:
            colour, _, shape = combo.partition(" ")
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"heldout_combos: {combo!r} is not '<colour> <shape>' with a colour of "
                                 f"{list(COLOURS)} and a shape of {list(SHAPES)}")


# -- drawing ----------------------------------------------------------------------------------------------


def draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """A filled shape of half-size r centred at (cx, cy)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: dict[str, Any], size: int) -> bytes:
    """The scene as PNG bytes (RGB)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for obj in scene.get("objects", ()):
        draw_shape(draw, obj["shape"], obj["x"], obj["y"], obj["r"], COLOURS[obj["colour"]])
    if "word" in scene:
        font = ImageFont.load_default(size=scene["font_size"])
        # bold ink (a 1 px stroke round each glyph, ~3 px lines): the tower's stride-2 3x3 convolutions
        # miss much of a 1 px line, and thin-ink words sat at chance for 500 steps (see `Config.word_factor`)
        draw.text((scene["x"], scene["y"]), scene["word"], fill=scene["ink"], font=font,
                  stroke_width=scene.get("stroke", 0), stroke_fill=scene["ink"])
    if "bars" in scene:
        font = ImageFont.load_default(size=10)
        base = size - 12
        for i, (label, h) in enumerate(zip(scene["labels"], scene["bars"])):
            x0 = 4 + i * (size - 8) // 3
            draw.rectangle((x0 + 2, base - h, x0 + 11, base), fill=(70, 90, 160))
            draw.text((x0 + 4, base + 1), label, fill=(0, 0, 0), font=font)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return out.getvalue()


# -- scenes -----------------------------------------------------------------------------------------------


def one_object(rng: random.Random, size: int, r_range: tuple[int, int]) -> dict[str, Any]:
    r = rng.randint(*r_range)
    return {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "r": r,
            "x": rng.uniform(r + 1, size - r - 1), "y": rng.uniform(r + 1, size - r - 1)}


def quadrant(obj: dict[str, Any], size: int) -> str:
    return QUADRANTS[2 * (obj["y"] >= size / 2) + (obj["x"] >= size / 2)]


def make_scene(task: str, rng: random.Random, size: int) -> tuple[dict[str, Any], str, str, str, str]:
    """(scene, question, answer, caption, equivalence key) of one drawn scene of `task`."""
    if task in ("colour", "shape"):
        obj = one_object(rng, size, (7, 11))
        scene, answer = {"objects": [obj]}, obj[task]
        caption = f"a {obj['colour']} {obj['shape']}"
        # the place to 4 px, as for position: with the quadrant only, ~50 keys made up test and its
        # answers were far from uniform (the train-majority shape was 2% of test)
        key = f"{task}|{obj['colour']}|{obj['shape']}|{obj['r']}|{round(obj['x'] / 4)}|{round(obj['y'] / 4)}"
    elif task == "position":
        answer = rng.choice(QUADRANTS)
        q = QUADRANTS.index(answer)
        r = rng.randint(5, 8)
        half = size / 2
        obj = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "r": r,
               "x": (q % 2) * half + rng.uniform(r + 1, half - r - 1), "y": (q // 2) * half + rng.uniform(r + 1, half - r - 1)}
        scene = {"objects": [obj]}
        caption = f"a {obj['colour']} {obj['shape']} in the {answer}"
        key = f"position|{obj['colour']}|{obj['shape']}|{r}|{answer}|{round(obj['x'] / 4)}|{round(obj['y'] / 4)}"
    elif task == "count":
        n = rng.randint(1, 4)
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        cell = size / 3
        cells = rng.sample(range(9), n)
        objs = [{"colour": colour, "shape": shape, "r": 5, "x": (c % 3) * cell + cell / 2 + rng.uniform(-1.5, 1.5),
                 "y": (c // 3) * cell + cell / 2 + rng.uniform(-1.5, 1.5)} for c in cells]
        scene, answer = {"objects": objs}, str(n)
        caption = f"{NUMBER_WORDS[n - 1]} {colour} {shape}{'s' if n > 1 else ''}"
        key = f"count|{colour}|{shape}|{sorted(cells)}"
    elif task == "relation":
        (c1, s1), (c2, s2) = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
        while c1 == c2 or s1 == s2:
            (c1, s1), (c2, s2) = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
        r = 6
        left = {"colour": c1, "shape": s1, "r": r, "x": rng.uniform(r + 1, size / 2 - r - 2), "y": rng.uniform(r + 1, size - r - 1)}
        right = {"colour": c2, "shape": s2, "r": r, "x": rng.uniform(size / 2 + r + 2, size - r - 1), "y": rng.uniform(r + 1, size - r - 1)}
        scene = {"objects": [left, right]}
        subject, other = (left, right) if rng.random() < 0.5 else (right, left)
        answer = "left" if subject is left else "right"
        question = (f"Is the {subject['colour']} {subject['shape']} left or right of the "
                    f"{other['colour']} {other['shape']}?")
        caption = f"a {c1} {s1} left of a {c2} {s2}"
        # the key is the unordered pair: "A left of B" and its mirror "B left of A" are one problem, in one
        # split (keyed by the ordered pair, a test scene's mirror was often in train, and the question
        # alone then pointed at the wrong side: blind 0.42-0.44 against chance 0.50)
        pair = sorted([f"{c1}|{s1}", f"{c2}|{s2}"])
        return scene, question, answer, caption, f"relation|{pair[0]}|{pair[1]}"
    elif task == "word":
        word = rng.choice(WORDS)
        font_size = rng.randint(14, 16)  # letters ~8-11 px wide: at 11-13 px they blur into one 8px patch
        ink = rng.choice([(0, 0, 0), (30, 30, 120), (120, 20, 20), (20, 90, 20)])
        scene = {"word": word, "font_size": font_size, "ink": ink, "stroke": 1,
                 "x": rng.randint(1, size - 2 * font_size - 1), "y": rng.randint(0, size - font_size - 3)}  # descenders reach font_size + 2
        answer, caption = word, f"the word {word}"
        key = f"word|{word}|{font_size}|{scene['x'] // 4}|{scene['y'] // 4}"
    elif task == "chart":
        labels = rng.sample(LETTERS, 3)
        heights = rng.sample(range(6, size - 16, 3), 3)
        scene = {"bars": heights, "labels": labels}
        answer = labels[max(range(3), key=heights.__getitem__)]
        caption = f"a bar chart where bar {answer} is highest"
        key = f"chart|{''.join(labels)}|{heights}"
    else:
        raise ValueError(f"unknown task {task!r}")
    return scene, rng.choice(QUESTIONS[task]), answer, caption, key


def attributes(task: str, answer: str, caption: str) -> dict[str, str]:
    """What a scene shows, as named discrete attributes, read back from its question's answer and its
    caption (the templates of `make_scene`): the labels the VL stage pretrains its vision tower on.

        colour/shape/position  {"colour", "shape"} (+ "position")     relation {"left_colour", ...}
        count                  {"count", "colour", "shape"}           word {"word"}, chart {"chart"}
    """
    w = caption.split()
    if task in ("colour", "shape"):
        return {"colour": w[1], "shape": w[2]}
    if task == "position":
        return {"colour": w[1], "shape": w[2], "position": " ".join(w[5:])}
    if task == "count":
        return {"count": answer, "colour": w[1], "shape": w[2].removesuffix("s")}
    if task == "relation":
        return {"left_colour": w[1], "left_shape": w[2], "right_colour": w[6], "right_shape": w[7]}
    if task in ("word", "chart"):
        return {task: answer}
    raise ValueError(f"unknown task {task!r}")


def split_of(key: str, scene: dict[str, Any], cfg: Config) -> str:
    """test_comp for a scene showing a held-out colour x shape pair; else by the hash of its key."""
    combos = {f"{o['colour']} {o['shape']}" for o in scene.get("objects", ())}
    if combos & set(cfg.heldout_combos):
        return "test_comp"
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if u < cfg.val_frac else "test" if u < cfg.val_frac + cfg.test_frac else "train"


def scene_rows(task: str, index: int, scene: dict[str, Any], question: str, answer: str, caption: str, split: str,
               png: bytes) -> list[dict[str, Any]]:
    """The question row and the caption row of one scene."""
    base = hashlib.sha256(png + task.encode() + str(index).encode()).hexdigest()[:16]
    return [
        {"id": f"images:{base}:q", "image": png, "answer": answer, "task": task, "split": split,
         "messages": [{"role": "user", "content": f"{IMAGE}\n{question}"}, {"role": "assistant", "content": answer}]},
        {"id": f"images:{base}:c", "image": png, "answer": caption, "task": "caption", "split": split,
         "messages": [{"role": "user", "content": f"{IMAGE}\nDescribe the image."}, {"role": "assistant", "content": caption}]},
    ]


def summarize(counts: dict[str, dict[str, int]], cfg: Config) -> StageResult:
    """Scenes per task and split: the headline metrics and the markdown table."""
    splits = ("train", "val", "test", "test_comp")
    metrics = {f"scenes/{t}/{s}": float(counts[t].get(s, 0)) for t in counts for s in splits if counts[t].get(s)}
    metrics["rows"] = 2.0 * sum(sum(c.values()) for c in counts.values())  # a question and a caption per scene
    lines = ["| task (scenes) | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    lines += [f"| {t} | " + " | ".join(str(counts[t].get(s, 0)) for s in splits) + " |" for t in counts]
    summary = (f"Images: {int(metrics['rows'])} rows ({cfg.image_size}px scenes; each scene a question row and a caption row); "
               f"held out for test_comp: {', '.join(cfg.heldout_combos)}.\n\n" + "\n".join(lines))
    table = [{"task": t, **{s: counts[t].get(s, 0) for s in splits}} for t in counts]
    return StageResult(outputs={"images": {"rows": int(metrics["rows"])}}, metrics=metrics, summary=summary,
                       tables={"images": table})


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    try:
        from PIL import Image  # noqa: F401  (Pillow is a dependency; say so plainly if it is missing)
    except ImportError:
        raise StageError("images: Pillow is not installed; pip install pillow") from None
    rows: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    per_task = {task: cfg.scenes_per_task * {"word": cfg.word_factor, "relation": cfg.relation_factor}.get(task, 1) for task in TASKS}
    total, done = sum(per_task.values()), 0
    for task in TASKS:
        rng = random.Random(f"{ctx.seed}:{task}")
        counts[task] = {}
        for i in range(per_task[task]):
            scene, question, answer, caption, key = make_scene(task, rng, cfg.image_size)
            split = split_of(key, scene, cfg)
            rows += scene_rows(task, i, scene, question, answer, caption, split, render(scene, cfg.image_size))
            counts[task][split] = counts[task].get(split, 0) + 1
            done += 1
            if done % 500 == 0 or done == total:
                ctx.progress(done, total, "rendering scenes")
    if not any(r["split"] == "train" for r in rows):
        raise StageError("images: no train scenes; lower val_frac / test_frac or raise scenes_per_task")
    out = ctx.output("images")
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, out / "part-00000.parquet", "images")
    result = summarize(counts, cfg)
    ctx.tracker.log_metrics(result.metrics)
    ctx.tracker.log_text(result.summary, "images_summary.md")
    ctx.logger.info("images: %s", json.dumps({t: c for t, c in counts.items()}))
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

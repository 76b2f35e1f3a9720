"""The vision-language member: a tiny ViT, a projector and the final chat model, trained on images.

What: reads `grpo` (the final chat model), `images` (stages/images.py: scenes, captions, questions),
`chat` (the text conversations SFT learned) and `prompts` (held-out text prompts), and writes `vl`:
a model directory (models/vision.py `VLModel`: model.safetensors with vision.*, projector.* and
decoder.* weights, config.json {"family_vl": ...}, the chat model's tokenizer files, meta.json),
loaded by `VLModel.from_pretrained` and used by `family chat --image`.

How, in three phases (LLaVA-1.5, Liu et al. 2023, "Improved Baselines with Visual Instruction
Tuning"; MiniMind-V; nanoVLM), each checkpointed when it ends:

1. ViT pretraining. There is no pretrained SigLIP here, so the tower (a conv stem, models/vision.py)
   learns by multi-head attribute classification (`attribute_loss`): `AttributeHead` has one learned
   query per attribute a scene shows (stages/images.py `attributes`: colour, shape, count, position,
   left/right colour and shape of a relation, word, highest bar), each attends over the patch
   features and classifies its attribute. Measured on the tiny scenes (300 steps, val): parallel
   caption prediction (CapPa, the first version) gave a linear probe of shape 0.46, count 0.68, word
   0.10; attribute classification alone was no better (shape 0.51) -- the linear patch embedding was
   the limit; with the conv stem and 800 steps at lr 3e-3: colour 1.00, position 0.99, shape
   0.90-0.95, count 0.89, but words 0.42-0.49: thin 1 px ink sat at chance for ~500 steps. Bold ink
   and twice the word scenes (stages/images.py) read 0.79-0.96 of val words over five seeds at 800
   steps, 0.96-0.99 at 1100 (the default). vit_val_acc/<attribute> is reported.
   The head's attention pool is kept (`image_tokens` "both", the default): its learned attribute
   queries become image tokens after the 9 merged patches (the learned queries of BLIP-2's Q-Former
   and Qwen-VL's resampler), so what the tower was taught to pool reaches the decoder as one token
   per attribute. Measured at the same steps (val): patches alone read 0.77 of the words (the tower
   0.84), queries alone 0.91 but shape 0.94 and count 0.79; both, with the 1100-step tower, 0.97-0.99
   of the words with shape and count at 1.00.
2. Alignment (LLaVA stage 1): ViT and language model frozen, only the projector trains, on the
   caption rows ("Describe the image." -> "a red circle"), next-token CE on the assistant tokens.
   The frozen 4-layer decoder barely learns to describe through soft tokens (caption loss
   ~7.7 -> 5.8 in 60 steps), so the phase is short; it starts the projector, stage 3 does the work.
3. Instruction tuning (LLaVA stage 2): projector plus LoRA on the decoder, on the question rows.
   lora_scope "conversation" (default): partial LoRA (models/vision.py `PartialLoRALinear`) on every
   token of a conversation that holds an image, off for text-only input, so the VL model answers a
   text prompt exactly as the chat model does (text_delta is 0 by construction, and measured), as a
   frozen language model does in Flamingo; the adapters stay separate in the saved weights.
   Measured against the alternatives (val, 100 text prompts a task): lora_scope "all", a plain
   LoRA on every token with a `text_mix` share of `chat` train conversations in each batch
   (LLaVA-1.5 mixes ShareGPT text; `text_loss` "ce" on SFT's replies or "kl" to the chat model),
   merged into the weights, moved the text tasks by -5 to +8 points (arith -2 to -5, wordprob -11
   to +8 over four runs); lora_scope "image", adapters on the image tokens only (InternLM-
   XComposer2, Dong et al. 2024), cannot express the answers here (the text tokens only reach the
   image through K/V at image rows): colour 0.14, shape 0.01 with a ViT that reads colour at 1.00.

Proof it looks, on `test` (never trained on, nothing chosen by it) and `test_comp` (colour x shape
pairs no train row shows), at most `eval_per_task` questions per task with every answer equally
often (`balanced_per_task`): acc/<task> (greedy answer equals the
reference, case and trailing punctuation ignored) with its 95% half-width acc_ci95/<task>;
comp_acc/<task>; blind_acc/<task>, up to `blind_per_task` test questions (answer-balanced) each
shown the image of one other test row per answer of its task (`blind_partners`): what a model gets from the question alone, which for a model
that reads the image is 1 / answers, the majority rate of the balanced set; blank_acc/<task>, an empty white scene (the
background with no object: out of distribution, so a model that looks may answer anything, often
no valid answer; reported, not the blind figure, and never trained on); swap_acc/<task>, with the
image of another test row whose answer differs (a model that looks gets ~0); majority_acc/<task>,
always giving the task's most common train answer. Text: text_acc/<task> of the VL model and
chat_text_acc/<task> of the chat model on the same held-out text prompts (stages/chat/evaluate.py),
and their paired difference text_delta/<task> with its interval. val_acc/<task> is what the
settings were tuned on.

Deviations: the vision tower stays frozen after phase 1 (LLaVA-1.5 freezes CLIP too; nanoVLM trains
it) and its patch features are computed once per image; LLaVA's stage 2 trains the whole LM, here
LoRA does; one image per conversation, in the first user turn; a phase interrupted by a crash
restarts from its beginning (the checkpoints are at phase boundaries, each phase seeded on its own),
so a resumed run writes the same bytes as an uninterrupted one.

Run:
    python -m stages.vl --config c.json --inputs i.json --run-dir DIR
    with i.json = {"grpo": "CHAT_DIR", "images": "IMAGES_DIR", "chat": "CHAT_DATA", "prompts": "PROMPTS_DIR"}
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.generate import generate
from models.hf_export import copy_tokenizer_files
from models.lora import apply_lora, lora_parameters, merge_lora
from models.tokenizer import Tokenizer
from models.vision import (
    AttributeHead,
    VisionConfig,
    VLModel,
    attribute_loss,
    decode_png,
    expand_image_tokens,
)
from stages.chat.evaluate import generate_answers, pick_heldout, prompt_ids
from stages.contract import StageContext, StageError, StageResult, main
from stages.training import (
    Clock,
    TrainConfig,
    adamw,
    clip_gradients,
    open_model_input,
    set_lr,
    setup_runtime,
    write_run_meta,
)
from storage import checkpoints
from storage.artifacts import Artifact
from storage.parquet import iter_rows

INPUTS = ("grpo", "images", "chat", "prompts")
OUTPUTS = ("vl",)
GPU = True
IGNORE = -100
PHASES = ("vit", "align", "instruct")
COMP_TASKS = ("colour", "shape", "count", "position", "relation")


@dataclass(frozen=True)
class Config(TrainConfig):
    # the vision tower (models/vision.py VisionConfig; image_size comes from the data)
    patch_size: int = 8
    vit_d_model: int = 64
    vit_layers: int = 3
    vit_heads: int = 4
    merge: int = 2  # 2x2 patches per image token: a 48px image at patch 8 is 9 decoder tokens
    # image tokens: "patches" (the 9 merged patches, LLaVA), "queries" (the ViT head's learned attribute
    # queries kept as an attention pool, one token each, BLIP-2 / Qwen-VL style) or "both"
    image_tokens: Literal["patches", "queries", "both"] = "both"
    # phase 1: ViT pretraining (multi-head attribute classification)
    vit_steps: int = 1100  # two seeds whose tower read 0.79 and 0.90 of val words at 800 steps read 0.96 and 0.99
    vit_lr: float = 3e-3
    vit_batch_size: int = 64
    # phase 2: alignment (projector only)
    align_steps: int = 40
    align_lr: float = 2e-3
    # phase 3: instruction tuning (projector + LoRA)
    max_steps: int = 600  # tuned on val: 400 steps at lr 2e-3 read shape 0.84, 600 at 3e-3 0.97
    lr: float = 3e-3
    batch_size: int = 24
    lora_scope: Literal["image", "conversation", "all"] = "conversation"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    text_mix: float = 0.33  # lora_scope "all": share of each batch from the chat train conversations
    text_max_len: int = 96  # ... those of at most this many tokens (a 256-token row pads the whole batch to 256)
    # on those text rows: "kl" to the chat model's own next-token distribution (`text_kl`; keeps what GRPO
    # taught) or "ce" on the SFT targets (pulls the model back towards SFT's replies)
    text_loss: Literal["kl", "ce"] = "kl"
    # the policy's knobs for all three phases
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_minutes: float = 10.0
    log_every: int = 10
    # evaluation
    eval_per_task: int = 100  # image questions per task and split (test, test_comp, val) that are scored
    blind_per_task: int = 300  # test questions per task shown other images: blind must be told apart from chance
    max_new_tokens: int = 6  # the longest answer ("bottom right") is a few tokens
    eval_batch_size: int = 128
    text_tasks: tuple[str, ...] = ("arith", "count", "string", "wordprob")
    text_eval_per_task: int = 100
    text_max_new_tokens: int = 96

    def validate(self) -> None:
        for name in ("patch_size", "vit_d_model", "vit_layers", "vit_heads", "merge", "vit_batch_size", "batch_size",
                     "max_new_tokens", "eval_batch_size", "text_max_new_tokens", "eval_per_task", "text_max_len",
                     "blind_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vit_steps", "align_steps", "lora_r", "text_eval_per_task"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.vit_d_model % self.vit_heads:
            raise ValueError(f"vit_d_model={self.vit_d_model} is not a multiple of vit_heads={self.vit_heads}")
        if not 0.0 <= self.text_mix < 1.0:
            raise ValueError(f"text_mix must be in [0, 1), got {self.text_mix}")
        if self.vit_lr <= 0 or self.align_lr <= 0:
            raise ValueError("vit_lr and align_lr must be > 0")
        TrainConfig.validate(self)


# -- pure functions -------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".!").split())


def is_correct(completion: str, answer: str) -> bool:
    """The greedy answer equals the reference, ignoring case, spacing and a trailing full stop."""
    return normalize_answer(completion) == normalize_answer(answer)


def accuracy_ci(correct: list[bool]) -> tuple[float, float]:
    """(p, 95% half-width) of a share: p = k / n, 1.96 * sqrt(p (1 - p) / n) (normal approximation)."""
    n = len(correct)
    p = sum(correct) / max(1, n)
    return p, 1.96 * math.sqrt(p * (1 - p) / max(1, n))


def paired_delta(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """mean(a - b) over the same items and its 95% half-width 1.96 * sd(a - b) / sqrt(n)."""
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    if not d:
        return 0.0, 0.0
    mean = sum(d) / len(d)
    var = sum((v - mean) ** 2 for v in d) / max(1, len(d) - 1)
    return mean, 1.96 * math.sqrt(var / len(d))


def majority_answers(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per task, the most common answer (ties: the first in sorted order)."""
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        c = counts.setdefault(r["task"], {})
        c[r["answer"]] = c.get(r["answer"], 0) + 1
    return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}


def blind_partners(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(row, partner) pairs: each row with the image of one other row of its task per answer of the
    task (the first after it, cyclically, with that answer). The partners' answers are uniform by
    construction, so a model that reads the image scores exactly 1 / answers (the majority rate of
    an answer-balanced set), and one that answers from the question alone scores what the question
    tells it. Shifting the rows cyclically instead (the first version) left a reader's score to which
    answers the shifts happened to pair: 0.20 against 0.25 on count."""
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_task.setdefault(r["task"], []).append(i)
    pairs = []
    for idx in by_task.values():
        answers = sorted({rows[i]["answer"] for i in idx})
        for k, i in enumerate(idx):
            for a in answers:
                j = next((idx[(k + step) % len(idx)] for step in range(1, len(idx)) if rows[idx[(k + step) % len(idx)]]["answer"] == a), None)
                if j is not None:
                    pairs.append((i, j))
    return pairs


def balanced_per_task(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most n rows of each task with every answer of the task equally often: q = min(n // answers,
    the rarest answer's rows) of each answer, the first by id (ids are content hashes: a fixed random
    draw), then back in id order. On such a set the majority answer scores its chance level 1 / answers,
    and so does a model shown another row's image (blind): the hash split alone left the train-majority
    count at 0.08 of test and two-answer relation at 0.55."""
    by: dict[str, dict[str, list[int]]] = {}
    for i, r in enumerate(rows):
        by.setdefault(r["task"], {}).setdefault(r["answer"], []).append(i)
    keep: list[int] = []
    for answers in by.values():
        q = min(n // len(answers), min(len(v) for v in answers.values()))
        keep += [i for v in answers.values() for i in v[:max(1, q)]]
    return [rows[i] for i in sorted(keep)]


def swap_partners(rows: list[dict[str, Any]]) -> list[int]:
    """For each row, the index of the next row of its task (cyclically) whose answer differs, else itself."""
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_task.setdefault(r["task"], []).append(i)
    out = list(range(len(rows)))
    for idx in by_task.values():
        for k, i in enumerate(idx):
            for step in range(1, len(idx)):
                j = idx[(k + step) % len(idx)]
                if rows[j]["answer"] != rows[i]["answer"]:
                    out[i] = j
                    break
    return out


def text_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL from the chat model to the VL model on text tokens, averaged over the N positions:

        L = (1 / N) * sum_n sum_v p_t(v | n) * (log p_t(v | n) - log p_s(v | n))

    student_logits, teacher_logits: (N, V). Zero when the VL model computes the chat model's
    distribution; a regulariser in the spirit of Learning without Forgetting (Li and Hoiem 2016)."""
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


@contextmanager
def lora_off(model: torch.nn.Module):
    """The decoder without its LoRA updates (every LoRALinear's scale set to 0), i.e. the chat model."""
    from models.lora import LoRALinear

    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, sc in zip(layers, scales):
            m.scale = sc


def attribute_targets(labels: list[dict[str, str]], classes: dict[str, list[str]]) -> torch.Tensor:
    """(N, A) class index of each scene's attributes, in the sorted order of `classes`; -100 where a
    scene has no such attribute or a value the classes lack."""
    names = sorted(classes)
    index = {n: {c: i for i, c in enumerate(classes[n])} for n in names}
    return torch.tensor([[index[n].get(lab.get(n, ""), IGNORE) for n in names] for lab in labels], dtype=torch.long)


def scene_labels(rows: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """Per question row index, its scene's attributes (stages/images.py `attributes`), from the row's
    answer and the caption row of the same scene (ids `images:<scene>:q` and `images:<scene>:c`)."""
    from stages.images import attributes

    caption = {r["id"][:-2]: r["answer"] for r in rows if r["task"] == "caption"}
    return {i: attributes(r["task"], r["answer"], caption[r["id"][:-2]]) for i, r in enumerate(rows)
            if r["task"] != "caption" and r["id"][:-2] in caption}


class Stream:
    """Indices 0..n-1 in a seeded random order per epoch, taken k at a time."""

    def __init__(self, n: int, seed: list[int]):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self.order = np.random.default_rng(seed + [0]).permutation(n)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = np.random.default_rng(self.seed + [self.epoch]).permutation(self.n)
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out


def collate(examples: list[tuple[list[int], list[int], int]], pad_id: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded (B, T) inputs and targets, and the image index of each row that has one, in order."""
    T = max(len(x) for x, _, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (ids, targets, _) in enumerate(examples):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, :len(targets)] = torch.tensor(targets)
    return x.to(device), y.to(device), [img for _, _, img in examples if img >= 0]


# -- data -------------------------------------------------------------------------------------------------


def encode(tok: Tokenizer, messages: list[dict[str, str]], image_tokens: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one conversation; targets are the assistant's tokens, else -100."""
    msgs = [{**m, "content": expand_image_tokens(m["content"], image_tokens)} for m in messages]
    ids, mask = tok.encode_chat(msgs)
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]


def load_images(path: str, size_hint: int | None = None) -> tuple[list[dict[str, Any]], torch.Tensor, int]:
    """The rows of the `images` dataset (sorted by id, each with "img": its index in the pixel
    tensor), the pixels of the distinct images (N, 3, S, S) and S."""
    try:
        rows = sorted(iter_rows(path), key=lambda r: r["id"])
    except FileNotFoundError:
        raise StageError(f"vl: no images dataset at {path}; rebuild the images stage") from None
    if not rows:
        raise StageError(f"vl: the images dataset at {path} is empty; rebuild the images stage")
    import io

    from PIL import Image

    size = size_hint or Image.open(io.BytesIO(rows[0]["image"])).size[0]
    index: dict[str, int] = {}
    pixels = []
    for r in rows:
        h = hashlib.sha256(r["image"]).hexdigest()
        if h not in index:
            index[h] = len(pixels)
            try:
                pixels.append(decode_png(r["image"], size))
            except Exception as e:  # a corrupt PNG in the dataset
                raise StageError(f"vl: row {r['id']} of {path} holds no readable image ({type(e).__name__}); "
                                 f"rebuild the images stage") from None
        r["img"] = index[h]
        if r["messages"][0]["content"].count("<|image_pad|>") != 1:
            raise StageError(f"vl: row {r['id']} of {path} has {r['messages'][0]['content'].count('<|image_pad|>')} "
                             f"images in its first turn; one is supported")
    return rows, torch.stack(pixels), size


# -- evaluation --------------------------------------------------------------------------------------------


@torch.no_grad()
def answer(model: VLModel, tok: Tokenizer, rows: list[dict[str, Any]], features: torch.Tensor, max_new_tokens: int,
           batch_size: int) -> list[str]:
    """Greedy answers to the rows' questions, row i looking at features[i] (N, image_tokens, d)."""
    n_img = model.vcfg.image_tokens
    out: list[str] = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo:lo + batch_size]
        ids = [prompt_ids(tok, [{**m, "content": expand_image_tokens(m["content"], n_img)} for m in r["messages"][:-1]])
               for r in chunk]
        model.set_images(features[lo:lo + len(chunk)])
        try:
            new = generate(model.decoder, ids, max_new_tokens, stop_ids=(tok.im_end_id, tok.eot_id), pad_id=tok.pad_id)
        finally:
            model.set_images(None)
        out += [tok.decode(t, skip_special_tokens=True).strip() for t in new]
    return out


def per_task(rows: list[dict[str, Any]], correct: list[bool], prefix: str, ci: bool = False) -> dict[str, float]:
    by: dict[str, list[bool]] = {}
    for r, c in zip(rows, correct, strict=True):
        by.setdefault(r["task"], []).append(c)
    out = {}
    for task, v in sorted(by.items()):
        p, half = accuracy_ci(v)
        out[f"{prefix}/{task}"] = p
        if ci:
            out[f"{prefix}_ci95/{task}"] = half
    return out


# -- the report ----------------------------------------------------------------------------------------------


def summarize(cfg: Config, derived: dict[str, Any], metrics: dict[str, float], curve: list[dict[str, Any]],
              samples: list[dict[str, Any]], stop: str) -> StageResult:
    """The headline metrics, the per-task table and the markdown summary."""
    tasks = sorted({k.split("/", 1)[1] for k in metrics if k.startswith("acc/")})
    cols = ("acc", "acc_ci95", "comp_acc", "blind_acc", "blank_acc", "swap_acc", "majority_acc", "val_acc")
    table = [{"task": t, "test_rows": derived["test_rows"].get(t, 0), **{c: metrics.get(f"{c}/{t}") for c in cols}} for t in tasks]
    text_tasks = sorted({k.split("/", 1)[1] for k in metrics if k.startswith("text_acc/")})
    text_table = [{"task": t, "text_acc": metrics[f"text_acc/{t}"], "chat_text_acc": metrics[f"chat_text_acc/{t}"],
                   "text_delta": metrics[f"text_delta/{t}"], "text_delta_ci95": metrics[f"text_delta_ci95/{t}"]} for t in text_tasks]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    vit_acc = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in sorted(metrics.items()) if k.startswith("vit_val_acc/"))
    lines = [(f"VL: ViT {derived['vit_params'] / 1e6:.2f}M params ({derived['vit_steps']} steps; val attribute accuracy: "
             f"{vit_acc}), projector {derived['projector_params'] / 1e3:.0f}k "
             f"({derived['align_steps']} align steps), instruct {derived['instruct_steps']} steps with "
             f"{derived['lora']} ({derived['trainable_params'] / 1e3:.0f}k trainable); {derived['image_tokens']} image tokens "
             f"per {derived['image_size']}px image; stopped by {stop}."), "",
             ("Held-out image questions (test; comp = colour x shape pairs never trained on; blind = the images of "
             "other rows of the task, one per answer; blank = an empty white scene; "
             "swap = another image with another answer):"), "",
             "| " + " | ".join(table[0]) + " |" if table else "", "|" + "---|" * (len(cols) + 2) if table else ""]
    lines += ["| " + " | ".join(fmt(r[k]) for k in r) + " |" for r in table]
    if text_table:
        lines += ["", "Text tasks (held-out prompts, greedy): VL model vs the chat model it started from:", "",
                  "| task | text_acc | chat_text_acc | delta | ±95% |", "|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['text_acc']:.3f} | {r['chat_text_acc']:.3f} | {r['text_delta']:+.3f} | {r['text_delta_ci95']:.3f} |"
                  for r in text_table]
    lines += ["", "Samples:", ""] + [f"- [{s['task']}] {s['question']!r} -> {s['completion']!r} (answer {s['answer']!r})" for s in samples]
    return StageResult(outputs={"vl": {"params": derived["params"], "acc": metrics.get("acc")}}, metrics=metrics,
                       summary="\n".join(lines), tables={"eval": table, "text_eval": text_table, "curve": curve, "samples": samples},
                       warnings=[(f"stopped_by: max_minutes: vl ended a phase early after the {cfg.max_minutes:g}-minute safety "
                                 f"cap; its result depends on this machine's speed. Lower vl's step budgets or raise "
                                 f"vl.max_minutes")] if stop == "max_minutes" else [])


# -- the stage -----------------------------------------------------------------------------------------------


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    log = ctx.logger
    # setup: the chat model (frozen throughout, but for its LoRA), the data
    rt = setup_runtime(ctx)
    device = rt.device
    chat_dir, tok, decoder = open_model_input(inputs, "grpo", "vl", device)
    rows, pixels, size = load_images(inputs["images"].path)
    split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test", "test_comp")}
    train_caps = [r for r in split["train"] if r["task"] == "caption"]
    train_qs = [r for r in split["train"] if r["task"] != "caption"]
    if not train_caps or not train_qs:
        raise StageError(f"vl: {inputs['images'].path} has no train captions or questions; rebuild the images stage")
    labels = {s: [lab for _, lab in sorted(scene_labels(split[s]).items())] for s in ("train", "val")}
    label_img = {s: [split[s][i]["img"] for i in sorted(scene_labels(split[s]))] for s in ("train", "val")}
    classes = {n: sorted({lab[n] for lab in labels["train"] if n in lab}) for n in sorted({n for lab in labels["train"] for n in lab})}
    vcfg = VisionConfig(image_size=size, patch_size=cfg.patch_size, d_model=cfg.vit_d_model, n_layers=cfg.vit_layers,
                        n_heads=cfg.vit_heads, d_ff=4 * cfg.vit_d_model, merge=cfg.merge,
                        pool_queries=len(classes) if cfg.image_tokens != "patches" else 0,
                        patch_tokens=cfg.image_tokens != "queries")
    n_img = vcfg.image_tokens
    try:
        text_rows = sorted((r for r in iter_rows(inputs["chat"].path) if r["split"] == "train"), key=lambda r: r["id"]) \
            if cfg.lora_scope == "all" and cfg.text_mix > 0 else []
        text_prompts = [r for r in pick_heldout(iter_rows(inputs["prompts"].path), cfg.text_eval_per_task)
                        if r["task"] in cfg.text_tasks] if cfg.text_eval_per_task else []
    except FileNotFoundError as e:
        raise StageError(f"vl: no dataset at {e.filename}; rebuild the instruct stage") from None

    # the model: a fresh ViT and projector, the chat model as the decoder; the ViT's pretraining head
    torch.manual_seed(ctx.seed * 1000)  # the ViT's, projector's and head's initial weights
    model = VLModel(vcfg, decoder, tok.image_pad_id).to(device)
    head = AttributeHead(vcfg.d_model, [len(classes[n]) for n in sorted(classes)]).to(device)
    derived: dict[str, Any] = {
        "image_size": size, "image_tokens": n_img, "vision": dataclasses.asdict(vcfg), "attributes": {n: len(c) for n, c in classes.items()},
        "train_captions": len(train_caps), "train_questions": len(train_qs),
        "text_rows": len(text_rows), "text_prompts": len(text_prompts), "distinct_images": len(pixels),
        "vit_params": sum(p.numel() for p in model.vision.parameters()),
        "projector_params": sum(p.numel() for p in model.projector.parameters()), "params": 0,
        "vit_steps": cfg.vit_steps, "align_steps": cfg.align_steps, "instruct_steps": cfg.max_steps,
        "device": str(device),
    }

    # resume: the last finished phase (its weights, curve and measurements)
    ck_path = checkpoints.latest(ctx.checkpoint_dir)
    done, curve, state, lora_layers = 0, [], {}, []
    clock = Clock()
    if ck_path is not None:
        try:
            weights, _, state = checkpoints.load(ck_path, map_location=str(device))
            done, curve = state["step"], state["curve"]
            clock = Clock(state["elapsed_s"])
            if done >= 3:
                lora_layers = attach_lora(model, cfg)
            own = {k: v for k, v in weights.items() if not k.startswith("head.")}
            if decoder.cfg.tie_embeddings:
                own["decoder.lm_head.weight"] = own["decoder.embed_tokens.weight"]
            model.load_state_dict(own)
            head.load_state_dict({k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")})
        except Exception as e:
            raise StageError(f"vl: checkpoint {ck_path} does not load ({type(e).__name__}: {str(e)[:200]}); delete it "
                             f"to start over") from None
        log.info("vl: resumed after phase %s", PHASES[done - 1])
    measured: dict[str, float] = state.get("measured", {})
    stop = state.get("stop", "max_steps")

    # the chat model's text accuracy, before any phase can change the decoder
    text_chat: list[bool] = state.get("chat_text_correct", [])
    if text_prompts and not text_chat:
        with clock.paused():
            ctx.progress(0, 1, "vl: chat model text eval")
            text_chat = text_correct(model, tok, text_prompts, cfg)

    def save(phase: int) -> None:
        """A checkpoint at the end of a phase: every weight (the ViT's head too) and what was measured."""
        weights = {**{k: v for k, v in model.state_dict().items() if k != "decoder.lm_head.weight"},
                   **{f"head.{k}": v for k, v in head.state_dict().items()}}
        checkpoints.save(ctx.checkpoint_dir, phase, weights, None, {"curve": curve, "measured": measured, "stop": stop,
                                                                    "elapsed_s": clock.seconds,
                                                                    "chat_text_correct": text_chat}, keep=1)

    # phase 1: ViT pretraining by attribute classification on the train scenes
    vit_img = torch.tensor(label_img["train"])
    vit_t = attribute_targets(labels["train"], classes)
    if done < 1:
        torch.manual_seed(ctx.seed * 1000 + 1)
        model.requires_grad_(False)
        model.vision.requires_grad_(True)
        pcfg = dataclasses.replace(cfg, lr=cfg.vit_lr)
        trainable = torch.nn.ModuleList([model.vision, head])
        opt = adamw(trainable, pcfg, device)
        order = Stream(len(vit_img), [ctx.seed, 1])
        model.vision.train()
        for step in range(cfg.vit_steps):
            if clock.over(cfg.max_minutes):
                stop = "max_minutes"
                break
            lr = set_lr(opt, pcfg, step, cfg.vit_steps)
            idx = order.take(cfg.vit_batch_size)
            loss = attribute_loss(head(model.vision(pixels[vit_img[idx]].to(device))), vit_t[idx].to(device))
            loss.backward()
            grad_norm = clip_gradients(trainable.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vit_steps:
                curve.append({"phase": "vit", "step": step + 1, "loss": loss.item()})
                ctx.tracker.log_metrics({"train/vit_loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm.item()}, step=step + 1)
                ctx.progress(step + 1, cfg.vit_steps, "vl: ViT pretraining", loss=loss.item())
        model.vision.eval()
        with clock.paused(), torch.no_grad():  # the tower's held-out (val) accuracy per attribute: what it can see
            if label_img["val"]:
                vt = attribute_targets(labels["val"], classes)
                logits = [head(model.vision(pixels[label_img["val"][i:i + 256]].to(device))) for i in range(0, len(vt), 256)]
                for a, name in enumerate(sorted(classes)):
                    pred = torch.cat([lg[a].argmax(-1).cpu() for lg in logits])
                    has = vt[:, a] != IGNORE
                    if has.any():
                        measured[f"vit_val_acc/{name}"] = float((pred[has] == vt[has, a]).float().mean())
        if model.projector.pool is not None:  # the head's attribute queries become the projector's pool
            model.projector.pool.load_state_dict(head.pool.state_dict())
        save(1)

    # the ViT is frozen from here on: its patch features, once per distinct image (and a blank one)
    model.requires_grad_(False)
    model.vision.eval()
    with torch.no_grad():
        blank = torch.ones(1, 3, size, size)
        patches = torch.cat([model.vision(x.to(device)) for x in torch.cat([pixels, blank]).split(256)])  # (N + 1, P, d)
    blank_idx = len(pixels)

    def steps(phase: int, name: str, examples: list[tuple[list[int], list[int], int]], n_steps: int, lr: float,
              text_examples: list[tuple[list[int], list[int], int]]) -> None:
        """One decoder phase: next-token CE on the assistant tokens, the model's trainable parameters."""
        nonlocal stop
        pcfg = dataclasses.replace(cfg, lr=lr)
        opt = adamw(model, pcfg, device)
        order = Stream(len(examples), [ctx.seed, phase])
        text_order = Stream(len(text_examples), [ctx.seed, phase, 1]) if text_examples else None
        n_text = round(cfg.text_mix * cfg.batch_size) if text_order is not None else 0
        model.train()
        for step in range(n_steps):
            if clock.over(cfg.max_minutes):
                stop = "max_minutes"
                break
            lr_now = set_lr(opt, pcfg, step, n_steps)
            batch = [examples[i] for i in order.take(cfg.batch_size - n_text)]
            batch += [text_examples[i] for i in text_order.take(n_text)] if n_text else []
            x, y, imgs = collate(batch, tok.pad_id, device)
            model.set_images(model.projector(patches[imgs]))
            h = model.decoder.hidden(x)  # (B, T, d); the head runs on the assistant tokens only
            model.set_images(None)
            if n_text and cfg.text_loss == "kl":  # the text rows (the batch's last n_text): KL to the chat model
                n_i = len(batch) - n_text
                sel = y[:n_i] != IGNORE
                loss = F.cross_entropy(model.decoder.lm_head(h[:n_i][sel]).float(), y[:n_i][sel])
                tsel = y[n_i:] != IGNORE
                with torch.no_grad(), lora_off(model.decoder):
                    teacher = model.decoder.lm_head(model.decoder.hidden(x[n_i:])[tsel])
                loss = loss + text_kl(model.decoder.lm_head(h[n_i:][tsel]), teacher)
            else:
                sel = y != IGNORE
                loss = F.cross_entropy(model.decoder.lm_head(h[sel]).float(), y[sel])
            loss.backward()
            grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
                curve.append({"phase": name, "step": step + 1, "loss": loss.item()})
                ctx.tracker.log_metrics({f"train/{name}_loss": loss.item(), "train/lr": lr_now,
                                         "train/grad_norm": grad_norm.item()}, step=step + 1)
                ctx.progress(step + 1, n_steps, f"vl: {name}", loss=loss.item())
        model.eval()

    # phase 2: alignment, the projector only, on the captions
    if done < 2:
        torch.manual_seed(ctx.seed * 1000 + 2)
        model.projector.requires_grad_(True)
        caps = [(*encode(tok, r["messages"], n_img), r["img"]) for r in train_caps]
        steps(2, "align", caps, cfg.align_steps, cfg.align_lr, [])
        save(2)

    # phase 3: instruction tuning, projector + LoRA, on the questions (and text rows for lora_scope "all")
    if done < 3:
        torch.manual_seed(ctx.seed * 1000 + 3)
        lora_layers = attach_lora(model, cfg)
        model.projector.requires_grad_(True)
        qs = [(*encode(tok, r["messages"], n_img), r["img"]) for r in train_qs]
        texts = [(*encode(tok, r["messages"], n_img), -1) for r in text_rows]
        texts = [t for t in texts if len(t[0]) <= min(cfg.text_max_len, decoder.cfg.max_seq_len) and any(v != IGNORE for v in t[1])]
        steps(3, "instruct", qs, cfg.max_steps, cfg.lr, texts)
        save(3)
    derived["trainable_params"] = sum(p.numel() for p in model.projector.parameters()) + \
        sum(p.numel() for p in lora_parameters(model.decoder))
    derived["lora"] = f"{'' if cfg.lora_scope == 'all' else cfg.lora_scope + '-gated '}LoRA r={cfg.lora_r} on {len(lora_layers)} layers" \
        if cfg.lora_r else "no LoRA"
    if cfg.lora_scope == "all" and cfg.lora_r:
        merge_lora(model.decoder)
        model.requires_grad_(False)
    model.eval()

    # evaluation: test, test_comp, blind, swapped, val; the text tasks
    with torch.no_grad():
        feats = model.projector(patches)  # (N + 1, image_tokens, d)
    qrows = {s: balanced_per_task([r for r in split[s] if r["task"] != "caption"], cfg.eval_per_task)
             for s in ("val", "test", "test_comp")}
    derived["test_rows"] = {t: sum(r["task"] == t for r in qrows["test"]) for t in sorted({r["task"] for r in qrows["test"]})}
    metrics: dict[str, float] = dict(measured)
    ctx.progress(0, 6, "vl: evaluation")
    test = qrows["test"]
    blind_rows = balanced_per_task([r for r in split["test"] if r["task"] != "caption"], cfg.blind_per_task)
    blind = blind_partners(blind_rows)
    results = {}
    for name, rows_, f in (("acc", test, feats[[r["img"] for r in test]]),
                           ("comp_acc", [r for r in qrows["test_comp"] if r["task"] in COMP_TASKS], None),
                           ("blind_acc", [blind_rows[i] for i, _ in blind], feats[[blind_rows[j]["img"] for _, j in blind]]),
                           ("blank_acc", test, feats[[blank_idx] * len(test)]),
                           ("swap_acc", test, feats[[test[j]["img"] for j in swap_partners(test)]]),
                           ("val_acc", qrows["val"], feats[[r["img"] for r in qrows["val"]]])):
        if not rows_:
            continue
        f = feats[[r["img"] for r in rows_]] if f is None else f
        completions = answer(model, tok, rows_, f, cfg.max_new_tokens, cfg.eval_batch_size)
        correct = [is_correct(c, r["answer"]) for c, r in zip(completions, rows_)]
        results[name] = (rows_, completions)
        metrics.update(per_task(rows_, correct, name, ci=True))
        ctx.progress(len(results), 6, "vl: evaluation")
    majority = majority_answers(train_qs)
    metrics.update(per_task(test, [is_correct(majority[r["task"]], r["answer"]) for r in test], "majority_acc"))
    if test:
        metrics["acc"] = sum(is_correct(c, r["answer"]) for c, r in zip(results["acc"][1], test)) / len(test)
    if text_prompts:
        with torch.no_grad():
            text_vl = text_correct(model, tok, text_prompts, cfg)
        metrics.update(per_task(text_prompts, text_vl, "text_acc"))
        metrics.update(per_task(text_prompts, text_chat, "chat_text_acc"))
        for task in sorted({r["task"] for r in text_prompts}):
            idx = [i for i, r in enumerate(text_prompts) if r["task"] == task]
            d, half = paired_delta([text_vl[i] for i in idx], [text_chat[i] for i in idx])
            metrics[f"text_delta/{task}"], metrics[f"text_delta_ci95/{task}"] = d, half
    derived["params"] = sum(p.numel() for p in model.parameters())
    samples = [{"task": r["task"], "question": r["messages"][0]["content"].split("\n", 1)[-1], "completion": c,
                "answer": r["answer"]} for r, c in list(zip(*results["acc"]))[::max(1, len(test) // 14)]] if test else []
    result = summarize(cfg, derived, metrics, curve, samples, stop)
    ctx.tracker.log_metrics(result.metrics)

    # save `vl`: weights + config (models/vision.py), the chat model's tokenizer, meta.json
    out = ctx.output("vl")
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    copy_tokenizer_files(chat_dir, out)
    write_run_meta(out, "vl", cfg.vit_steps + cfg.align_steps + cfg.max_steps, cfg.vit_steps + cfg.align_steps + cfg.max_steps,
                   stop, result.metrics, derived, cfg, curve, chat=inputs["grpo"].fingerprint, images=inputs["images"].fingerprint)
    ctx.tracker.log_text(result.summary, "vl_summary.md")
    return result


def attach_lora(model: VLModel, cfg: Config) -> list[str]:
    """The phase-3 adapters: partial LoRA (image tokens only) or a plain LoRA on every token."""
    if not cfg.lora_r:
        return []
    try:
        if cfg.lora_scope in ("image", "conversation"):
            return model.add_partial_lora(cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_scope)
        return apply_lora(model.decoder, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha)
    except ValueError as e:
        raise StageError(f"vl: lora_targets: {e}") from None


def text_correct(model: VLModel, tok: Tokenizer, rows: list[dict[str, Any]], cfg: Config) -> list[bool]:
    """Per held-out text prompt: is the decoder's greedy answer right (its verifier)."""
    from stages.chat.verifiers import verify

    answers = generate_answers(model.decoder, tok, [r["prompt"] for r in rows], cfg.text_max_new_tokens, cfg.eval_batch_size)
    return [bool(verify(r["verifier"], a, r["answer"])) for r, a in zip(rows, answers)]


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

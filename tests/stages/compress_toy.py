"""A toy teacher for the compression stages' tests (distill, quantize), built in a few seconds on CPU.

The task of tests/stages/alignment_toy.py ("Say b." -> "b"), learned this time: the teacher is a
d_model 64 GPT trained on the right letters, so a student has something to inherit. Every width is a
multiple of 32, as Q4_0 blocks need, and so is the width of its half-width student.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from models.gpt import GPT, GPTConfig
from models.hf_export import save_model_dir
from models.tokenizer import Tokenizer
from stages.chat.preference import pad_right
from storage.parquet import write_table
from tests.stages.alignment_toy import chat, make_tokenizer, questions, write_prompts


def chat_rows() -> list[dict]:
    rows = []
    for split in ("train", "val"):
        for i, (q, a) in enumerate(questions(split)):
            prompt, reply = chat(q, a)
            rows.append({"id": f"{split}-{i:03d}", "messages": prompt + reply, "task": "say", "source": "toy", "split": split})
    return rows  # 16 train, 8 val conversations


def qwen2_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A tokenizer as the tokenizer stage trains it (Qwen2's pre-tokenizer), on the toy questions and
    some standard-library documentation."""
    import pydoc
    import textwrap

    from stages.tokenizer import train_bpe

    texts = [q for split in ("train", "val") for q, _ in questions(split)] + ["user assistant system"] * 5
    texts += [pydoc.render_doc(m, renderer=pydoc.plaintext) for m in (textwrap, json)]
    return Tokenizer(train_bpe(iter(texts), vocab_size, 2))


def make_teacher(root: Path, steps: int = 60, seed: int = 0, tok: Tokenizer | None = None) -> Path:
    """A model directory (with tokenizer files, eos <|im_end|>) that answers the toy task."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = tok or make_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    train = questions("train") + questions("val")  # the toy teacher may know the val answers: it is the reference
    for _ in range(steps):
        seqs, masks = [], []
        for q, a in rng.choices(train, k=32):
            prompt, reply = chat(q, a)
            ids, mask = tok.encode_chat(prompt + reply)
            seqs.append(ids)
            masks.append(mask)
        ids = pad_right(seqs, tok.pad_id)
        targets = torch.full_like(ids, -100)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            for t in range(1, len(s)):
                if m[t]:
                    targets[i, t - 1] = s[t]
        _, loss = model(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
    tok_dir = root / "tok"
    tok.save(tok_dir, eos_token="<|im_end|>")
    return save_model_dir(model.eval(), tok_dir, root / "teacher", hf=False)


def make_world(root: Path) -> dict[str, Path]:
    teacher = make_teacher(root)
    write_table(chat_rows(), root / "chat" / "part-00000.parquet", "chat")
    return {"teacher": teacher, "chat": root / "chat", "prompts": write_prompts(root / "prompts")}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())

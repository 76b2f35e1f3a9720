"""A toy chat world for the alignment stages' tests (reward, dpo, grpo), built in seconds on CPU.

Task "say": the user asks for one of four letters ("Say b.", "Please answer with b."); the right
reply is that letter. `make_model_dir` trains a tiny GPT for a few steps on replies drawn at RANDOM
from the four letters, so the model has learned the reply format (one letter, then <|im_end|>) but
not which letter: about 25% correct, a clear signal for preference learning and for GRPO.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from models.gpt import GPT, GPTConfig
from models.tokenizer import SPECIAL_TOKENS, Tokenizer
from stages.chat.preference import pad_right
from storage.parquet import write_table

LETTERS = ("a", "b", "c", "d")
TEMPLATES = ("Say {}.", "Please answer with {}.", "Reply {}.", "Write the letter {}.", "Give me {}.", "Just {}.")
VAL_TEMPLATES = ("Give me {}.", "Just {}.")


def questions(split: str) -> list[tuple[str, str]]:
    templates = VAL_TEMPLATES if split == "val" else [t for t in TEMPLATES if t not in VAL_TEMPLATES]
    return [(t.format(x), x) for t in templates for x in LETTERS]


def make_tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [q for split in ("train", "val") for q, _ in questions(split)] + ["user assistant system"] * 5
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


def chat(q: str, a: str) -> tuple[list[dict], list[dict]]:
    return [{"role": "user", "content": q}], [{"role": "assistant", "content": a}]


def make_model_dir(root: Path, seed: int = 0, steps: int = 40, lr: float = 5e-3) -> Path:
    """A tiny "SFT" model directory whose replies have the right format but a random letter."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = make_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    train = questions("train")
    for _ in range(steps):
        seqs, masks = [], []
        for q, _ in rng.choices(train, k=32):
            prompt, reply = chat(q, rng.choice(LETTERS))
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
    out = root / "sft"
    model.save_pretrained(out)
    tok.save(out, eos_token="<|im_end|>")
    return out


def write_prefs(path: Path, refusals: bool = False) -> Path:
    """chosen = the asked letter, rejected = another letter (every wrong letter once), or with
    `refusals` a refusal (an easy preference: a property of the reply alone)."""
    rows = []
    for split in ("train", "val"):
        for q, a in questions(split):
            for wrong in LETTERS:
                if wrong != a:
                    prompt, chosen = chat(q, a)
                    rejected = "I will not say that." if refusals else wrong
                    rows.append({"id": f"{q}|{wrong}", "prompt": prompt, "chosen": chosen,
                                 "rejected": chat(q, rejected)[1], "task": "refusal" if refusals else "letter",
                                 "source": "toy", "split": split})
    write_table(rows, path / "part-00000.parquet", "prefs")
    return path


def write_prompts(path: Path, always: str | None = None) -> Path:
    """The questions with their letter as the reference answer; with `always`, that letter for every
    question instead (a trivially learnable task: the reward does not depend on the prompt)."""
    rows = [{"id": q, "prompt": chat(q, a)[0], "answer": always or a, "verifier": "exact", "task": "say",
             "source": "toy", "split": split} for split in ("train", "val") for q, a in questions(split)]
    write_table(rows, path / "part-00000.parquet", "prompts")
    return path

"""SFT: loss only on assistant tokens, packed conversations never see each other, a short run learns a
task and resumes exactly, LoRA runs save a plain model.

The synthetic task is a lookup ("opposite of hot?" -> "cold") small enough for a random 2-layer model
to learn in a few dozen steps. Its val prompts repeat the train items: the test checks that the
training loop learns, not that a tiny model generalises.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.gpt import GPT, GPTConfig
from models.tokenizer import Tokenizer
from stages import sft
from stages.chat.evaluate import evaluate_prompts
from stages.contract import StageError
from stages.tokenizer import train_bpe
from storage.parquet import iter_rows, write_table
from tests.conftest import artifact, make_ctx

PAIRS = [("hot", "cold"), ("up", "down"), ("big", "small"), ("yes", "no"), ("day", "night"),
         ("left", "right"), ("fast", "slow"), ("open", "shut")]


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE (the tokenizer stage's trainer) on the synthetic task's text."""
    texts = [f"opposite of {a}? {b}. What is 2 + 3? 5" for a, b in PAIRS] * 4
    return Tokenizer(train_bpe(iter(texts), vocab_size=300, min_frequency=2))


def tiny_model_dir(path: Path, tok: Tokenizer, seed: int = 0) -> Path:
    """A model directory (weights, config, tokenizer files) holding an untrained tiny GPT."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
    model.save_pretrained(path)
    tok.save(path)
    return path


def task_data(root: Path) -> tuple[Path, Path]:
    """`chat` and `prompts` datasets of the lookup task (train, and val repeating the train prompts)."""
    chat, prompts = [], []
    for split in ("train", "val"):
        for i, (a, b) in enumerate(PAIRS):
            question = [{"role": "user", "content": f"opposite of {a}?"}]
            chat.append({"id": f"{split}-{i}", "messages": question + [{"role": "assistant", "content": b}],
                         "task": "opposite", "source": "test", "split": split})
            prompts.append({"id": f"{split}-{i}", "prompt": question, "answer": b, "verifier": "exact",
                            "task": "opposite", "source": "test", "split": split})
    write_table(chat, root / "chat" / "part-00000.parquet", "chat")
    write_table(prompts, root / "prompts" / "part-00000.parquet", "prompts")
    return root / "chat", root / "prompts"


def inputs_for(base: Path, chat: Path, prompts: Path) -> dict:
    return {"base": artifact("base", base), "chat": artifact("chat", chat), "prompts": artifact("prompts", prompts)}


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "opposite of hot?"},
    {"role": "assistant", "content": "cold"},
    {"role": "user", "content": "opposite of up?"},
    {"role": "assistant", "content": "down"},
]


def test_only_assistant_tokens_carry_loss():
    tok = tiny_tokenizer()
    x, y = sft.encode_example(tok, CONVERSATION)
    ids, mask = tok.encode_chat(CONVERSATION)
    assert x == ids[:-1] and len(y) == len(x)
    for t in range(len(y)):
        # target t is token t + 1: kept exactly when that token is the assistant's, else -100
        assert y[t] == (ids[t + 1] if mask[t + 1] else -100)
    # what is trained on is exactly each assistant reply and its closing <|im_end|>
    trained = tok.decode([t for t in y if t != -100])
    assert trained == "cold<|im_end|>down<|im_end|>"
    assert "system" not in tok.decode([ids[t + 1] for t in range(len(y)) if y[t] != -100])


def test_packing_lays_out_rows_and_drops_what_does_not_fit():
    tok = tiny_tokenizer()
    rows = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[3:5]}, {"messages": CONVERSATION},
            {"messages": CONVERSATION[:2]}]  # the last one has no assistant turn
    examples, dropped = sft.encode_rows(tok, rows, seq_len=len(sft.encode_example(tok, CONVERSATION[1:3])[0]) * 2 + 1)
    assert dropped == {"too_long": 1, "no_assistant_turn": 1}
    n0, n1 = len(examples[0][0]), len(examples[1][0])
    seq_len = n0 + n1 + 1
    packed = sft.pack_rows(examples, np.arange(2), seq_len, tok.pad_id, pack=True)  # (1, 3, seq_len)
    assert packed.shape == (1, 3, seq_len)
    assert packed[0, 2].tolist() == [0] * n0 + [1] * n1 + [2]  # doc ids, then the padding's own
    assert packed[0, 1, -1] == -100 and packed[0, 0, -1] == tok.pad_id
    assert packed[0, 0, :n0].tolist() == examples[0][0] and packed[0, 1, n0:n0 + n1].tolist() == examples[1][1]
    unpacked = sft.pack_rows(examples, np.arange(2), seq_len, tok.pad_id, pack=False)
    assert unpacked.shape[0] == 2
    # a batch is cut after its last target: no column of pure padding is computed
    x, y, _ = sft.to_batch(unpacked, torch.device("cpu"))
    assert x.shape[1] == max(n0, n1) - 1 and (y[:, -1] != -100).any()


def test_packed_conversations_do_not_attend_to_each_other():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    a = sft.encode_example(tok, CONVERSATION[1:3])
    a_changed = sft.encode_example(tok, [{"role": "user", "content": "opposite of big? and more words"},
                                         {"role": "assistant", "content": "small"}])
    b = sft.encode_example(tok, CONVERSATION[3:5])
    seq_len = len(a_changed[0]) + len(b[0]) + 3

    def logits_of_b(first) -> torch.Tensor:
        row = sft.pack_rows([first, b], np.arange(2), seq_len, tok.pad_id, pack=True)[0]  # (3, T)
        logits, _ = model(row[0][None], doc_ids=row[2][None])
        start = len(first[0])
        return logits[0, start:start + len(b[0])]

    with torch.no_grad():
        alone, _ = model(torch.tensor([b[0]]))
        torch.testing.assert_close(logits_of_b(a), logits_of_b(a_changed), rtol=0, atol=1e-5)
        torch.testing.assert_close(logits_of_b(a), alone[0], rtol=0, atol=1e-5)  # positions restart too


def test_loader_state_round_trips_and_covers_every_conversation_each_epoch():
    tok = tiny_tokenizer()
    examples = [sft.encode_example(tok, [{"role": "user", "content": f"opposite of {a}?"},
                                         {"role": "assistant", "content": b}]) for a, b in PAIRS]
    loader = sft.ChatLoader(examples, seq_len=40, batch_size=2, pad_id=tok.pad_id, pack=True, seed=3)
    n_rows = len(loader.rows(0))
    epoch0 = torch.cat([loader.next_rows() for _ in range(-(-n_rows // 2))])
    seen = sorted(tuple(r[0, r[2] == d].tolist()) for r in epoch0 for d in r[2].unique().tolist()
                  if (r[1, r[2] == d] != -100).any())
    assert seen == sorted(tuple(x) for x, _ in examples)
    state = loader.state_dict()
    expected = loader.next_rows()
    other = sft.ChatLoader(examples, seq_len=40, batch_size=2, pad_id=tok.pad_id, pack=True, seed=3)
    other.load_state_dict(state)
    assert state["epoch"] == 0 and torch.equal(other.next_rows(), expected)


def test_missing_base_model_is_a_stage_error(tmp_path):
    chat, prompts = task_data(tmp_path)
    with pytest.raises(StageError, match="not a model directory \\(no config.json\\)"):
        sft.run(sft.Config(), inputs_for(tmp_path / "nothing", chat, prompts), make_ctx(tmp_path / "run"))


@pytest.mark.slow
def test_sft_learns_the_task_and_resumes_exactly(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_model_dir(tmp_path / "base", tok)
    chat, prompts = task_data(tmp_path)
    untrained = evaluate_prompts(GPT.from_pretrained(base), tok, [r for r in iter_rows(prompts) if r["split"] == "val"])
    # the 8 conversations pack into 2 rows of 128 tokens: an epoch is 2 steps of one row
    cfg = sft.Config(seq_len=128, lr=3e-3, batch_size=1, max_steps=60, warmup_steps=5, eval_every=20, ckpt_every=15,
                     keep_checkpoints=5, base_shots=2, max_new_tokens=8)
    ctx = make_ctx(tmp_path / "a")
    result = sft.run(cfg, inputs_for(base, chat, prompts), ctx)

    assert result.metrics["acc/opposite"] >= 0.75 > untrained["acc/opposite"] + 0.5
    assert "base_acc/opposite" in result.metrics and result.metrics["val_loss"] < 1.0
    assert result.metrics["acc/opposite"] > result.metrics["majority_acc/opposite"]  # beats the trivial baseline
    out = ctx.output("sft")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steps"] == 60 and (out / "hf" / "config.json").is_file()
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    GPT.from_pretrained(out)  # the convention: loads as a plain model

    assert meta["derived"]["rows_per_epoch"] == 2
    # resume: a fresh run that finds only the step-15 checkpoint (mid-epoch) ends with the same weights
    ctx_b = make_ctx(tmp_path / "b")
    shutil.copytree(ctx.checkpoint_dir / "step-00000015", ctx_b.checkpoint_dir / "step-00000015")
    resumed = sft.run(cfg, inputs_for(base, chat, prompts), ctx_b)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ctx_b.output("sft") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["base_acc/opposite"] == result.metrics["base_acc/opposite"]
    # the whole directory is the same bytes (meta.json's curve too: the loss logged over steps 11-20
    # spans the checkpoint at 15, whose running sum the resumed run carries on)
    files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(out) == files(ctx_b.output("sft"))


@pytest.mark.slow
def test_lora_run_trains_adapters_only_and_saves_merged(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_model_dir(tmp_path / "base", tok)
    chat, prompts = task_data(tmp_path)
    cfg = sft.Config(lr=1e-2, batch_size=4, max_steps=10, warmup_steps=2, lora_r=4, lora_alpha=8,
                     lora_targets=("q_proj", "v_proj"), eval_per_task=2, base_shots=1, max_new_tokens=4)
    ctx = make_ctx(tmp_path / "run")
    result = sft.run(cfg, inputs_for(base, chat, prompts), ctx)
    assert result.metrics["trainable_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # 2 layers; q: 64->64, v: 64->32
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(ctx.output("sft") / "model.safetensors"))
    assert before.keys() == after.keys()  # merged: no adapter tensors left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "v")}

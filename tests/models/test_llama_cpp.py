"""Our GGUF files in llama.cpp itself (llama-cpp-python, a test dependency): the same token ids, F16
logits and greedy continuation as our model, Q8_0 / Q4_0 top-1 agreement with our own dequantized
model, and a chat completion that answers as `family chat` does.

The model is the toy teacher of tests/stages/compress_toy.py (it answers "Say b." with "b") with a
tokenizer as the tokenizer stage trains it (Qwen2's pre-tokenizer, `tokenizer.ggml.pre = qwen2`).
Tolerances: llama.cpp runs F16 weights with an F16 KV cache and, for Q8_0/Q4_0 matmuls, quantizes
the activations to 8 bits, so logits are compared with our model on the file's own (dequantized)
weights: F16 within 0.05 absolute (logits span ~30), top-1 agreement >= 95% for Q8_0 and Q4_0.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.chat import reply
from models.generate import generate
from models.gguf_export import read_gguf, write_gguf
from models.gpt import GPT
from models.tokenizer import Tokenizer
from stages import quantize as Q
from stages.chat.evaluate import prompt_ids
from tests.stages.compress_toy import chat_rows, make_teacher, qwen2_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module", autouse=True)
def no_extra_buffer_types():
    """llama.cpp's CPU "extra buffer types" (weights repacked for AMX / interleaved Q4_0/Q8_0 kernels)
    crash this build on our tiny quantized tensors (a segfault in the first eval on an AMX CPU); the
    plain CPU kernels are what we test against. llama-cpp-python has no argument for it, so its model
    defaults are patched (llama.cpp's `--no-repack`)."""
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module.llama_cpp, "llama_model_default_params", params)
        yield

PROBES = ["What is 2024 + 17?", "  leading spaces\ttabs\r\nCRLF\n\n\nend", "naïve café — 東京 😀", "don't I'LL we'Ve",
          "def f(x):\n    return x**2  # ok", "<|im_start|>user\nSay b.<|im_end|>\n<|im_start|>assistant\n",
          "json.dumps(obj, *, indent=None) -> str<|endoftext|>"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    d = make_teacher(root, steps=80, tok=qwen2_tokenizer())
    model = GPT.from_pretrained(d).eval()
    tok = Tokenizer.load(d)
    calib = Q.calibration(tok, [r for r in chat_rows() if r["split"] == "train"], 16, 64, 0)
    int4, _ = Q.quantize_model(model, calib, 4, Q.Config(), "gptq", "test")
    out = {"dir": d, "model": model, "tok": tok}
    for file_type, source in (("f16", model), ("q8_0", model), ("q4_0", int4)):
        out[file_type] = write_gguf(source, d, root / f"m-{file_type}.gguf", file_type)
    return out


def load(path, n_ctx: int = 128):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)


def logits_of(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])  # (T, V)


def test_token_ids_match_on_probes(files):
    llm = load(files["f16"])
    tok = files["tok"]
    for text in PROBES:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text), special=True).decode() == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Say b."}], add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == prompt_ids(tok, [{"role": "user", "content": "Say b."}])
    assert llm.metadata["tokenizer.ggml.pre"] == "qwen2"


def test_f16_logits_and_greedy_continuation_match(files):
    ours = read_gguf(files["f16"])  # our decoder on the file's F16 weights
    llm = load(files["f16"])
    ids = files["tok"].encode("What is 12 + 30? The json module encodes objects.")
    with torch.no_grad():
        want = ours(torch.tensor([ids]))[0][0].numpy()
    got = logits_of(llm, ids)
    assert np.abs(got - want).max() < 0.05, np.abs(got - want).max()
    greedy = generate(ours, [ids], 32)[0]
    llm.reset()
    llm.eval(ids)
    theirs = []
    for _ in range(32):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == greedy


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_quantized_top1_agrees_with_our_dequantized_model(files, file_type):
    ours = read_gguf(files[file_type])  # Q4_0: exactly our GPTQ int4 member's weights
    llm = load(files[file_type])
    tok = files["tok"]
    agree, n = 0, 0
    for row in chat_rows():
        if row["split"] != "val":
            continue
        ids = tok.encode(tok.apply_chat_template(row["messages"]))
        with torch.no_grad():
            want = ours(torch.tensor([ids]))[0][0].argmax(-1).numpy()
        agree += int((logits_of(llm, ids).argmax(-1) == want).sum())
        n += len(ids)
    assert agree / n >= 0.95, agree / n


def test_chat_completion_answers_as_family_chat(files):
    llm = llama_cpp.Llama(model_path=str(files["f16"]), n_ctx=128, n_threads=2, verbose=False)
    messages = [{"role": "user", "content": "Say b."}]
    theirs = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=8)["choices"][0]["message"]["content"]
    ours = "".join(reply(read_gguf(files["f16"]), files["tok"], messages, 8, 0.0, torch.Generator().manual_seed(0))).strip()
    assert theirs.strip() == ours == "b"

"""models/gguf_export.py: the GGUF keys, tensor names and tokenizer llama.cpp reads, read back exactly
(the llama.cpp runtime itself: tests/models/test_llama_cpp.py)."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from models.gguf_export import gguf_name, pre_tokenizer_name, read_gguf, tokenizer_fields, write_gguf
from models.gpt import GPT, GPTConfig
from models.hf_export import save_model_dir
from models.tokenizer import CHAT_TEMPLATE, QWEN2_PATTERN
from tests.stages.alignment_toy import make_tokenizer


def model_dir(tmp_path, tied: bool = True):
    torch.manual_seed(0)
    tok = make_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64,
                          tie_embeddings=tied)).eval()
    tok.save(tmp_path / "tok", eos_token="<|im_end|>")
    return model, save_model_dir(model, tmp_path / "tok", tmp_path / "model", hf=False)


@pytest.mark.parametrize("tied", [True, False])
def test_f32_file_reads_back_as_the_same_model(tmp_path, tied):
    model, d = model_dir(tmp_path, tied)
    path = write_gguf(model, d, tmp_path / "m.gguf", "f32")
    back = read_gguf(path)
    x = torch.randint(0, model.cfg.vocab_size, (2, 12))
    assert back.cfg == model.cfg
    torch.testing.assert_close(back(x)[0], model(x)[0], rtol=0, atol=0)
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert ("output.weight" in names) is not tied and {"token_embd.weight", "output_norm.weight", "blk.1.attn_q_norm.weight",
                                                       "blk.0.ffn_down.weight", "blk.0.attn_output.weight"} <= names


def test_keys_types_and_tokenizer(tmp_path):
    model, d = model_dir(tmp_path)
    path = write_gguf(model, d, tmp_path / "m.gguf", "q8_0")
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "qwen3" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (f["qwen3.embedding_length"], f["qwen3.block_count"], f["qwen3.attention.head_count"],
            f["qwen3.attention.head_count_kv"], f["qwen3.attention.key_length"], f["qwen3.context_length"]) == (64, 2, 2, 1, 32, 64)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"  # the toy tokenizer: GPT-2's regex
    tok = json.loads((d / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert f["tokenizer.ggml.token_type"][:8] == [3] * 8 and set(f["tokenizer.ggml.token_type"][8:]) == {1}
    assert f["tokenizer.ggml.merges"][0] == " ".join(tok["model"]["merges"][0]) if isinstance(tok["model"]["merges"][0], list) else tok["model"]["merges"][0]
    assert (f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"], f["tokenizer.ggml.add_bos_token"]) == (2, 0, False)
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0 and types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    # Q8_0 is ggml's own quantizer: bit-exact with gguf.quants
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    ref = gguf.quants.quantize(model.layers[0].mlp.up_proj.weight.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(t.data).reshape(ref.shape), ref)


def test_pre_tokenizer_names():
    qwen2 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": qwen2}) == "qwen2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                   {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name({"pre_tokenizer": digits}) == "refact"
    with pytest.raises(ValueError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_names_follow_llama_cpp():
    assert gguf_name("layers.3.self_attn.o_proj.weight") == "blk.3.attn_output.weight"
    assert gguf_name("layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_name("norm.weight") == "output_norm.weight"
    names = gguf.constants.TENSOR_NAMES
    known = {names[t].format(bid=0) for t in gguf.constants.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3]}
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=8, tie_embeddings=False))
    assert {gguf_name(n).removesuffix(".weight") for n in m.state_dict()} <= known


def test_padding_rows_beyond_the_tokenizer(tmp_path):
    _, d = model_dir(tmp_path)
    fields = tokenizer_fields(d, 310)
    assert fields["tokens"][-1] == "[PAD309]" and fields["types"][-1] == 4


def test_the_tokenizer_stage_trains_what_llama_cpp_calls_qwen2():
    from stages.tokenizer import train_bpe

    texts = ["The json module: dumps(obj, *, indent=None) -> str. 12345 + 678\n\n    x = 1"] * 20
    assert pre_tokenizer_name(json.loads(train_bpe(iter(texts), 300, 1).to_str())) == "qwen2"
    assert pre_tokenizer_name(json.loads(train_bpe(iter(texts), 300, 1, split_digits=False).to_str())) == "gpt-2"

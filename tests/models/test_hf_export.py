"""models/hf_export.py: the export loads in HF transformers as Qwen3 with the same logits and generations."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.generate import generate
from models.gpt import GPT, GPTConfig
from models.hf_export import export_hf, load_hf

REPO = Path(__file__).resolve().parents[2]
V = 300
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny(tied: bool, n_kv_heads: int) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=64,
                      tie_embeddings=tied)).eval()
    with torch.no_grad():  # larger than the 0.02 init, so greedy continuations are not one repeated token
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
    return m


def tokenizer_dir(root: Path) -> Path:
    """A tiny byte-level BPE in the layout of the tokenizer stage's output."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "a dog ate the bone"] * 50, trainer)
    d = root / "tokenizer"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d


@pytest.fixture(scope="module")
def transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # local directories only, never the hub
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("tied,n_kv_heads", [(True, 2), (False, 2), (False, 4)])
def test_hf_qwen3_logits_and_greedy_generation_match(tmp_path, transformers, tied, n_kv_heads):
    model = tiny(tied, n_kv_heads)
    export_hf(model, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tied

    x = torch.randint(0, V, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(x)[0] - hf(x).logits).abs().max().item()
    assert diff < 1e-4

    # greedy, one prompt and a left-padded batch
    prompts = [x[0, :10].tolist(), x[1, :4].tolist(), x[2, :7].tolist()]
    ours = generate(model, prompts, 12, pad_id=0)
    assert len(set(ours[0])) > 3
    ids = torch.zeros(3, 10, dtype=torch.long)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 10 - len(p):], mask[i, 10 - len(p):] = torch.tensor(p), 1
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 10:]
    assert ours == theirs.tolist()
    single = hf.generate(ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 10:]
    assert generate(model, prompts[:1], 12) == single.tolist()


def test_export_files_config_and_tokenizer(tmp_path, transformers):
    model = tiny(True, 2)
    out = export_hf(model, tokenizer_dir(tmp_path), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert (config["head_dim"], config["num_key_value_heads"], config["intermediate_size"]) == (16, 2, 160)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]  # <|endoftext|> and <|im_end|>
    weights = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in weights and all(k.startswith("model.") for k in weights)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == 0 and tok.decode(tok("the cat")["input_ids"]) == "the cat"
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert hf_config.rope_parameters["rope_theta"] == model.cfg.rope_theta


@pytest.mark.parametrize("tied", [True, False])
def test_load_hf_reads_the_export_back(tmp_path, tied):
    model = tiny(tied, 2)
    export_hf(model, None, tmp_path)
    loaded = load_hf(tmp_path)
    assert loaded.cfg == model.cfg
    x = torch.randint(0, V, (2, 11))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_export_module_does_not_import_transformers():
    code = "import sys, models.hf_export; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0

"""Write a `models.gpt.GPT` as an HF Qwen3 checkpoint, and read one back.

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)` (Qwen3ForCausalLM) and
gives the same logits: our parameter names are Qwen3Model's, so export adds the "model." prefix and, for
untied embeddings, keeps "lm_head.weight" (a tied head is not stored, as in HF checkpoints). config.json
carries the fields of a released Qwen3 config.json, written by hand so that this module does not import
transformers (a test-only dependency). Tokenizer files, when given, are copied next to the weights and
their special token ids go into config.json and generation_config.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.gpt import GPT, GPTConfig
from models.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def special_token_ids(tokenizer_dir: Path) -> dict[str, int | list[int]]:
    """bos/eos/pad ids from tokenizer_config.json, looked up in tokenizer.json; also the generation stop ids."""
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    for content, i in tok.get("model", {}).get("vocab", {}).items():
        vocab.setdefault(content, i)

    def id_of(token) -> int | None:
        content = token.get("content") if isinstance(token, dict) else token
        return vocab.get(content) if content is not None else None

    ids = {f"{name}_token_id": id_of(tok_cfg.get(f"{name}_token")) for name in ("bos", "eos", "pad")}
    # a chat model ends its turn with <|im_end|> and a document with <|endoftext|>: generation stops at either
    stops = [i for i in (ids["eos_token_id"], vocab.get("<|im_end|>"), vocab.get("<|endoftext|>")) if i is not None]
    ids["stop_ids"] = list(dict.fromkeys(stops))
    return {k: v for k, v in ids.items() if v is not None and v != []}


def qwen3_config(cfg: GPTConfig, dtype: torch.dtype) -> dict:
    """config.json of HF Qwen3ForCausalLM for our config (same keys as a released Qwen3 checkpoint)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layers,
        "torch_dtype": DTYPE_NAMES[dtype],
    }


def export_hf(model: GPT, tokenizer_dir: str | Path | None, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors, generation_config.json (+ tokenizer files) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.cfg.tie_embeddings:
                state[name] = t.detach().contiguous()
        else:
            state[f"model.{name}"] = t.detach().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = qwen3_config(model.cfg, dtype)
    generation = {"do_sample": False}
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        ids = special_token_ids(tokenizer_dir)
        stops = ids.pop("stop_ids", None)
        config.update(ids)
        generation.update(ids)
        if stops:
            generation["eos_token_id"] = stops if len(stops) > 1 else stops[0]
        copy_tokenizer_files(tokenizer_dir, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def copy_tokenizer_files(tokenizer_dir: str | Path, out_dir: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, Path(out_dir) / name)


def save_model_dir(model: torch.nn.Module, tokenizer_dir: str | Path, out_dir: str | Path, hf: bool = True,
                   eos_token: str | None = None) -> Path:
    """A stage's model directory: the weights (`model.save_pretrained`), the tokenizer files of
    tokenizer_dir (rewritten with `eos_token` when given: <|im_end|> once a model is a chat model)
    and, for a GPT with hf=True, the HF Qwen3 export in hf/. A directory left by an attempt that
    crashed while writing it is replaced."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    if eos_token is None:
        copy_tokenizer_files(tokenizer_dir, out)
    else:
        Tokenizer.load(tokenizer_dir).save(out, eos_token=eos_token)
    if hf:
        export_hf(model, out, out / "hf")
    return out


def load_hf(in_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Read a Qwen3 checkpoint as written by export_hf (any Qwen3 without sliding window / rope scaling)."""
    d = Path(in_dir)
    c = json.loads((d / "config.json").read_text())
    if c.get("model_type") != "qwen3":
        raise ValueError(f"{d / 'config.json'}: model_type is {c.get('model_type')!r}, expected 'qwen3'")
    rope_theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg = GPTConfig(vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
                    n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                    head_dim=c.get("head_dim"), d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                    rope_theta=float(rope_theta), rms_eps=c["rms_norm_eps"],
                    tie_embeddings=c.get("tie_word_embeddings", False))
    state = {k.removeprefix("model."): v for k, v in load_file(str(d / "model.safetensors")).items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model = GPT(cfg)
    model.load_state_dict(state)
    return model.to(device=device, dtype=state["embed_tokens.weight"].dtype)

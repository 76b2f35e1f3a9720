"""Write a `models.gpt.GPT` (plain or quantized, models/quant.py) as a GGUF file that llama.cpp and
Ollama load as architecture `qwen3`, and read one back as a plain GPT.

The keys and tensor names are those llama.cpp's `convert_hf_to_gguf.py` writes for a Qwen3
checkpoint (`Qwen3Model(Qwen2Model)`, `_set_vocab_gpt2`): `qwen3.*` hyperparameters, `token_embd`,
`blk.N.attn_q` ..., `output_norm`, `output` (left out when the head is tied: llama.cpp then reads
`token_embd`), 1-D norm gains in F32, and the tokenizer as `gpt2` (byte-level BPE: the token
strings in id order, their types, the merges as "a b", special ids, the chat template).
Qwen3 uses NeoX-style RoPE (rotate-half), so q/k need no permutation, unlike the llama converter.

Types: "f32", "f16" (2-D weights in F16), "q8_0" (2-D weights quantized to Q8_0 by the gguf
package, bit-exact with ggml's reference) and "q4_0". A weight that is already quantized on a
llama.cpp grid (int4 group 32 = Q4_0, int8 group 32 = Q8_0; models/quant.py) is packed from its
own codes and fp16 scales, so its GGUF is lossless; "q4_0" of a plain weight uses the gguf
package's Q4_0 quantizer.

Pre-tokenizer: llama.cpp picks its split regex by `tokenizer.ggml.pre`, and a wrong name changes
tokenization silently. `pre_tokenizer_name` reads it off tokenizer.json: Qwen2's Split regex +
ByteLevel(use_regex=False) is "qwen2" (what the tokenizer stage trains; Ollama's qwen3 engine always
uses this regex), single digits + GPT-2's ByteLevel regex is "refact", GPT-2's alone "gpt-2".
Anything else is an error rather than a file that tokenizes differently.

The file is written next to its path and renamed into place, so a failed write (a full disk)
leaves no partial file under the final name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from models.gpt import GPT, GPTConfig
from models.quant import LINEAR_NAMES, QuantEmbedding, QuantLinear, dequantize
from models.tokenizer import QWEN2_PATTERN

FILE_TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # weights per Q8_0 / Q4_0 block

GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    """Our (HF Qwen3Model) parameter name -> llama.cpp's tensor name."""
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, or ValueError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == QWEN2_PATTERN \
            and steps[0].get("behavior") == "Isolated" and not steps[1].get("use_regex", True):
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "refact"  # llama.cpp: "\p{N}", then GPT-2's regex
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise ValueError(f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent "
                     f"(known: Qwen2's Split regex, single digits + GPT-2, GPT-2)")


def tokenizer_fields(tokenizer_dir: str | Path, vocab_size: int) -> dict:
    """What the GGUF needs of our tokenizer files: tokens and types in id order, merges, special ids,
    the chat template and the pre-tokenizer name."""
    d = Path(tokenizer_dir)
    tj = json.loads((d / "tokenizer.json").read_text())
    tc = json.loads((d / "tokenizer_config.json").read_text())
    if tj.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{d / 'tokenizer.json'}: a {tj.get('model', {}).get('type')} model, expected BPE")
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    special = {}
    for t in tj.get("added_tokens", []):
        by_id[t["id"]] = t["content"]
        special[t["id"]] = bool(t.get("special"))
    if max(by_id) >= vocab_size:
        raise ValueError(f"{d / 'tokenizer.json'} has token id {max(by_id)}, the model only {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows the model has beyond the tokenizer (as the converter pads them)
            tokens.append(f"[PAD{i}]")
            types.append(4)  # USER_DEFINED
        else:
            tokens.append(by_id[i])
            types.append(3 if special.get(i) else 4 if i in special else 1)  # CONTROL, USER_DEFINED, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    content_id = {c: i for i, c in by_id.items()}

    def token_id(key: str) -> int | None:
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return content_id.get(v) if v is not None else None

    eos = token_id("eos_token")
    pad = token_id("pad_token")
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(tj),
            "bos": pad if token_id("bos_token") is None else token_id("bos_token"),  # Qwen: bos = <|endoftext|>
            "eos": eos, "pad": pad, "chat_template": tc.get("chat_template")}


# -- tensors ---------------------------------------------------------------------------------------


def q8_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """(out, in) codes in [-127, 127] and (out, in / 32) fp16 scales -> Q8_0 bytes (out, in / 32 * 34)."""
    out, n_in = codes.shape
    d = scales.to(torch.float16).numpy().view(np.uint8).reshape(out, n_in // BLOCK, 2)
    q = codes.to(torch.int8).numpy().view(np.uint8).reshape(out, n_in // BLOCK, BLOCK)
    return np.concatenate([d, q], axis=-1).reshape(out, -1)


def q4_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """(out, in) codes in [-8, 7] and (out, in / 32) fp16 scales -> Q4_0 bytes (out, in / 32 * 18):
    per block the fp16 scale, then 16 bytes whose low nibble is element j + 8 and high nibble element j + 16 + 8."""
    out, n_in = codes.shape
    d = scales.to(torch.float16).numpy().view(np.uint8).reshape(out, n_in // BLOCK, 2)
    u = (codes.to(torch.int16) + 8).to(torch.uint8).numpy().reshape(out, n_in // BLOCK, BLOCK)
    qs = u[..., :BLOCK // 2] | (u[..., BLOCK // 2:] << 4)
    return np.concatenate([d, qs], axis=-1).reshape(out, -1)


def model_tensors(model: GPT) -> dict[str, torch.Tensor | QuantLinear | QuantEmbedding]:
    """Our name -> fp32 tensor or quantized module, in the order the converter writes them."""
    out: dict[str, torch.Tensor | QuantLinear | QuantEmbedding] = {}
    modules = dict(model.named_modules())
    params = {k: v for k, v in model.state_dict().items() if not k.endswith((".codes", ".scales"))}

    def get(name: str):
        mod = modules.get(name.removesuffix(".weight"))
        return mod if isinstance(mod, (QuantLinear, QuantEmbedding)) else params[name].detach().float().cpu()

    out["embed_tokens.weight"] = get("embed_tokens.weight")
    for i in range(model.cfg.n_layers):
        for n in ("input_layernorm", *LINEAR_NAMES[:4], "self_attn.q_norm", "self_attn.k_norm",
                  "post_attention_layernorm", *LINEAR_NAMES[4:]):
            out[f"layers.{i}.{n}.weight"] = get(f"layers.{i}.{n}.weight")
    out["norm.weight"] = get("norm.weight")
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    return out


def encode_tensor(t: torch.Tensor | QuantLinear | QuantEmbedding, file_type: str):
    """(numpy data, ggml type) of one tensor in a file of `file_type`."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if isinstance(t, (QuantLinear, QuantEmbedding)):
        group = t.codes.shape[1] // t.scales.shape[1]
        if group == BLOCK and file_type in ("q4_0", "q8_0"):  # already on a ggml grid: pack, do not re-quantize
            if t.bits == 4 and file_type == "q4_0":
                return q4_0_blocks(t.codes.cpu(), t.scales.cpu()), Q.Q4_0
            if t.bits == 8:
                return q8_0_blocks(t.codes.cpu(), t.scales.cpu()), Q.Q8_0
        t = dequantize(t.codes.cpu(), t.scales.cpu())
    w = t.float().cpu().numpy()
    if w.ndim == 1 or file_type == "f32":
        return w.astype(np.float32), Q.F32
    if file_type == "f16":
        return w.astype(np.float16), Q.F16
    if w.shape[1] % BLOCK:
        raise ValueError(f"a {file_type} tensor needs rows of a multiple of {BLOCK} weights, got {w.shape}")
    qtype = Q.Q8_0 if file_type == "q8_0" else Q.Q4_0
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_gguf(model: GPT, tokenizer_dir: str | Path, path: str | Path, file_type: str, name: str = "family") -> Path:
    """Write `model` as a qwen3 GGUF of `file_type` at `path` (atomically); returns the path."""
    import gguf

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type {file_type!r}: use one of {', '.join(FILE_TYPES)}")
    c = model.cfg
    tok = tokenizer_fields(tokenizer_dir, c.vocab_size)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[file_type]
    w = gguf.GGUFWriter(tmp, "qwen3")
    try:
        w.add_name(name)
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.d_model)
        w.add_block_count(c.n_layers)
        w.add_feed_forward_length(c.d_ff)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.n_kv_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_freq_base(c.rope_theta)
        w.add_layer_norm_rms_eps(c.rms_eps)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
            if tok[key] is not None:
                fn(tok[key])
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        for our_name, t in model_tensors(model).items():
            data, qtype = encode_tensor(t, file_type)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor(gguf_name(our_name), data)
            else:
                w.add_tensor(gguf_name(our_name), data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def f32_file_bytes(f16_path: str | Path) -> int:
    """The size an F32 GGUF of the same model has: the F16 file plus 2 bytes per F16 weight (every
    tensor's data is a multiple of the 32-byte alignment in both, so the padding is the same)."""
    import gguf

    r = gguf.GGUFReader(str(f16_path))
    extra = sum(int(t.n_elements) * 2 for t in r.tensors if t.tensor_type == gguf.GGMLQuantizationType.F16)
    return Path(f16_path).stat().st_size + extra


def read_gguf(path: str | Path) -> GPT:
    """A plain fp32 GPT from a GGUF written by `write_gguf` (quantized tensors dequantized), for checks."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def field(key: str):
        f = r.fields[key]
        return f.contents()

    n_layers = int(field("qwen3.block_count"))
    tensors = {t.name: t for t in r.tensors}
    cfg = GPTConfig(vocab_size=len(field("tokenizer.ggml.tokens")), d_model=int(field("qwen3.embedding_length")),
                    n_layers=n_layers, n_heads=int(field("qwen3.attention.head_count")),
                    n_kv_heads=int(field("qwen3.attention.head_count_kv")), head_dim=int(field("qwen3.attention.key_length")),
                    d_ff=int(field("qwen3.feed_forward_length")), max_seq_len=int(field("qwen3.context_length")),
                    rope_theta=float(f'{field("qwen3.rope.freq_base"):.7g}'),  # stored as float32
                    rms_eps=float(f'{field("qwen3.attention.layer_norm_rms_epsilon"):.7g}'),
                    tie_embeddings="output.weight" not in tensors)
    model = GPT(cfg)
    state = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = tensors[gguf_name(name)]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        state[name] = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(model.state_dict()[name].shape)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state)
    return model.eval()

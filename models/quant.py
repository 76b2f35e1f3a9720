"""Weight-only quantized inference for `models.gpt.GPT`: QuantLinear, QuantEmbedding, save and load.

A quantized weight is integer codes q (out, in) and one scale per group of `group_size` consecutive
input columns, s (out, in / group_size), stored as fp16 like llama.cpp's block scales:

    W[o, i] ~= q[o, i] * s[o, i // group_size]

Schemes (stages/quantize.py makes the codes):
- int8 per output channel: group_size = in_features, q in [-127, 127].
- int4, group 32, on llama.cpp's Q4_0 grid: q in [-8, 7], so our codes and fp16 scales are exactly
  the bytes of a Q4_0 block (models/gguf_export.py packs them without re-quantizing).
- Q8_0: group 32, q in [-127, 127] (llama.cpp's 8-bit block format, used for embeddings).

The forward dequantizes the weight to the activation dtype and calls F.linear: the memory and file
size shrink, the arithmetic is the fp32 model's with the quantized weights (bitwise equal to a GPT
whose weights were replaced by `dequantize(...)`, which is how the stages evaluate it). A tied output
head shares the embedding's codes and scales.

On disk a quantized model directory is a GPT model directory whose config.json also has
"quantization" ({"scheme", "bits", "group_size", "embedding_group_size", ...}) and whose
model.safetensors holds `<name>.qweight` (int8 codes; int4 codes two to a byte, low nibble first)
and `<name>.scales` (fp16) for every quantized weight. `load_model(dir)` opens either kind, which is
what `family chat` and `family generate` call.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.gpt import GPT, GPTConfig

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(out, in) integer codes and (out, in / g) scales -> (out, in) fp32 weight."""
    out, n_in = codes.shape
    groups = scales.shape[1]
    w = codes.float().view(out, groups, n_in // groups) * scales.float()[:, :, None]
    return w.view(out, n_in)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] (out, in) -> uint8 (out, in / 2): the code + 8 of column 2j in the low
    nibble and of column 2j + 1 in the high one."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).view(packed.shape[0], -1)


class QuantLinear(nn.Module):
    """A bias-free nn.Linear with quantized weights: codes (out, in) int8 and scales (out, groups) fp16."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int):
        super().__init__()
        if codes.shape[1] % scales.shape[1]:
            raise ValueError(f"{codes.shape[1]} input columns do not split into {scales.shape[1]} groups")
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scales", scales.to(torch.float16))
        self.bits = bits
        self.out_features, self.in_features = codes.shape

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    def weight_fp32(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fp32().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


class QuantEmbedding(nn.Module):
    """Token embedding with quantized rows (the tied head reads the same codes through a QuantLinear)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scales", scales.to(torch.float16))
        self.bits = bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        V, d = self.codes.shape
        groups = self.scales.shape[1]
        q = F.embedding(ids, self.codes).float().unflatten(-1, (groups, d // groups))  # (..., G, g)
        return (q * F.embedding(ids, self.scales).float()[..., None]).flatten(-2)


def weight_names(cfg: GPTConfig) -> list[str]:
    """Every quantizable weight of a GPT, embedding first (a tied head has no weight of its own)."""
    names = ["embed_tokens.weight"]
    names += [f"layers.{i}.{n}.weight" for i in range(cfg.n_layers) for n in LINEAR_NAMES]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def quantized_model(model: GPT, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: dict[str, int]) -> GPT:
    """`model` with every weight in `quantized` (name -> (codes, scales)) replaced by its quantized
    module (in place; returned for chaining)."""
    for name, (codes, scales) in quantized.items():
        module_name = name.removesuffix(".weight")
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if module_name == "embed_tokens":
            emb = QuantEmbedding(codes, scales, bits[name])
            model.embed_tokens = emb
            if model.cfg.tie_embeddings:
                head = QuantLinear(codes, scales, bits[name])
                head.codes, head.scales = emb.codes, emb.scales  # one tensor, as in the fp32 model
                model.lm_head = head
        else:
            setattr(parent, attr, QuantLinear(codes, scales, bits[name]))
    return model


def quantized_state(model: GPT) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name -> (codes, scales, bits) of every quantized module of `model`."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and not (name == "lm_head" and model.cfg.tie_embeddings):
            out[f"{name}.weight"] = (m.codes, m.scales, m.bits)
    return out


def dequantized_model(model: GPT) -> GPT:
    """A plain fp32 GPT whose weights are the dequantized weights of `model` (same outputs, faster)."""
    plain = GPT(model.cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".codes", ".scales"))}
    for name, (codes, scales, _) in quantized_state(model).items():
        state[name] = dequantize(codes, scales)
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    plain.load_state_dict(state)
    return plain.to(next(iter(state.values())).device).eval()


def save_quantized(model: GPT, out_dir: str | Path, info: dict) -> Path:
    """config.json ({"family_gpt": cfg, "quantization": info}) and model.safetensors with packed codes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    q = quantized_state(model)
    state: dict[str, torch.Tensor] = {}
    for name, (codes, scales, bits) in q.items():
        state[name.removesuffix("weight") + "qweight"] = pack_int4(codes) if bits == 4 else codes.contiguous()
        state[name.removesuffix("weight") + "scales"] = scales.contiguous()
    for k, v in model.state_dict().items():
        if not k.endswith((".codes", ".scales")):
            state[k] = v.detach().contiguous()
    bits = {name: b for name, (_, _, b) in q.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"family_gpt": model.cfg.to_dict(), "quantization": {**info, "bits_per_weight": bits}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def load_quantized(in_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
    d = Path(in_dir)
    config = json.loads((d / "config.json").read_text())
    cfg = GPTConfig.from_dict(config["family_gpt"])
    bits = config["quantization"]["bits_per_weight"]
    state = load_file(str(d / "model.safetensors"))
    model = GPT(cfg)
    quantized = {}
    for name, b in bits.items():
        stem = name.removesuffix("weight")
        packed = state.pop(stem + "qweight")
        quantized[name] = (unpack_int4(packed) if b == 4 else packed, state.pop(stem + "scales"))
    quantized_model(model, quantized, bits)
    model.load_state_dict(state, strict=False)
    missing = [k for k in model.state_dict() if k not in state and not k.endswith((".codes", ".scales"))
               and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing:
        raise ValueError(f"{d / 'model.safetensors'} lacks {missing[:3]}")
    return model.to(device)


def is_quantized(model_dir: str | Path) -> bool:
    return "quantization" in json.loads((Path(model_dir) / "config.json").read_text())


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Any model directory of the family: a plain GPT or a quantized one (QuantLinear modules)."""
    return load_quantized(model_dir, device) if is_quantized(model_dir) else GPT.from_pretrained(model_dir, device=device)

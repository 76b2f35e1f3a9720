"""A Qwen3-style decoder-only transformer in one file.

The architecture of Qwen3 (Qwen Team, "Qwen3 Technical Report", 2025; `modeling_qwen3.py` in HF
transformers): pre-norm RMSNorm, rotary position embeddings (rotate-half convention), grouped-query
attention with RMSNorm over each head's queries and keys before RoPE (QK-norm), a SwiGLU MLP, no biases,
optionally tied input/output embeddings. Parameter names are those of HF `Qwen3Model`, so
`models/hf_export.py` only adds the "model." prefix.

Differences from HF Qwen3, none of which change the function computed:
- RoPE multiplies by `roll(x, half)` and a sine table with the sign of the first half folded in, which
  is `rotate_half(x) * sin` in one op fewer, and is applied in the (B, T, H, hd) layout of the
  projection, before the transpose to (B, H, T, hd).
- RMSNorm in fp32 on CPU goes through `RMSNormCPU`, the same forward with a hand-written backward:
  on CPU PyTorch composes rms_norm from six ops, whose autograd backward makes about fifteen passes
  over the tensor (elsewhere F.rms_norm is kept, for its fused kernel).
- Attention goes through `F.scaled_dot_product_attention` with `enable_gqa` instead of `repeat_kv`.
- Packed sequences: `doc_ids` restricts attention to the same document and restarts positions per doc.
- No sliding-window layers (Qwen3's `use_sliding_window` is False for every released model).
Init follows GPT-2/nanoGPT: N(0, 0.02), the two residual projections scaled by 1/sqrt(2 * n_layers).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


@dataclass
class GPTConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int | None = None  # default: the multiple of 32 nearest 8/3 * d_model (SwiGLU keeps 4*d params)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 32 * round(8 * self.d_model / 3 / 32)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        return cls(**d)


class KVCache:
    """Keys and values of every layer, pre-allocated to `max_len` positions and written in place.

    All rows share one write position `pos` (prompts are left-padded to a common length). `key_mask`
    marks which slots hold real tokens; it stays None while no padding was seen, so unpadded decoding
    needs no mask at all. Buffers are allocated on the first write with that write's dtype/device unless
    given, so a cache made outside autocast still matches the k/v dtypes produced inside it.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.device, self.dtype = device, dtype
        self.k: list[torch.Tensor | None] = [None] * n_layers  # each (B, n_kv, max_len, hd)
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos = 0
        self.key_mask: torch.Tensor | None = None  # (B, max_len) bool, True = real token

    def mark(self, attention_mask: torch.Tensor | None, T: int) -> None:
        """Record which of the next T slots are real tokens (None: all of them)."""
        if attention_mask is None and self.key_mask is None:
            return
        if self.key_mask is None:
            device = self.device or attention_mask.device
            self.key_mask = torch.ones(self.shape[0], self.max_len, dtype=torch.bool, device=device)
        self.key_mask[:, self.pos:self.pos + T] = True if attention_mask is None else attention_mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at `pos`; return every key/value so far (B, n_kv, pos + T, hd)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; writing up to {end}")
        if self.k[layer] is None:
            self.k[layer] = torch.empty(self.shape, dtype=self.dtype or k.dtype, device=self.device or k.device)
            self.v[layer] = torch.empty(self.shape, dtype=self.dtype or v.dtype, device=self.device or v.device)
        ck, cv = self.k[layer], self.v[layer]
        ck[:, :, self.pos:end] = k
        cv[:, :, self.pos:end] = v
        return ck[:, :, :end], cv[:, :, :end]


class GPTRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return RMSNormCPU.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RMSNormCPU(torch.autograd.Function):
    """y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) over the last dim (Zhang & Sennrich, 2019).

    The forward is F.rms_norm's CPU composition op for op, so outputs are bitwise equal. The backward,
    with x_hat = x * r and g_w = dy * w, is
        dx = r * (g_w - x_hat * mean(g_w * x_hat)),    dw = sum over rows of dy * x_hat,
    seven passes where autograd through the composition takes about fifteen (tests/models/test_gpt.py
    checks it against autograd).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        x_hat = x * r
        ctx.save_for_backward(x_hat, weight, r)
        return x_hat * weight

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_hat, weight, r = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g_w = dy * weight
            dx = torch.addcmul(g_w, x_hat, (g_w * x_hat).mean(-1, keepdim=True), value=-1) * r
        if ctx.needs_input_grad[1]:
            dw = (dy * x_hat).reshape(-1, x_hat.shape[-1]).sum(0)
        return dx, dw, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) * sin == roll(x, half) * [-sin, sin]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class GPTAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = GPTRMSNorm(cfg.head_dim, cfg.rms_eps)  # QK-norm: the Qwen3 change from Qwen2
        self.k_norm = GPTRMSNorm(cfg.head_dim, cfg.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        # norm and rotate in the projection's contiguous (B, T, heads, hd) layout, then transpose: on the
        # transposed view, roll returns a copy in the other memory layout and every RoPE op mixes the two
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))
        q = apply_rope(q, cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rope(k, cos, sin).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GPTMLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = GPTRMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = GPTAttention(cfg, layer_idx)
        self.post_attention_layernorm = GPTRMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = GPTMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) doc ids -> (B, T) positions that restart at 0 wherever the doc id changes."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # index where each token's doc begins
    return idx - first


def attention_mask_for(T: int, start: int, device: torch.device, key_valid: torch.Tensor | None,
                       doc_ids: torch.Tensor | None) -> torch.Tensor:
    """Boolean SDPA mask (B or 1, 1, T, start + T): causal, within one doc, real keys only.

    A query always sees itself, so a padding query never has an all-masked row (softmax of all -inf is
    NaN, and the NaN would reach real tokens through that position's values in the next layer).
    """
    q_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(start + T, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos  # (T, S)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)
    return allowed.unsqueeze(-3) if allowed.dim() == 3 else allowed


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(GPTBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = GPTRMSNorm(cfg.d_model, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._build_rope(cfg.max_seq_len)
        for name, p in self.named_parameters():  # tied weights appear once here
            if p.dim() >= 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers) if residual else 0.02)

    @torch.inference_mode(False)  # grown during generation, the tables must still serve training later
    def _build_rope(self, n: int) -> None:
        """cos / signed-sin tables (n, head_dim), computed in fp32 as HF Qwen3 does, kept as buffers."""
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))  # (hd/2,)
        freqs = torch.outer(torch.arange(n, dtype=torch.float), inv_freq)  # (n, hd/2)
        old = getattr(self, "rope_cos", None)
        device = old.device if old is not None else None
        dtype = old.dtype if old is not None else torch.float
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)
        sin_signed = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        self.register_buffer("rope_cos", cos.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("rope_sin", sin_signed.to(device=device, dtype=dtype), persistent=False)

    def hidden(self, input_ids: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d_model) after the final norm.

        attention_mask (B, T) bool, True = real token: padded keys are ignored and, unless position_ids
        is given, positions count real tokens only (so left padding does not shift them). With a cache,
        the mask is remembered for later steps; decode steps may then pass None (all real).
        """
        B, T = input_ids.shape
        start = 0 if cache is None else cache.pos
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids is for packed training sequences, not incremental decoding with a cache")
            cache.mark(attention_mask, T)
            key_valid = None if cache.key_mask is None else cache.key_mask[:, :start + T]  # (B, S)
        else:
            key_valid = attention_mask
        if position_ids is None:
            if doc_ids is not None:
                position_ids = doc_positions(doc_ids)
            elif key_valid is not None:
                position_ids = (key_valid.long().cumsum(1)[:, start:] - 1).clamp(min=0)  # (B, T)
        if start + T > self.rope_cos.shape[0]:
            self._build_rope(max(start + T, 2 * self.rope_cos.shape[0]))
        if position_ids is None:  # fast path: a slice, broadcast over (B, heads)
            cos, sin = self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None]  # (T, 1, hd)
        else:
            cos, sin = self.rope_cos[position_ids].unsqueeze(2), self.rope_sin[position_ids].unsqueeze(2)  # (B, T, 1, hd)

        if doc_ids is None and key_valid is None:
            # no mask tensor at all: full causal (training, prefill) or one query seeing every key (decode)
            mask, is_causal = None, start == 0
            if start > 0 and T > 1:
                mask = attention_mask_for(T, start, input_ids.device, None, None)
        else:
            mask, is_causal = attention_mask_for(T, start, input_ids.device, key_valid, doc_ids), False

        x = self.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.pos = start + T
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                doc_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids -> logits (B, T, V) and, given targets (B, T) with -100 = ignored, the mean CE loss.

        at (B, T) bool: the head runs only at those positions and the logits are (N, V), one row per
        True in row-major order (the loss, given targets, is the mean over targets[at] that are not
        -100). With a 4k vocabulary the head and its softmax cost more than this body, and a chat
        loss reads only the assistant's positions (~40% of packed SFT tokens, ~20% of a padded
        batch): the same loss, for less compute."""
        h = self.hidden(input_ids, doc_ids=doc_ids, position_ids=position_ids, attention_mask=attention_mask,
                        cache=cache)
        if at is not None:
            h = h[at]  # (N, d)
            targets = targets[at] if targets is not None else None
        logits = self.lm_head(h)  # (B, T, V), or (N, V) with `at`
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, c.head_dim, max_len, device, dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once); non_embedding leaves out the token embedding and
        the output head, i.e. counts the transformer body only (Kaplan et al., 2020)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 * N_matmul + 12 * L * H * hd * T,
        with N_matmul the weights of every nn.Linear: the body's projections and the output head, tied or
        not (the embedding lookup and the norm gains are not matmuls)."""
        c = self.cfg
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * n_matmul + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def save_pretrained(self, out_dir: str | Path) -> None:
        """config.json ({"family_gpt": config}) + model.safetensors (a tied head is stored once)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            del state["lm_head.weight"]
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps({"family_gpt": self.cfg.to_dict()}, indent=2))

    @classmethod
    def from_pretrained(cls, in_dir: str | Path, device: str | torch.device = "cpu") -> GPT:
        d = Path(in_dir)
        cfg = GPTConfig.from_dict(json.loads((d / "config.json").read_text())["family_gpt"])
        model = cls(cfg)
        state = load_file(str(d / "model.safetensors"))
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state)
        return model.to(device)

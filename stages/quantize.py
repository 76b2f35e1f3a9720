"""Quantize the chat model and the distilled `small` model: int8, int4, and GGUF files for llama.cpp.

What: reads `grpo` (the final chat model), `small` (stages/distill.py), `chat` (train rows calibrate,
val rows measure) and `prompts` (held-out task accuracy), and writes
- `chat_int8`, `small_int8`: weight-only int8, one scale per output channel (q in [-127, 127]);
- `chat_int4`, `small_int4`: weight-only int4 in groups of 32 input columns on llama.cpp's exact
  Q4_0 grid: per block d = (the signed value of largest magnitude) / -8, q = clip(trunc(w/d + 8.5),
  0, 15) - 8, w ~ q * fp16(d). Our codes and scales are the bytes of a Q4_0 block, so the Q4_0 GGUF
  is lossless. The tied embedding/head uses the same grid (`embedding_bits` 8: Q8_0 blocks);
- `gguf`: chat-{f16,q8_0,q4_0}.gguf and small-{f16,q8_0,q4_0}.gguf (models/gguf_export.py; q8_0
  from the fp32 weights, q4_0 from the int4 member's own codes), and Ollama Modelfiles.
The quantized model directories load with models/quant.load_model (QuantLinear), which `family
chat --model chat-int4` and `family generate` use.

Two ways to choose the codes, each measured:
- RTN, round to nearest on the grid (`quantize_rtn`), weight by weight, no data.
- GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers"; `gptq_quantize`, after IST-DASLab/gptq). With H = 2/n sum x x^T over the layer's
  calibration inputs, the columns are quantized one at a time and each one's error is spread over
  the columns not yet quantized, through the inverse Hessian:
      err = (w_i - q_i) / [H^-1]_ii,    W[:, j>i] -= err [H^-1]_i,j>i
  with the paper's defaults: dead inputs (H_ii = 0) zeroed, damping 0.01 * mean(diag H) added to
  the diagonal (retried x10 up to `damp_retries` times when the Cholesky factor fails, then a one-line
  error), the inverse through Cholesky, lazy batch updates in blocks of 128 columns, act-order
  (columns by decreasing H_ii) with static groups (every group's scale fit on the unquantized
  weights first, so the order needs no g_idx at inference and the grid stays Q4_0's). Layers go in
  order (true-sequential): each layer's inputs come from the already-quantized layers before it, and
  within a layer q/k/v (which share one Hessian), o, gate/up (one Hessian) and down go in turn.
  Calibration: `calib_rows` train-split chat conversations, concatenated and cut into segments of
  `calib_len` tokens (the paper: 128 random 2048-token C4 segments).
  The embedding (and a tied head, which reads the same codes) is rounded to nearest: GPTQ on the
  head's inputs lowered the head's output error but raised the val loss (+0.74% against RTN's +0.46%
  on the tiny chat model), because the same rows are also the embedding lookup, whose error GPTQ
  does not see. An untied head gets GPTQ on the final hidden states.

Measured per model (chat: no prefix, small: `small/`), on held-out data: relative val-loss increase
vs fp32 on `eval_rows` val chat conversations (assistant tokens; 0.01 = 1%), greedy accuracy on the
held-out prompts vs fp32 (points as fractions), file bytes vs F32 (`q8_0/size_ratio` = F32 GGUF
bytes / Q8_0 GGUF bytes), and GPTQ's per-layer output error ||WX - QX||^2 = tr(dW H dW^T) against
RTN's on the same inputs (`int4_gptq/layer_err_ratio`: the mean ratio; < 1 is better).
The published int8/int4 members are made by `method` (GPTQ by default; both are always measured).

Run:
    python -m stages.quantize --config c.json --inputs i.json --run-dir DIR
    with i.json = {"grpo": "CHAT_DIR", "small": "SMALL_DIR", "chat": "CHAT_DATA", "prompts": "PROMPTS_DIR"}
"""
from __future__ import annotations

import copy
import errno
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from models.gguf_export import f32_file_bytes, write_gguf
from models.gpt import GPT
from models.hf_export import copy_tokenizer_files
from models.quant import LINEAR_NAMES, dequantize, dequantized_model, quantized_model, save_quantized
from models.tokenizer import Tokenizer
from stages.chat.evaluate import evaluate_prompts, pick_heldout
from stages.chat.verifiers import VERIFIERS
from stages.contract import StageContext, StageError, StageResult, main
from stages.training import open_model_input, without_timings
from storage.artifacts import Artifact
from storage.parquet import iter_rows

INPUTS = ("grpo", "small", "chat", "prompts")
OUTPUTS = ("chat_int8", "chat_int4", "small_int8", "small_int4", "gguf")
GROUP = 32  # Q4_0 / Q8_0 block size: fixed by the GGUF formats we must match
IGNORE = -100


@dataclass(frozen=True)
class Config:
    method: Literal["gptq", "rtn"] = "gptq"  # how the published members are made
    embedding_bits: Literal[4, 8] = 4  # the int4 members' tied embedding/head: Q4_0 or Q8_0 blocks
    calib_rows: int = 128  # train chat conversations for the Hessians
    calib_len: int = 256  # tokens per calibration segment
    percdamp: float = 0.01
    damp_retries: int = 3  # x10 damping each time the Cholesky factor fails
    block_size: int = 128
    act_order: bool = True
    eval_rows: int = 200  # val chat conversations for the loss
    eval_per_task: int = 40  # held-out prompts per task for the accuracy
    max_new_tokens: int = 96
    batch_size: int = 128  # prompts decoded together, conversations scored together

    def validate(self) -> None:
        for name in ("calib_rows", "calib_len", "block_size", "eval_rows", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.percdamp <= 0 or self.damp_retries < 0 or self.eval_per_task < 0:
            raise ValueError("percdamp must be > 0, damp_retries and eval_per_task >= 0")


class HessianError(ValueError):
    pass


# -- the grids -------------------------------------------------------------------------------------


def grid_scales(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """(out, in) fp32 weight -> (out, in / group) fp32 block scales d, as ggml computes them:
    8 bits d = max|w| / 127 (Q8_0; one group per row = int8 per output channel);
    4 bits d = w[argmax |w|] / -8 (Q4_0: the largest-magnitude weight lands exactly on code -8)."""
    blocks = w.float().view(w.shape[0], -1, group)  # (out, G, g)
    if bits == 8:
        return blocks.abs().amax(-1) / 127
    idx = blocks.abs().argmax(-1, keepdim=True)
    return blocks.gather(-1, idx).squeeze(-1) / -8


def grid_codes(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of w (..., n) for the fp32 scales d broadcast to it, exactly as ggml rounds: Q8_0
    roundf(w * (1/d)) (half away from zero), Q4_0 trunc(w * (1/d) + 8.5) - 8; clipped to the grid."""
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    x = w.float() * inv
    if bits == 8:
        return (x.sign() * (x.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8)
    return ((x + 8.5).trunc().clamp(0, 15) - 8).to(torch.int8)


def quantize_rtn(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest: (codes (out, in) int8, scales (out, in / group) fp16) with w ~ codes * scales."""
    d = grid_scales(w, bits, group)  # (out, G)
    codes = grid_codes(w.float().view(w.shape[0], -1, group), d[:, :, None], bits).view(w.shape)
    return codes, d.to(torch.float16)


def layer_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    """||W X - Wq X||^2 / n up to the factor 2 of H: tr(dW H dW^T), dW = W - Wq."""
    dw = (w.double() - wq.double())
    return float(((dw @ H.double()) * dw).sum())


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group: int, percdamp: float = 0.01,
                  block_size: int = 128, act_order: bool = True, retries: int = 3
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ of one weight w (out, in) with the Hessian H (in, in) of its inputs, on the grid (bits,
    group) with static groups. Returns (codes (out, in) int8, scales (out, in / group) fp16, the
    damping used). HessianError when H + damping does not factor even at percdamp * 10^retries."""
    W = w.detach().clone().double()
    H = H.detach().clone().double()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    d = grid_scales(W.float(), bits, group)  # static groups: every scale from the unquantized weights
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d).double()  # (out, G)
    dq = d.to(torch.float16).double()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    col_group = perm // group  # (n,) the scale column of each permuted column

    Hinv, damp = None, percdamp
    for attempt in range(retries + 1):
        damp = percdamp * 10 ** attempt
        Hd = H + damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                Hinv = U
                break
    if Hinv is None:
        raise HessianError(f"the Hessian does not factor with damping up to {damp:g} x mean(diag H)")

    Q = torch.zeros(W.shape, dtype=torch.int8)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = col_group[i1 + i]
            col = W1[:, i]
            x = col * inv[:, g]  # the ggml rounding of grid_codes, on this column
            q = (x.sign() * (x.abs() + 0.5).floor()).clamp(-127, 127) if bits == 8 else (x + 8.5).trunc().clamp(0, 15) - 8
            Q[:, i1 + i] = q.to(torch.int8)
            err = (col - q * dq[:, g]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], d.to(torch.float16), damp


# -- the model ---------------------------------------------------------------------------------------


def grid_of(name: str, bits: int, embedding_bits: int, n_in: int) -> tuple[int, int]:
    """(bits, group) of weight `name` in a scheme of `bits`: int8 per output channel; int4 in groups
    of 32, the embedding/head at embedding_bits in groups of 32."""
    if bits == 8:
        return 8, n_in
    return (embedding_bits, GROUP) if name in ("embed_tokens.weight", "lm_head.weight") else (4, GROUP)


class HessianHook:
    """Accumulates H = 2/n sum x x^T of a module's inputs: each batch's x^T x in float32 (as the
    reference implementation computes all of H), the running sum in float64."""

    def __init__(self, module: torch.nn.Module):
        self.H = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
        self.H *= self.n / (self.n + len(x))
        self.n += len(x)
        self.H += (2.0 / self.n) * (x.T @ x).double()


@torch.no_grad()
def quantize_model(model: GPT, calib: torch.Tensor, bits: int, cfg: Config, method: str, where: str
                   ) -> tuple[GPT, list[dict[str, Any]]]:
    """A quantized copy of `model` (QuantLinear/QuantEmbedding) and, for GPTQ, each weight's output
    error against RTN's on the same inputs. calib: (N, T) token ids."""
    work = copy.deepcopy(model).float().eval()
    c = work.cfg
    quantized, bits_of, errors = {}, {}, []

    def quantize(name: str, module: torch.nn.Module, H: torch.Tensor | None) -> None:
        w = module.weight.detach().float()
        b, g = grid_of(name, bits, cfg.embedding_bits, w.shape[1])
        rtn = quantize_rtn(w, b, g)
        codes, scales = rtn
        if method == "gptq" and H is not None:
            try:
                codes, scales, damp = gptq_quantize(w, H, b, g, cfg.percdamp, cfg.block_size, cfg.act_order, cfg.damp_retries)
            except HessianError as e:
                raise StageError(f"quantize: {where} {name}: {e}; raise quantize.percdamp or calib_rows") from None
            errors.append({"weight": name, "rtn": layer_error(w, dequantize(*rtn), H),
                           "gptq": layer_error(w, dequantize(codes, scales), H), "damp": damp})
        quantized[name], bits_of[name] = (codes, scales), b
        module.weight.data = dequantize(codes, scales)  # later layers see this layer quantized

    T = calib.shape[1]
    cos, sin = work.rope_cos[:T, None], work.rope_sin[:T, None]
    batches = list(calib.split(16))

    def hessians(modules: list[torch.nn.Module], run) -> list[torch.Tensor]:
        hooks = [HessianHook(m) for m in modules]
        for i, b in enumerate(batches):
            run(i, b)
        for h in hooks:
            h.handle.remove()
        return [h.H for h in hooks]

    # the embedding (tied head included) by round to nearest: a lookup has no inputs to weigh its errors
    # by, and GPTQ's error compensation for the head's outputs makes the rows worse as embeddings
    quantize("embed_tokens.weight", work.embed_tokens, None)
    if method == "rtn":  # no data: every weight on its own
        for li, layer in enumerate(work.layers):
            for n in LINEAR_NAMES:
                quantize(f"layers.{li}.{n}.weight", layer.get_submodule(n), None)
        if not c.tie_embeddings:
            quantize("lm_head.weight", work.lm_head, None)
        return quantized_model(work, quantized, bits_of), errors
    xs = [work.embed_tokens(b) for b in batches]  # (B, T, d) each
    for li, layer in enumerate(work.layers):
        # true-sequential: q/k/v (one Hessian: their common input), then o, then gate/up (one), then
        # down, each group's Hessian from a forward through the layer with the groups before it quantized
        # (one forward per layer instead raised the int4 loss increase from +0.8% to +1.4% on the tiny chat model)
        for names in (LINEAR_NAMES[:3], LINEAR_NAMES[3:4], LINEAR_NAMES[4:6], LINEAR_NAMES[6:]):
            H = hessians([layer.get_submodule(names[0])], lambda i, b: layer(xs[i], cos, sin, None, True, None))[0]
            for n in names:
                quantize(f"layers.{li}.{n}.weight", layer.get_submodule(n), H)
        xs = [layer(x, cos, sin, None, True, None) for x in xs]  # the next layer's inputs, through the quantized one
    if not c.tie_embeddings:
        H = hessians([work.lm_head], lambda i, b: work.lm_head(work.norm(xs[i])))[0]
        quantize("lm_head.weight", work.lm_head, H)
    return quantized_model(work, quantized, bits_of), errors  # norm gains stay fp32


# -- data and measurements -------------------------------------------------------------------------


def read_chat(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, val rows) of a `chat` dataset, each sorted by id (the same rows every run)."""
    try:
        rows = sorted(iter_rows(path), key=lambda r: r["id"])
    except FileNotFoundError:
        raise StageError(f"quantize: no chat dataset at {path}; rebuild the instruct stage") from None
    train, val = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]
    if not train:
        raise StageError(f"quantize: {path} has no train-split chat rows to calibrate on (splits: "
                         f"{sorted({r['split'] for r in rows})}); rebuild the instruct stage")
    if not val:
        raise StageError(f"quantize: {path} has no val-split chat rows to measure on; rebuild the instruct stage")
    return train, val


def calibration(tok: Tokenizer, rows: list[dict[str, Any]], n_rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """(N, seq_len) ids: n_rows train conversations (a seeded sample) in ChatML, concatenated and cut
    into segments (a shorter single segment when there are fewer tokens)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(rows), generator=g)[:n_rows].tolist()
    ids = [t for i in pick for t in tok.encode(tok.apply_chat_template(rows[i]["messages"]))]
    n = max(1, len(ids) // seq_len)
    T = min(seq_len, len(ids))
    return torch.tensor(ids[:n * T], dtype=torch.long).view(n, T)


def encode_val(tok: Tokenizer, rows: list[dict[str, Any]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) per conversation: targets are the next token on assistant tokens, else -100."""
    out = []
    for r in rows:
        ids, mask = tok.encode_chat(r["messages"])
        if 1 < len(ids) <= max_len + 1 and any(mask[1:]):
            out.append((ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]))
    return out


@torch.no_grad()
def chat_loss(model: GPT, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy (nats) per assistant token, batches of similar length right-padded."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    total, count = 0.0, 0
    for lo in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[lo:lo + batch_size]]
        T = max(len(x) for x, _ in chunk)
        x = torch.tensor([xs + [pad_id] * (T - len(xs)) for xs, _ in chunk])
        y = torch.tensor([ys + [IGNORE] * (T - len(ys)) for _, ys in chunk])
        n = int((y != IGNORE).sum())
        _, loss = model(x, y)
        total += loss.item() * n
        count += n
    return total / max(1, count)


def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for a GGUF of a family chat model (ChatML, stop at <|im_end|>)."""
    return (f"FROM ./{gguf_name}\n"
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}<|im_start|>assistant\n"""\n'
            'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\nPARAMETER temperature 0\n')


def dir_bytes(d: Path) -> int:
    return (d / "model.safetensors").stat().st_size


# -- the report ------------------------------------------------------------------------------------


def member_metrics(m: dict[str, Any], method: str) -> dict[str, float]:
    """The headline metrics of one model from what was measured (see the module docstring)."""
    fp, fp_acc = m["fp32_loss"], m["fp32_acc"].get("acc", float("nan"))
    inc = {k: (v - fp) / fp for k, v in m["loss"].items()}  # relative val-loss increase per variant
    out = {"val_loss": fp, "acc": fp_acc,
           "int8/loss_increase": inc[f"int8_{method}"], "int8_rtn/loss_increase": inc["int8_rtn"],
           "int8_gptq/loss_increase": inc["int8_gptq"], "int4_rtn/loss_increase": inc["int4_rtn"],
           "int4_gptq/loss_increase": inc["int4_gptq"],
           "int8/acc_delta": m["acc"]["int8"].get("acc", float("nan")) - fp_acc,
           f"int4_{method}/acc_delta": m["acc"]["int4"].get("acc", float("nan")) - fp_acc,
           "int4_gptq/recovered": 1.0 - inc["int4_gptq"] / inc["int4_rtn"] if inc["int4_rtn"] > 0 else float("nan"),
           "q8_0/size_ratio": m["f32_bytes"] / m["bytes"]["q8_0"], "q4_0/size_ratio": m["f32_bytes"] / m["bytes"]["q4_0"],
           "f16/size_ratio": m["f32_bytes"] / m["bytes"]["f16"],
           "int8/size_ratio": m["bytes"]["fp32_dir"] / m["bytes"]["int8_dir"],
           "int4/size_ratio": m["bytes"]["fp32_dir"] / m["bytes"]["int4_dir"]}
    for bits in (8, 4):
        errs = m["errors"].get(bits, [])
        if errs:
            ratios = [e["gptq"] / e["rtn"] for e in errs if e["rtn"] > 0]
            out[f"int{bits}_gptq/layer_err_ratio"] = sum(ratios) / len(ratios)
            out[f"int{bits}_gptq/layers_better"] = sum(r <= 1.0 for r in ratios) / len(ratios)
    return out


def summarize(cfg: Config, measured: dict[str, dict[str, Any]], derived: dict[str, Any]) -> StageResult:
    """Metrics of the chat model (no prefix) and of `small` (prefix small/), the table and the summary."""
    metrics: dict[str, float] = {}
    table = []
    for member, m in measured.items():
        mm = member_metrics(m, cfg.method)
        metrics.update({k if member == "chat" else f"{member}/{k}": v for k, v in mm.items()})
        for variant in ("int8_rtn", "int8_gptq", "int4_rtn", "int4_gptq"):
            table.append({"model": member, "variant": variant, "val_loss": m["loss"][variant],
                          "loss_increase": mm[f"{variant}/loss_increase"]})
    lines = [f"Weight-only quantization ({cfg.method} published; both measured) on {derived['eval_conversations']} held-out "
             f"chat conversations and {derived['eval_prompts']} held-out prompts; calibration {derived['calib_tokens']} "
             f"train tokens.", "", "| model | int8 | int4 RTN | int4 GPTQ | GPTQ recovers | Q8_0 x | Q4_0 x |", "|---|---|---|---|---|---|---|"]
    for member in measured:
        p = "" if member == "chat" else f"{member}/"
        lines.append(f"| {member} | {metrics[p + 'int8/loss_increase']:+.2%} | {metrics[p + 'int4_rtn/loss_increase']:+.2%} | "
                     f"{metrics[p + 'int4_gptq/loss_increase']:+.2%} | {metrics[p + 'int4_gptq/recovered']:.0%} | "
                     f"{metrics[p + 'q8_0/size_ratio']:.2f} | {metrics[p + 'q4_0/size_ratio']:.2f} |")
    lines += ["", "GGUF files (llama.cpp, Ollama): " + ", ".join(derived["gguf_files"])]
    outputs = {f"{member}_int{b}": {"bits": b, "method": cfg.method} for member in measured for b in (8, 4)}
    outputs["gguf"] = {"files": derived["gguf_files"]}
    return StageResult(outputs=outputs, metrics=metrics, summary="\n".join(lines), tables={"quantization": table})


# -- the stage -------------------------------------------------------------------------------------


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup and data
    torch.manual_seed(ctx.seed)
    train, val = read_chat(inputs["chat"].path)
    prompts = [r for r in pick_heldout(iter_rows(inputs["prompts"].path), cfg.eval_per_task) if r["verifier"] in VERIFIERS]
    gguf_dir = ctx.output("gguf")
    gguf_dir.mkdir(parents=True, exist_ok=True)
    measured: dict[str, dict[str, Any]] = {}
    derived: dict[str, Any] = {"eval_prompts": len(prompts), "gguf_files": [], "seconds": {}}

    for member, name in (("chat", "grpo"), ("small", "small")):
        t0 = time.perf_counter()
        src, tok, model = open_model_input(inputs, name, "quantize")
        model.eval()
        odd = sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m.in_features % GROUP})
        if odd:
            raise StageError(f"quantize: input {name!r} at {src} has layers of {odd} input features; int4 and GGUF's "
                             f"Q4_0/Q8_0 blocks need multiples of {GROUP}")
        calib = calibration(tok, train, cfg.calib_rows, min(cfg.calib_len, model.cfg.max_seq_len), ctx.seed)
        examples = encode_val(tok, val[:cfg.eval_rows], model.cfg.max_seq_len)
        derived.update(calib_tokens=calib.numel(), eval_conversations=len(examples))
        m: dict[str, Any] = {"loss": {}, "acc": {}, "errors": {}, "bytes": {"fp32_dir": dir_bytes(src)}}
        m["fp32_loss"] = chat_loss(model, examples, tok.pad_id, cfg.batch_size)
        m["fp32_acc"] = evaluate_prompts(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size) if prompts else {}
        published = {}
        for bits in (8, 4):
            for method in ("rtn", "gptq"):
                ctx.progress(0, 1, f"{member} int{bits} {method}")
                qmodel, errors = quantize_model(model, calib, bits, cfg, method, f"input {name!r} at {src}:")
                plain = dequantized_model(qmodel)  # the same function, without dequantizing every step
                m["loss"][f"int{bits}_{method}"] = chat_loss(plain, examples, tok.pad_id, cfg.batch_size)
                if errors:
                    m["errors"][bits] = errors
                if method == cfg.method:
                    published[bits] = qmodel
                    m["acc"][f"int{bits}"] = evaluate_prompts(plain, tok, prompts, cfg.max_new_tokens, cfg.batch_size) if prompts else {}
        for bits, qmodel in published.items():
            out = save_quantized(qmodel, ctx.output(f"{member}_int{bits}"), {
                "scheme": "int8 per output channel" if bits == 8 else f"int4 g{GROUP} Q4_0 grid", "method": cfg.method,
                "embedding_bits": 8 if bits == 8 else cfg.embedding_bits, "source": inputs[name].fingerprint})
            copy_tokenizer_files(src, out)
            m["bytes"][f"int{bits}_dir"] = dir_bytes(out)

        # GGUF: F16 and Q8_0 from the fp32 weights, Q4_0 from the int4 member's own codes (lossless)
        for file_type, source in (("f16", model), ("q8_0", model), ("q4_0", published[4])):
            path = gguf_dir / f"{member}-{file_type}.gguf"
            try:
                write_gguf(source, src, path, file_type, name=f"{member}-{file_type}")
            except OSError as e:
                full = " (the disk is full)" if e.errno == errno.ENOSPC else ""
                raise StageError(f"quantize: writing {path} failed{full}: {e.strerror or e}; free space there and run again") from None
            except ValueError as e:
                raise StageError(f"quantize: input {name!r} at {src}: {e}") from None
            m["bytes"][file_type] = path.stat().st_size
            derived["gguf_files"].append(path.name)
        m["f32_bytes"] = f32_file_bytes(gguf_dir / f"{member}-f16.gguf")
        (gguf_dir / ("Modelfile" if member == "chat" else f"Modelfile.{member}")).write_text(modelfile(f"{member}-q4_0.gguf"))
        measured[member] = m
        derived["seconds"][member] = time.perf_counter() - t0
        ctx.logger.info("quantize: %s done in %.1f s", member, derived["seconds"][member])

    result = summarize(cfg, measured, derived)
    record = {"metrics": result.metrics, "derived": derived, "errors": {k: v["errors"] for k, v in measured.items()}}
    (gguf_dir / "quantization.json").write_text(json.dumps(without_timings(record), indent=2, default=str))
    ctx.tracker.log_metrics(result.metrics)
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

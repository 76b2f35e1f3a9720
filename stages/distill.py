"""Distillation: a small student of the final chat model, with at most a quarter of its body.

What: reads `grpo` (the teacher: the final chat model), `chat` (the conversations SFT learned; split
"train" trains, "val" measures) and `prompts` (held-out verifiable prompts), and writes `small`: a
model directory like the teacher's (model.safetensors + config.json, the teacher's tokenizer files,
meta.json, an HF Qwen3 export in hf/).

The student: the teacher's tokenizer, embedding rows and depth, half its width (d_model, query and
key/value heads, d_ff rounded down to a multiple of 32), so its non-embedding parameters are at most
`max_body_ratio` (1/4) of the teacher's. Initialised by pruning the teacher (Minitron, Muralidharan et
al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"): on `prune_rows` train
conversations, the importance of a residual channel is its mean |activation| after every RMSNorm, of
an MLP neuron its mean |silu(gate) * up|, of a key/value group the summed norm of its query heads'
outputs; the student keeps the most important ones and the teacher's weights at those rows and
columns. `init: random` starts from scratch instead; `student_dir` from a model directory of yours
(it must have the teacher's vocabulary).

Loss per assistant token (`distill_loss`), with p = softmax(z_teacher / T), q = softmax(z_student / T):

    L = alpha * CE(z_student, y) + (1 - alpha) * T^2 * D_beta(p, q)
    D_0 = KL(p || q) (forward KL; Hinton et al. 2015),  D_1 = KL(q || p) (reverse KL),
    D_beta = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (generalized JSD)

The T^2 keeps the soft-target gradients at the CE term's scale (Hinton et al.). On-policy distillation
(GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models"): with probability
`on_policy`, a step's batch is replaced by the student's own completions (sampled at temperature 1)
of train prompts, scored by the teacher, with the divergence only (alpha = 0: there is no reference
answer) on the completion tokens. The student sees the `chat` train conversations (the teacher's
SFT data; teacher logits on every assistant token) and, on-policy, its own answers.

The baseline, in the same run at equal compute: the same student shape, init and data order trained
with CE only (alpha = 1, no teacher), for as many steps as cost the FLOPs the distillation run spent,
counting its teacher forwards (and, on-policy, the sampling): ce_only_steps = FLOPs_kd / (the mean
FLOPs of a student training step in the kd run), with FLOPs from GPT.flops_per_token split at the
output head (`train_flops`): both models run their 4k-row head only on the assistant tokens the loss
reads (about 20% of a padded batch), their bodies on every position. Its accuracy is ce_only_acc/<task>.

Held-out: acc/<task> (greedy, stages/chat/evaluate.py) of the student, ce_only_acc/<task>, and
teacher_acc/<task> (read from the teacher's meta.json when the GRPO stage measured it on the same
prompts, else measured), each with its 95% interval (acc_ci95/<task>: the half-width, normal
approximation), and the paired difference student - CE-only with its interval (kd_gain/<task>,
kd_gain_ci95/<task>); kl_to_teacher (KL(p || q) at T = 1 per assistant token of `eval_rows` val
conversations) and top1_agreement (share of those tokens where both argmaxes agree), for the student
and the CE-only one (ce_only_kl_to_teacher, ...); params and teacher_params.

Measured on the tiny family (300 steps of 16 conversations, under one epoch of the chat data; at
4f0da44): the half-width student reaches arith / count / string / wordprob 0.05 / 0.46 / 0.76 / 0.03
against the teacher's 0.89 / 0.56 / 0.99 / 0.63, and the CE-only student at equal compute (635
steps, no teacher forwards) 0.18 / 0.31 / 0.98 / 0.04: KD wins on counting (+0.15 +- 0.07), where the
teacher is unsure, and loses where its targets are near one-hot. Why (`python -m bench.distill`,
val CE per assistant token from the same pruned init): per step the teacher's soft targets help
(300 steps: KD 0.518, CE 0.545; CE at equal FLOPs, 658 steps: 0.449), but a teacher forward costs
more than a student's training step here (both run the 4096-row head on the assistant tokens, and
the teacher's body is 4x the student's), so CE gets over twice the steps for the same FLOPs and
wins. The targets of these tasks are deterministic (little dark knowledge to transfer), and
pruning half the width leaves a student at CE 5.9 (random: 8.3), which 300 steps cannot rebuild.
On-policy distillation (on_policy 0.5, JSD beta 0.5) was worse still (string 0.18): the pruned
student's samples are noise at first. Distillation pays when the teacher is cheap relative to the
student's training step or the data is repeated (cached teacher logits amortised over epochs),
neither true under this stage's 90-second budget.

Deviations: the pruned student is not re-balanced after pruning (RMSNorm now averages over fewer
channels), distillation repairs it; one teacher pass per batch (no cached teacher logits).

Run:
    python -m stages.distill --config c.json --inputs i.json --run-dir DIR
    with i.json = {"grpo": "TEACHER_DIR", "chat": "CHAT_DIR", "prompts": "PROMPTS_DIR"}
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.generate import generate
from models.gpt import GPT, GPTConfig
from models.hf_export import save_model_dir
from models.tokenizer import Tokenizer
from stages.chat.evaluate import accuracy_table, generate_answers, heldout_key, pick_heldout, prompt_ids, recorded_eval
from stages.chat.preference import BatchOrder, pad_right
from stages.chat.verifiers import VERIFIERS, verify
from stages.contract import StageContext, StageError, StageResult, main
from stages.training import (
    Clock, TrainConfig, adamw, budget_warnings, checkpoint, clip_gradients, open_model_input, resume,
    set_lr, setup_runtime, stopped_by, write_run_meta,
)
from storage.artifacts import Artifact
from storage.parquet import iter_rows

INPUTS = ("grpo", "chat", "prompts")
OUTPUTS = ("small",)
INPUT_FILES = ("student_dir",)
GPU = True
IGNORE = -100


@dataclass(frozen=True)
class Config(TrainConfig):
    # the student (0 = derived from the teacher: half its width, its depth)
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    d_ff: int = 0
    max_body_ratio: float = 0.25  # student / teacher non-embedding parameters, at most
    init: Literal["prune", "random"] = "prune"
    student_dir: str = ""  # a model directory to start from instead (the teacher's vocabulary)
    prune_rows: int = 64  # train conversations that measure the importances
    # the loss
    alpha: float = 0.5  # weight of CE; 1 - alpha on the divergence
    temperature: float = 1.0
    beta: float = 0.0  # 0 forward KL, 1 reverse KL, between: generalized JSD
    on_policy: float = 0.0  # share of steps on the student's own samples (GKD's lambda)
    gen_tokens: int = 64  # sampled tokens per on-policy completion
    ce_baseline: bool = True  # also train the CE-only student at equal compute
    # the policy's knobs (stages/training.TrainConfig), with distillation's defaults
    lr: float = 2e-3
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    max_steps: int = 200
    ckpt_every: int = 100
    batch_size: int = 16  # conversations per step
    # held-out measurements
    eval_rows: int = 200  # val conversations for kl_to_teacher and top1_agreement
    eval_per_task: int = 100  # held-out prompts per task (as the chat stages choose them)
    max_new_tokens: int = 96
    eval_batch_size: int = 128  # prompts decoded together (a small model's step costs little more at 128 than at 32)

    def validate(self) -> None:
        for name in ("batch_size", "prune_rows", "eval_rows", "max_new_tokens", "gen_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "eval_per_task"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"alpha, beta and on_policy must be in [0, 1], got {self.alpha}, {self.beta}, {self.on_policy}")
        if self.temperature <= 0 or not 0.0 < self.max_body_ratio <= 1.0:
            raise ValueError(f"temperature must be > 0 and max_body_ratio in (0, 1], got {self.temperature}, {self.max_body_ratio}")
        TrainConfig.validate(self)


# -- the loss ----------------------------------------------------------------------------------------


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD D_beta(p, q) of (N, V) log-probabilities (teacher p, student q):
    beta = 0 is KL(p || q), beta = 1 is KL(q || p), else beta KL(p || m) + (1 - beta) KL(q || m) with
    m = beta p + (1 - beta) q, mixed in probability space (logsumexp), as TRL's GKD."""
    if beta == 0.0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logsumexp(torch.stack((log_p + math.log(beta), log_q + math.log(1.0 - beta))), dim=0)
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1.0 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                 alpha: float, temperature: float = 1.0, beta: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE + (1 - alpha) * T^2 * D_beta(softmax(teacher / T), softmax(student / T)), both terms
    averaged over the tokens whose target is not -100. student/teacher logits (..., V), targets
    (...): (B, T, V) and (B, T), or only the scored rows, (N, V) and (N,). teacher_logits None means CE only (alpha must be 1). Returns the loss and detached
    stats: ce, kd (the scaled divergence term)."""
    mask = targets != IGNORE  # (B, T)
    s = student_logits[mask].float()  # (N, V)
    ce = F.cross_entropy(s, targets[mask]) if alpha > 0 else s.new_zeros(())
    if teacher_logits is None:
        if alpha != 1.0:
            raise ValueError("distill_loss without teacher logits needs alpha = 1")
        return ce, {"ce": ce.detach(), "kd": torch.zeros(())}
    t = teacher_logits[mask].float()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kd = temperature ** 2 * divergence(log_p, log_q, beta).mean()
    loss = alpha * ce + (1.0 - alpha) * kd
    return loss, {"ce": ce.detach(), "kd": kd.detach()}


# -- the student -------------------------------------------------------------------------------------


def student_config(teacher: GPTConfig, cfg: Config) -> GPTConfig:
    """Half the teacher's width at its depth, unless the config says otherwise."""
    return GPTConfig(vocab_size=teacher.vocab_size, d_model=cfg.d_model or teacher.d_model // 2,
                     n_layers=cfg.n_layers or teacher.n_layers, n_heads=cfg.n_heads or max(1, teacher.n_heads // 2),
                     n_kv_heads=cfg.n_kv_heads or max(1, teacher.n_kv_heads // 2), head_dim=teacher.head_dim,
                     d_ff=cfg.d_ff or max(32, 32 * (teacher.d_ff // 2 // 32)), max_seq_len=teacher.max_seq_len,
                     rope_theta=teacher.rope_theta, rms_eps=teacher.rms_eps, tie_embeddings=teacher.tie_embeddings)


@torch.no_grad()
def importances(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Mean |activation| per residual channel (after every RMSNorm of d_model), per MLP neuron
    (down_proj's input) and per query head (the norm of its slice of o_proj's input), per layer."""
    c = model.cfg
    channel = torch.zeros(c.d_model)
    neuron = [torch.zeros(c.d_ff) for _ in range(c.n_layers)]
    head = [torch.zeros(c.n_heads) for _ in range(c.n_layers)]
    hooks = []

    def on_norm(m, args, out) -> None:  # a hook that returned a tensor would replace the module's output
        channel.add_(out.abs().flatten(0, -2).mean(0))

    def on_down(i: int):
        def hook(m, args, out) -> None:
            neuron[i].add_(args[0].abs().flatten(0, -2).mean(0))
        return hook

    def on_o(i: int):
        def hook(m, args, out) -> None:
            head[i].add_(args[0].unflatten(-1, (c.n_heads, c.head_dim)).norm(dim=-1).flatten(0, -2).mean(0))
        return hook

    for i, layer in enumerate(model.layers):
        hooks += [layer.input_layernorm.register_forward_hook(on_norm),
                  layer.post_attention_layernorm.register_forward_hook(on_norm),
                  layer.mlp.down_proj.register_forward_hook(on_down(i)),
                  layer.self_attn.o_proj.register_forward_hook(on_o(i))]
    hooks.append(model.norm.register_forward_hook(on_norm))
    for x, _ in batches:
        model(x)
    for h in hooks:
        h.remove()
    return {"channel": channel, "neuron": neuron, "head": head}


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in increasing index order (the kept rows keep their order)."""
    return torch.sort(torch.topk(scores, k).indices).values


def prune(teacher: GPT, scfg: GPTConfig, imp: dict[str, Any]) -> GPT:
    """The student of shape `scfg` holding the teacher's weights at its most important channels,
    neurons and heads (layers evenly spaced when the student is shallower)."""
    tc = teacher.cfg
    group, sgroup = tc.n_heads // tc.n_kv_heads, scfg.n_heads // scfg.n_kv_heads
    if sgroup > group or scfg.n_kv_heads > tc.n_kv_heads or scfg.head_dim != tc.head_dim:
        raise StageError(f"distill: cannot prune {tc.n_heads} heads / {tc.n_kv_heads} kv heads to "
                         f"{scfg.n_heads} / {scfg.n_kv_heads}; use init: random or other head counts")
    student = GPT(scfg)
    ch = top(imp["channel"], scfg.d_model)
    hd = tc.head_dim
    t, s = teacher.state_dict(), student.state_dict()
    s["embed_tokens.weight"] = t["embed_tokens.weight"][:, ch]
    s["norm.weight"] = t["norm.weight"][ch]
    if not tc.tie_embeddings:
        s["lm_head.weight"] = t["lm_head.weight"][:, ch]
    keep_layers = np.round(np.linspace(0, tc.n_layers - 1, scfg.n_layers)).astype(int).tolist()
    for si, ti in enumerate(keep_layers):
        hs = imp["head"][ti].view(tc.n_kv_heads, group)  # (kv groups, query heads per group)
        kv = top(hs.sum(1), scfg.n_kv_heads)
        q_heads = torch.cat([g * group + top(hs[g], sgroup) for g in kv.tolist()])
        rows = lambda heads: torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads.tolist()])  # noqa: E731
        neurons = top(imp["neuron"][ti], scfg.d_ff)
        tp, sp = f"layers.{ti}.", f"layers.{si}."
        s[sp + "self_attn.q_proj.weight"] = t[tp + "self_attn.q_proj.weight"][rows(q_heads)][:, ch]
        s[sp + "self_attn.k_proj.weight"] = t[tp + "self_attn.k_proj.weight"][rows(kv)][:, ch]
        s[sp + "self_attn.v_proj.weight"] = t[tp + "self_attn.v_proj.weight"][rows(kv)][:, ch]
        s[sp + "self_attn.o_proj.weight"] = t[tp + "self_attn.o_proj.weight"][ch][:, rows(q_heads)]
        for n in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            s[sp + n] = t[tp + n]
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            s[sp + n] = t[tp + n][ch]
        s[sp + "mlp.gate_proj.weight"] = t[tp + "mlp.gate_proj.weight"][neurons][:, ch]
        s[sp + "mlp.up_proj.weight"] = t[tp + "mlp.up_proj.weight"][neurons][:, ch]
        s[sp + "mlp.down_proj.weight"] = t[tp + "mlp.down_proj.weight"][ch][:, neurons]
    if tc.tie_embeddings:
        s["lm_head.weight"] = s["embed_tokens.weight"]
    student.load_state_dict(s)
    return student


def train_flops(model: GPT, seq_len: float) -> tuple[float, float]:
    """Training FLOPs (forward + backward; a third of each for a forward) per position that runs the
    body, and per position that also runs the head: GPT.flops_per_token split at the output head,
    which runs only on the positions the loss reads (GPT.forward's `at`)."""
    head = 6.0 * model.lm_head.weight.numel()
    return model.flops_per_token(seq_len) - head, head


# -- data --------------------------------------------------------------------------------------------


def encode_rows(tok: Tokenizer, rows: list[dict[str, Any]], max_len: int
                ) -> tuple[list[tuple[list[int], list[int]]], list[dict[str, Any]]]:
    """(inputs, targets) per conversation: the next token where the assistant writes it, else -100;
    conversations longer than max_len or without an assistant turn are left out. Also the rows kept."""
    out, kept = [], []
    for r in rows:
        ids, mask = tok.encode_chat(r["messages"])
        if len(ids) - 1 <= max_len and any(mask[1:]):
            out.append((ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]))
            kept.append(r)
    return out, kept


def last_prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation before its last assistant turn: what an on-policy sample answers."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def batch_of(examples: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) inputs and targets (-100 on padding): a real token never attends to the
    padding after it, so no mask is needed."""
    T = max(len(x) for x, _ in examples)
    x = torch.tensor([xs + [pad_id] * (T - len(xs)) for xs, _ in examples], device=device)
    y = torch.tensor([ys + [IGNORE] * (T - len(ys)) for _, ys in examples], device=device)
    return x, y


def on_policy_batch(student: GPT, tok: Tokenizer, prompts: list[list[int]], gen_tokens: int, generator: torch.Generator,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's sampled completions of `prompts` as (inputs, targets): targets on the completion
    tokens (and the <|im_end|> it stopped with), -100 on the prompt and padding."""
    student.eval()
    outs = generate(student, prompts, gen_tokens, temperature=1.0, stop_ids=(tok.im_end_id,), pad_id=tok.pad_id,
                    generator=generator)
    student.train()
    seqs = [p + o + ([tok.im_end_id] if len(o) < gen_tokens else []) for p, o in zip(prompts, outs)]
    ids = pad_right(seqs, tok.pad_id, device)  # (B, T)
    targets = torch.full_like(ids, IGNORE)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        targets[i, len(p) - 1:len(s) - 1] = ids[i, len(p):len(s)]
    return ids[:, :-1], targets[:, :-1]


# -- measurements ------------------------------------------------------------------------------------


@torch.no_grad()
def agreement(student: GPT, teacher: GPT, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
              device: torch.device) -> dict[str, float]:
    """KL(teacher || student) at T = 1 and top-1 agreement, per assistant token of `examples`."""
    kl, agree, n = 0.0, 0, 0
    for lo in range(0, len(examples), batch_size):
        x, y = batch_of(examples[lo:lo + batch_size], pad_id, device)
        mask = y != IGNORE
        s, t = student(x, at=mask)[0].float(), teacher(x, at=mask)[0].float()
        kl += divergence(F.log_softmax(t, -1), F.log_softmax(s, -1), 0.0).sum().item()
        agree += int((s.argmax(-1) == t.argmax(-1)).sum())
        n += int(mask.sum())
    return {"kl_to_teacher": kl / max(1, n), "top1_agreement": agree / max(1, n)}


def correctness(model: GPT, tok: Tokenizer, rows: list[dict[str, Any]], max_new_tokens: int, batch_size: int) -> list[bool]:
    """Per held-out prompt: is the greedy answer right (the row's verifier)."""
    answers = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    return [bool(verify(r["verifier"], a, r["answer"])) for r, a in zip(rows, answers)]


def by_task(rows: list[dict[str, Any]], values: list[float]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r, v in zip(rows, values):
        out.setdefault(r["task"] or "all", []).append(float(v))
    return out


def accuracy_with_ci(rows: list[dict[str, Any]], correct: list[bool], prefix: str) -> dict[str, float]:
    """{prefix/<task>: accuracy, ci95 half-width (normal approximation) under <prefix>_ci95/<task>}."""
    out = {}
    for task, v in sorted(by_task(rows, correct).items()):
        p = sum(v) / len(v)
        out[f"{prefix}/{task}"] = p
        out[f"{prefix}_ci95/{task}"] = 1.96 * math.sqrt(p * (1 - p) / len(v))
    return out


def paired_gain(rows: list[dict[str, Any]], a: list[bool], b: list[bool]) -> dict[str, float]:
    """Per task, mean(a - b) over the same prompts and its 95% half-width (paired normal interval)."""
    out = {}
    for task, d in sorted(by_task(rows, [float(x) - float(y) for x, y in zip(a, b)]).items()):
        mean = sum(d) / len(d)
        var = sum((v - mean) ** 2 for v in d) / max(1, len(d) - 1)
        out[f"kd_gain/{task}"] = mean
        out[f"kd_gain_ci95/{task}"] = 1.96 * math.sqrt(var / len(d))
    return out


# -- the loop ----------------------------------------------------------------------------------------


def train_student(student: GPT, teacher: GPT | None, cfg: Config, ctx: StageContext, phase: str, data: dict[str, Any],
                  total_steps: int, rt: Any) -> dict[str, Any]:
    """Train `student` for total_steps: distillation from `teacher`, or CE only when teacher is None.
    Checkpoints under ctx.checkpoint_dir/phase; returns the run's steps, FLOPs, tokens and stop reason."""
    device, autocast = rt.device, rt.autocast
    pctx = dataclasses.replace(ctx, checkpoint_dir=ctx.checkpoint_dir / phase, stage=f"distill ({phase})")
    pctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tok, train = data["tok"], data["train"]
    optimizer = adamw(student, cfg, device)
    # the same data order in both phases, batches of similar length (less padding)
    order = BatchOrder(len(train), cfg.batch_size, ctx.seed, lengths=[len(x) for x, _ in train])
    ck = resume(pctx, student, optimizer, device, order=order)
    step, curve, flops, tokens = ck.get("step", 0), ck.get("curve", []), ck.get("flops", 0.0), ck.get("tokens", 0)
    student_flops = ck.get("student_flops", 0.0)
    clock = Clock(ck.get("elapsed_s", 0.0))
    f_student = train_flops(student, data["mean_len"])  # (per position, per scored position): forward + backward
    f_teacher = tuple(f / 3 for f in train_flops(teacher, data["mean_len"])) if teacher is not None else (0.0, 0.0)
    student.train()
    # the running sums since the last log travel in checkpoints: a resumed run logs (and saves) the same curve
    sums: dict[str, float] = dict(ck.get("log_sums", {}))
    n_log = ck.get("log_n", 0)
    while not (step >= total_steps or clock.over(cfg.max_minutes)):
        lr = set_lr(optimizer, cfg, step, total_steps)
        idx = order.next()
        online = teacher is not None and cfg.on_policy > 0 and np.random.default_rng([ctx.seed, step]).random() < cfg.on_policy
        if online:  # GKD: the student's own samples, scored by the teacher, divergence only
            gen = torch.Generator(device=device).manual_seed(ctx.seed * 1_000_003 + step)
            with autocast:
                x, y = on_policy_batch(student, tok, [data["train_prompts"][i] for i in idx], cfg.gen_tokens, gen, device)
            flops += x.numel() * sum(f_student) / 3  # sampling: about one forward (body and head) per token
            alpha = 0.0
        else:
            x, y = batch_of([train[i] for i in idx], tok.pad_id, device)
            alpha = cfg.alpha if teacher is not None else 1.0
        at = y != IGNORE  # the heads run only where the loss reads them
        with autocast:
            logits = student(x, at=at)[0]  # (N, V)
            with torch.no_grad():
                t_logits = teacher(x, at=at)[0] if teacher is not None else None
        loss, stats = distill_loss(logits, t_logits, y[at], alpha, cfg.temperature, cfg.beta)
        loss.backward()
        grad_norm = clip_gradients(student.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_at = int(at.sum())
        student_flops += x.numel() * f_student[0] + n_at * f_student[1]
        flops += x.numel() * (f_student[0] + f_teacher[0]) + n_at * (f_student[1] + f_teacher[1])
        tokens += x.numel()
        for k, v in {"loss": loss.item(), "ce": stats["ce"].item(), "kd": stats["kd"].item(), "on_policy": float(online)}.items():
            sums[k] = sums.get(k, 0.0) + v
        n_log += 1
        if step % cfg.log_every == 0 or step == total_steps:
            point = {f"train/{k}": v / n_log for k, v in sums.items()} | {"train/lr": lr, "train/grad_norm": grad_norm.item()}
            curve.append({"step": step, **point})
            ctx.tracker.log_metrics({k.replace("train/", f"train/{phase}/"): v for k, v in point.items()}, step=step)
            ctx.progress(step, total_steps, phase, loss=point["train/loss"])
            sums, n_log = {}, 0
        checkpoint(pctx, step, student, optimizer, cfg, clock, order=order, curve=curve, flops=flops, tokens=tokens,
                   student_flops=student_flops, log_sums=sums, log_n=n_log)
    checkpoint(pctx, step, student, optimizer, cfg, clock, final=True, order=order, curve=curve, flops=flops, tokens=tokens,
               student_flops=student_flops, log_sums=sums, log_n=n_log)
    student.eval()
    return {"steps": step, "total_steps": total_steps, "flops": flops, "student_flops": student_flops, "tokens": tokens,
            "curve": curve, "clock": clock,
            "seconds": clock.seconds, "stop": stopped_by(step, total_steps)}


# -- the report --------------------------------------------------------------------------------------


def summarize(cfg: Config, derived: dict[str, Any], rows: list[dict[str, Any]], acc: dict[str, float], ce_acc: dict[str, float],
              teacher_acc: dict[str, float], gain: dict[str, float], agree: dict[str, float], ce_agree: dict[str, float],
              kd: dict[str, Any], ce: dict[str, Any] | None) -> StageResult:
    """Headline metrics (the student's acc/<task> beside teacher_acc/ and ce_only_acc/, with 95%
    intervals; kl_to_teacher, top1_agreement, params), the accuracy table and the summary."""
    metrics: dict[str, float] = {**acc, **{f"teacher_{k}": v for k, v in teacher_acc.items()},
                                 **{f"ce_only_{k}": v for k, v in ce_acc.items()}, **gain, **agree,
                                 **{f"ce_only_{k}": v for k, v in ce_agree.items()},
                                 "params": float(derived["params"]), "teacher_params": float(derived["teacher_params"]),
                                 "body_ratio": derived["body_ratio"], "steps": float(kd["steps"]),
                                 "train_flops": kd["flops"], "train_seconds": derived["kd_seconds"],
                                 "ce_only_train_seconds": derived["ce_only_seconds"]}
    for k, v in acc.items():
        if k.startswith("acc/") and teacher_acc.get(k):
            metrics[f"retained/{k.removeprefix('acc/')}"] = v / teacher_acc[k]
    if ce is not None:
        metrics.update({"ce_only_steps": float(ce["steps"]), "ce_only_flops": ce["flops"]})
    columns = {"teacher": teacher_acc, "student (KD)": acc}
    if ce_acc:
        columns["student (CE only, equal compute)"] = ce_acc
    table, md = accuracy_table({k: {m: v for m, v in c.items() if "_ci95" not in m} for k, c in columns.items()}, rows)
    lines = [f"Distillation: a {derived['params'] / 1e6:.2f}M-parameter student (body {derived['body_ratio']:.3f} of the "
             f"teacher's), init {derived['init']}, {kd['steps']} steps ({kd['stop']}), alpha {cfg.alpha}, T {cfg.temperature}, "
             f"beta {cfg.beta}, on-policy {cfg.on_policy}; KL to the teacher {agree['kl_to_teacher']:.3f}, top-1 "
             f"agreement {agree['top1_agreement']:.3f}."]
    if ce is not None:
        lines.append(f"CE-only baseline: the same init and data order, {ce['steps']} steps at equal compute "
                     f"({ce['flops'] / 1e12:.2f} vs {kd['flops'] / 1e12:.2f} TFLOP); KL {ce_agree['kl_to_teacher']:.3f}, "
                     f"top-1 agreement {ce_agree['top1_agreement']:.3f}.")
    lines += ["", f"Held-out accuracy (greedy, {len(rows)} prompts):", "", md]
    warnings = budget_warnings("distill", kd["stop"], kd["steps"], kd["total_steps"], cfg.max_minutes)
    if ce is not None:
        warnings += budget_warnings("distill (CE-only baseline)", ce["stop"], ce["steps"], ce["total_steps"], cfg.max_minutes)
    return StageResult(outputs={"small": {"params": derived["params"], "acc": acc.get("acc")}}, metrics=metrics,
                       summary="\n".join(lines), tables={"heldout_accuracy": table, "train_curve": kd["curve"]},
                       warnings=warnings)


# -- the stage ---------------------------------------------------------------------------------------


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup: the teacher, frozen
    rt = setup_runtime(ctx)
    device = rt.device
    teacher_dir, tok, teacher = open_model_input(inputs, "grpo", "distill", device)
    teacher.eval().requires_grad_(False)

    # data: train conversations (and their prompts, for on-policy steps), val conversations, held-out prompts
    try:
        chat = sorted(iter_rows(inputs["chat"].path), key=lambda r: r["id"])
    except FileNotFoundError:
        raise StageError(f"distill: no chat dataset at {inputs['chat'].path}; rebuild the instruct stage") from None
    train_rows = [r for r in chat if r["split"] == "train"]
    train, kept = encode_rows(tok, train_rows, teacher.cfg.max_seq_len)
    if len(train) < cfg.batch_size:
        raise StageError(f"distill: {inputs['chat'].path} has {len(train)} usable train conversations, fewer than "
                         f"batch_size={cfg.batch_size}; rebuild the instruct stage")
    data = {"tok": tok, "train": train, "mean_len": sum(len(x) for x, _ in train) / len(train),
            "train_prompts": [prompt_ids(tok, last_prompt(r["messages"])) for r in kept] if cfg.on_policy > 0 else []}
    val, _ = encode_rows(tok, [r for r in chat if r["split"] == "val"][:cfg.eval_rows], teacher.cfg.max_seq_len)
    rows = [r for r in pick_heldout(iter_rows(inputs["prompts"].path), cfg.eval_per_task) if r["verifier"] in VERIFIERS]

    # the student: pruned from the teacher, random, or a model directory of the same vocabulary
    scfg = student_config(teacher.cfg, cfg)
    if cfg.student_dir:
        _, stok, student = open_model_input({"student": Artifact("student", cfg.student_dir, "", {})}, "student", "distill", device)
        if stok.tok.get_vocab() != tok.tok.get_vocab():
            raise StageError(f"distill: the student at {cfg.student_dir} has another vocabulary ({stok.vocab_size} tokens) "
                             f"than the teacher at {teacher_dir} ({tok.vocab_size}); a student must share the teacher's tokenizer")
        scfg, init = student.cfg, "student_dir"
    elif cfg.init == "prune":
        with rt.autocast:
            student = prune(teacher, scfg, importances(teacher, [batch_of(train[i:i + 16], tok.pad_id, device)
                                                               for i in range(0, min(len(train), cfg.prune_rows), 16)]))
        init = "pruned teacher"
    else:
        student, init = GPT(scfg), "random"
    student = student.to(device)
    body, teacher_body = student.num_params(non_embedding=True), teacher.num_params(non_embedding=True)
    if body > cfg.max_body_ratio * teacher_body:
        raise StageError(f"distill: the student's body has {body:,} parameters, {body / teacher_body:.3f} of the teacher's "
                         f"{teacher_body:,}; more than max_body_ratio={cfg.max_body_ratio}: lower distill.d_model or d_ff")
    init_state = copy.deepcopy(student.state_dict())
    derived = {"student": scfg.to_dict(), "init": init, "params": student.num_params(), "teacher_params": teacher.num_params(),
               "body_params": body, "teacher_body_params": teacher_body, "body_ratio": body / teacher_body,
               "train_conversations": len(train), "val_conversations": len(val), "heldout_prompts": len(rows)}
    ctx.logger.info("distill: %s", json.dumps(derived))
    ctx.tracker.log_params({"derived": derived})

    # distill, then the CE-only baseline from the same init for the same FLOPs
    kd = train_student(student, teacher, cfg, ctx, "kd", data, cfg.max_steps, rt)
    ce, ce_model = None, None
    if cfg.ce_baseline:
        ce_model = GPT(scfg).to(device)
        ce_model.load_state_dict(init_state)
        ce_steps = max(1, round(kd["flops"] / (kd["student_flops"] / max(1, kd["steps"]))))  # a student step's mean cost
        ce = train_student(ce_model, None, cfg, ctx, "ce_only", data, ce_steps, rt)
    derived.update(kd_seconds=kd["seconds"], ce_only_seconds=ce["seconds"] if ce else 0.0)

    # held-out: the teacher's accuracy as the GRPO stage recorded it (else measured), the students', agreement
    key = heldout_key(rows, cfg.max_new_tokens)
    recorded = recorded_eval(teacher_dir / "meta.json", key)
    with rt.autocast:
        acc_kd = correctness(student, tok, rows, cfg.max_new_tokens, cfg.eval_batch_size) if rows else []
        acc_ce = correctness(ce_model, tok, rows, cfg.max_new_tokens, cfg.eval_batch_size) if rows and ce_model is not None else []
        agree = agreement(student, teacher, val, tok.pad_id, cfg.batch_size, device)
        ce_agree = agreement(ce_model, teacher, val, tok.pad_id, cfg.batch_size, device) if ce_model is not None else {}
        if recorded is not None:
            teacher_acc = teacher_ci(rows, recorded["acc"])
        else:
            teacher_acc = accuracy_with_ci(rows, correctness(teacher, tok, rows, cfg.max_new_tokens, cfg.eval_batch_size), "acc") if rows else {}
    acc = {**accuracy_with_ci(rows, acc_kd, "acc"), **({"acc": sum(acc_kd) / len(acc_kd)} if acc_kd else {})}
    ce_acc = {**accuracy_with_ci(rows, acc_ce, "acc"), **({"acc": sum(acc_ce) / len(acc_ce)} if acc_ce else {})}
    gain = paired_gain(rows, acc_kd, acc_ce) if acc_ce else {}
    result = summarize(cfg, derived, rows, acc, ce_acc, teacher_acc, gain, agree, ce_agree, kd, ce)
    ctx.tracker.log_metrics(result.metrics, step=kd["steps"])

    # save `small`: the teacher's tokenizer files, meta.json, the HF Qwen3 export
    out = save_model_dir(student, teacher_dir, ctx.output("small"))
    write_run_meta(out, "distill", kd["steps"], cfg.max_steps, kd["stop"], result.metrics, derived, cfg, kd["curve"],
                   teacher=inputs["grpo"].fingerprint, heldout={"key": key, "acc": {k: v for k, v in acc.items() if "_ci95" not in k}})
    return result


def teacher_ci(rows: list[dict[str, Any]], acc: dict[str, float]) -> dict[str, float]:
    """A recorded {acc/<task>, acc} with the 95% half-width of each task's accuracy on its prompt count."""
    counts = {t: len(v) for t, v in by_task(rows, [0.0] * len(rows)).items()}
    out = dict(acc)
    for task, n in counts.items():
        p = acc.get(f"acc/{task}")
        if p is not None:
            out[f"acc_ci95/{task}"] = 1.96 * math.sqrt(p * (1 - p) / n)
    return out


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

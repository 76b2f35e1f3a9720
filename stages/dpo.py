"""DPO: align the SFT model to preference pairs with Direct Preference Optimization.

What: reads `sft` (model directory), `prefs` (pairs) and `prompts` (held-out verifiable prompts), trains
the policy (initialised from SFT) against a frozen reference (the SFT model itself) and writes `dpo`: a
model directory (model.safetensors + config.json, tokenizer files, meta.json, hf/ export).

Loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), the "sigmoid" loss of TRL, with
log pi(y|x) the SUM of the response tokens' log-probs (prompt tokens excluded):

    h      = [log pi(y_c|x) - log ref(y_c|x)] - [log pi(y_r|x) - log ref(y_r|x)]
    L_DPO  = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

eps is label smoothing (conservative DPO, Mitchell 2023; TRL `label_smoothing`), 0 by default. The
implicit rewards beta (log pi - log ref) of chosen and rejected give TRL's metrics rewards/chosen,
rewards/rejected, rewards/margins and rewards/accuracies (share of pairs with margin > 0).

Regularisation (RPO; Pang et al. 2024, "Iterative Reasoning Preference Optimization"): DPO alone can
lower the likelihood of the chosen answer too (both log-probs fall, the rejected faster), which on
verifiable tasks costs accuracy. We add rpo_alpha * NLL of the chosen responses (mean over their
tokens), as TRL's `rpo_alpha` does: L = L_DPO + rpo_alpha * NLL(y_c).

Held-out checks (the val split): val_pref_acc, the share of pairs whose implicit reward margin is > 0, a
tie counting half, so the reference itself (every margin exactly 0) and chance score 0.5; overall, per
task and per kind of rejected reply ("near_miss", "slip": stages/instruct.py), with 95% intervals.
val_logp_acc, the share of pairs whose chosen reply the policy finds more likely than the rejected one
(summed log-probs), next to val_ref_logp_acc, the reference's on the same pairs, and the paired gain. And
acc/<task>, greedy accuracy on the held-out prompts (stages/chat/evaluate.py), next to sft_acc/<task>,
the reference's accuracy on the same prompts (the alignment tax).

Deviations: reference log-probs are computed per batch by the frozen model (TRL's default), held-out
ones once; the schedule is linear warmup then constant (the paper: warmup then constant, lr 1e-6 for
6B-scale models; a tiny model needs a larger lr).

Run:
    python -m stages.dpo --config c.json --inputs i.json --run-dir DIR
    with i.json = {"sft": "SFT_DIR", "prefs": "PREFS_DIR", "prompts": "PROMPTS_DIR"}
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models.gpt import GPT
from models.hf_export import save_model_dir
from stages.chat.evaluate import accuracy_table, evaluate_prompts, heldout_key, pick_heldout
from stages.chat.preference import (
    BatchOrder, Pair, accuracy_by_kind, accuracy_by_task, compare, compare_markdown, pair_scores, sequence_logps,
    train_val_pairs,
)
from stages.contract import StageContext, StageResult, main
from stages.training import (
    Clock, TrainConfig, adamw, budget_warnings, checkpoint, clip_gradients, open_model_input, resume,
    set_lr, setup_runtime, stopped_by, write_run_meta,
)
from storage.artifacts import Artifact
from storage.parquet import iter_rows

INPUTS = ("sft", "prefs", "prompts")
OUTPUTS = ("dpo",)
GPU = True


@dataclass(frozen=True)
class Config(TrainConfig):
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 1.0  # weight of the NLL of the chosen response; 0 = plain DPO
    batch_size: int = 16  # pairs per step
    # the policy's knobs (stages/training.TrainConfig: warmup, then a constant lr, as the paper), with DPO's defaults
    lr: float = 2e-4
    max_steps: int = 150
    ckpt_every: int = 50
    max_len: int = 0  # tokens per sequence; 0 = the model's max_seq_len; longer pairs are dropped
    eval_every: int = 50
    eval_pairs: int = 512  # held-out pairs per evaluation (all when fewer)
    train_kinds: tuple[str, ...] = ()  # kinds of prefs pairs trained on ("near_miss", "slip"); () = all; val measures all
    eval_per_task: int = 100  # held-out prompts per task for acc/<task> (as sft chooses them), at the start and the end
    max_new_tokens: int = 96  # greedy answer length for acc/<task> (a worked word problem takes ~80)

    def validate(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "eval_pairs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        TrainConfig.validate(self)
        if not 0.0 <= self.label_smoothing < 0.5 or self.rpo_alpha < 0 or self.max_len < 0 or self.eval_per_task < 0:
            raise ValueError("label_smoothing must be in [0, 0.5), rpo_alpha, max_len and eval_per_task >= 0")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss per pair (B,) and the implicit rewards of chosen and rejected (B,) each (detached).

    All inputs are (B,) sums of response-token log-probs.
        h = (pi_c - ref_c) - (pi_r - ref_r);  loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * h) * (1.0 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_logps(model: torch.nn.Module, pairs: list[Pair], pad_id: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen (B,) and rejected (B,), and the chosen token counts (B,),
    from one right-padded batch of 2B sequences."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    logps, counts = sequence_logps(model, seqs, masks, pad_id, device)  # (2B,)
    B = len(pairs)
    return logps[:B], logps[B:], counts[:B]


@torch.no_grad()
def reference_logps(ref: GPT, pairs: list[Pair], batch_size: int, pad_id: int, device: torch.device,
                    autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        with autocast:
            c, r, _ = pair_logps(ref, pairs[i:i + batch_size], pad_id, device)
        chosen.append(c.float())
        rejected.append(r.float())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def evaluate_pairs(policy: GPT, pairs: list[Pair], ref_c: torch.Tensor, ref_r: torch.Tensor, cfg: Config, pad_id: int,
                   device: torch.device, autocast: contextlib.AbstractContextManager
                   ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Held-out DPO loss, preference accuracy (implicit reward margin > 0, a tie counting half; overall,
    per task "pref_acc/<task>" and per kind "pref_acc/<kind>"), mean margin and the policy's and the
    reference's likelihood preference ("logp_acc", "ref_logp_acc"); and each pair's scores by name."""
    policy.eval()
    loss, margin = 0.0, 0.0
    scores: dict[str, list[float]] = {"pref": [], "logp": [], "ref_logp": pair_scores(ref_c - ref_r)}
    for i in range(0, len(pairs), cfg.batch_size):
        with autocast:
            pc, pr, _ = pair_logps(policy, pairs[i:i + cfg.batch_size], pad_id, device)
        losses, rc, rr = dpo_loss(pc.float(), pr.float(), ref_c[i:i + cfg.batch_size], ref_r[i:i + cfg.batch_size],
                                  cfg.beta, cfg.label_smoothing)
        loss += losses.sum().item()
        scores["pref"] += pair_scores(rc - rr)
        scores["logp"] += pair_scores(pc.float() - pr.float())
        margin += (rc - rr).sum().item()
    policy.train()
    n = max(1, len(pairs))
    ev = {"loss": loss / n, "margin": margin / n}
    for name, s in scores.items():
        ev |= {f"{name}_acc": sum(s) / n, **accuracy_by_task(pairs, s, f"{name}_acc"), **accuracy_by_kind(pairs, s, f"{name}_acc")}
    return ev, scores


def summarize(cfg: Config, derived: dict[str, Any], step: int, stop: str, ev: dict[str, float], acc: dict[str, float],
              sft_acc: dict[str, float], curve: list[dict[str, Any]],
              versus: dict[str, list[dict[str, Any]]] | None = None) -> StageResult:
    """Headline metrics (val preference accuracy overall, per task and per kind; the likelihood
    preference beside the reference's; with `versus`, compare's rows against chance and against the
    reference, 95% half-widths and paired gains; task accuracy beside the reference's), the tables
    and the summary."""
    groups = {k: v for k, v in ev.items() if k.startswith(("pref_acc/", "logp_acc", "ref_logp_acc"))}
    metrics = {"val_pref_acc": ev["pref_acc"], "val_loss": ev["loss"], "val_margin": ev["margin"], "steps": float(step),
               **{f"val_{k}": v for k, v in groups.items()},
               **acc, **{f"sft_{k}": v for k, v in sft_acc.items()}}
    for name, rows in (versus or {}).items():
        for row in rows:
            if "/" not in row["pairs"]:  # all, and each kind
                at = "" if row["pairs"] == "all" else f"/{row['pairs']}"
                metrics[f"val_{'pref' if name == 'chance' else 'logp'}_acc_ci95{at}"] = row["ci95"]
                if name == "reference":
                    metrics |= {f"val_logp_gain{at}": row["gain_over_reference"],
                                f"val_logp_gain_ci95{at}": row["gain_over_reference_ci95"]}
    table, md = accuracy_table({"sft_acc": sft_acc, "dpo_acc": acc})
    summary = (
        f"DPO: {step} of {cfg.max_steps} steps ({stop}), beta {cfg.beta}, rpo_alpha {cfg.rpo_alpha}; val preference "
        f"accuracy {ev['pref_acc']:.3f} on {derived['val_pairs']} pairs (a tie counts half: the reference scores 0.5; "
        f"mean implicit-reward margin {ev['margin']:.3f})"
        + "".join(f"; {k.removeprefix('pref_acc/')} {v:.3f}" for k, v in groups.items() if k.startswith("pref_acc/"))
        + ".\n\n" + md
        + ("".join(f"\n\n{title}:\n\n" + compare_markdown(versus[name], label, {name: base})
                   for name, title, label, base in (
                       ("chance", "Implicit-reward preference accuracy", "dpo", "chance (the reference)"),
                       ("reference", "Likelihood preference (log p chosen > log p rejected)", "dpo", "reference (sft)"))
                   if name in versus) + "\n" if versus else "")
    )
    return StageResult(outputs={"dpo": {"val_pref_acc": ev["pref_acc"], "steps": step}}, metrics=metrics, summary=summary,
                       tables={"eval_curve": curve, "heldout_accuracy": table, **{f"versus_{k}": v for k, v in (versus or {}).items()}},
                       warnings=budget_warnings("dpo", stop, step, cfg.max_steps, cfg.max_minutes))


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup
    rt = setup_runtime(ctx, seed=False)
    device, autocast = rt.device, rt.autocast
    sft_dir, tok, policy = open_model_input(inputs, "sft", "dpo", device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # the frozen reference = the SFT model
    max_len = cfg.max_len or policy.cfg.max_seq_len

    # data
    train, val, dropped = train_val_pairs(inputs["prefs"].path, tok, max_len, cfg.batch_size, cfg.eval_pairs, "dpo",
                                          cfg.train_kinds)
    prompts = pick_heldout(iter_rows(inputs["prompts"].path), cfg.eval_per_task)
    order = BatchOrder(len(train), cfg.batch_size, ctx.seed)
    val_ref_c, val_ref_r = reference_logps(ref, val, cfg.batch_size, tok.pad_id, device, autocast)
    sft_acc = evaluate_prompts(ref, tok, prompts, cfg.max_new_tokens) if prompts else {}
    derived = {"train_pairs": len(train), "val_pairs": len(val), "heldout_prompts": len(prompts),
               "dropped_too_long": dropped, "max_len": max_len,
               "epochs_planned": cfg.max_steps * cfg.batch_size / len(train)}
    ctx.logger.info("dpo: %s; sft held-out accuracy %s", json.dumps(derived), json.dumps(sft_acc))
    ctx.tracker.log_params({"derived": derived})

    # optimizer and resume
    policy.train()
    optimizer = adamw(policy, cfg, device)
    ck = resume(ctx, policy, optimizer, device, order=order)
    step, curve = ck.get("step", 0), ck.get("curve", [])

    # the loop: evaluate, stop or take one step, checkpoint
    clock = Clock(ck.get("elapsed_s", 0.0))
    ev: dict[str, float] = {}
    sums: dict[str, float] = {}
    n_log, run_pairs = 0, 0
    while True:
        last = step >= cfg.max_steps or clock.over(cfg.max_minutes)
        if step % cfg.eval_every == 0 or last:
            with clock.paused():
                ev, scores = evaluate_pairs(policy, val, val_ref_c, val_ref_r, cfg, tok.pad_id, device, autocast)
                ctx.tracker.log_metrics({f"val/{k}": v for k, v in ev.items()}, step=step)
                curve.append({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
        if last:
            break

        lr = set_lr(optimizer, cfg, step, cfg.max_steps)
        batch = [train[i] for i in order.next()]
        with torch.no_grad(), autocast:
            ref_c, ref_r, _ = pair_logps(ref, batch, tok.pad_id, device)
        with autocast:
            pc, pr, n_chosen = pair_logps(policy, batch, tok.pad_id, device)
        losses, rc, rr = dpo_loss(pc.float(), pr.float(), ref_c.float(), ref_r.float(), cfg.beta, cfg.label_smoothing)
        nll = -pc.float().sum() / n_chosen.sum().clamp(min=1)  # mean NLL per chosen response token
        loss = losses.mean() + cfg.rpo_alpha * nll
        loss.backward()
        grad_norm = clip_gradients(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        run_pairs += len(batch)
        stats = {"loss": loss.item(), "dpo_loss": losses.mean().item(), "nll": nll.item(),
                 "rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
                 "rewards/margins": (rc - rr).mean().item(), "rewards/accuracies": sum(pair_scores(rc - rr)) / len(batch),
                 "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        n_log += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = {f"train/{k}": v / n_log for k, v in sums.items()} | {
                "train/lr": lr, "train/grad_norm": grad_norm.item(), "train/samples_per_s": clock.lap(2 * n_log * cfg.batch_size)}
            ctx.tracker.log_metrics(metrics, step=step)
            ctx.progress(step, cfg.max_steps, "dpo", loss=metrics["train/loss"], margin=metrics["train/rewards/margins"])
            sums, n_log = {}, 0
        checkpoint(ctx, step, policy, optimizer, cfg, clock, order=order, curve=curve)

    # save: a final checkpoint, the held-out accuracy, then the artifact
    checkpoint(ctx, step, policy, optimizer, cfg, clock, final=True, order=order, curve=curve)
    acc = evaluate_prompts(policy, tok, prompts, cfg.max_new_tokens) if prompts else {}
    stop = stopped_by(step, cfg.max_steps)
    versus = {"chance": compare(val, scores["pref"], {"chance": [0.5] * len(val)}),
              "reference": compare(val, scores["logp"], {"reference": scores["ref_logp"]})}
    result = summarize(cfg, derived, step, stop, ev, acc, sft_acc, curve, versus)
    result.metrics["samples_per_s"] = clock.rate(2 * run_pairs)  # training time only
    out = save_model_dir(policy, sft_dir, ctx.output("dpo"))
    write_run_meta(out, "dpo", step, cfg.max_steps, stop, result.metrics, derived, cfg, curve,
                   heldout={"key": heldout_key(prompts, cfg.max_new_tokens), "acc": acc, "sft_acc": sft_acc})
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

"""Reward model: the SFT backbone + a scalar head, trained on preference pairs (Bradley-Terry).

What: reads `sft` (a model directory) and `prefs` (Parquet, schema prefs), trains
`models.heads.RewardModel` (the SFT transformer + nn.Linear(d_model, 1) on the hidden state of the last
token of the templated conversation, plus a learned multiple of the backbone's mean log-likelihood of
the response: see models/heads.py for why) and writes `reward_model`: the backbone (config.json +
model.safetensors), head.safetensors, the tokenizer files and meta.json. Later stages and evaluation
score any (prompt, response) with `models.heads.score` / `score_batch`.

Loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1), per pair:

    L = -log sigma(r(x, y_chosen) - r(x, y_rejected))

With `lm_coef` > 0 the loss also has the chosen replies' language-modelling term,
L += -lm_coef * mean_t log p(y_chosen_t | x, y_<t), so the backbone keeps writing (and learns to
write) correct replies while the pair loss moves it: without it, the likelihood that ranks the pairs
at the start drifts (the "likelihood displacement" of DPO-style objectives; Razin et al. 2024).

Metric: pairwise accuracy on the val prefs split, the fraction of pairs with r_chosen > r_rejected, a
tie counting half (so chance, a reward that cannot tell the replies apart, is 0.5); overall, per task
and per kind of rejected reply ("near_miss", "slip": stages/instruct.py). Beside it the untrained
prior: the same pairs scored by the model before its first step, which is the SFT model's own mean
log-likelihood of the reply (the zero head plus the likelihood term), already well above chance. The
gain over it, with a 95% interval over the per-pair differences, is what training added.

Deviations: InstructGPT compares all K-choose-2 pairs of K ranked answers in one batch; our data has
one pair per prompt. The LM head is kept in the saved directory (unused by the reward) so the
backbone stays a loadable GPT. No reward centring term (TRL's `center_rewards_coefficient`): GRPO
normalises rewards within each group, so an offset does not matter downstream.

Run:
    python -m stages.reward --config c.json --inputs i.json --run-dir DIR
    with i.json = {"sft": "SFT_DIR", "prefs": "PREFS_DIR"}
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models.heads import RewardModel
from models.hf_export import save_model_dir
from stages.chat.preference import (
    BatchOrder, Pair, accuracy_by_kind, accuracy_by_task, compare, compare_markdown, pad_right, pair_scores, train_val_pairs,
)
from stages.contract import StageContext, StageResult, main
from stages.training import (
    Clock, TrainConfig, adamw, budget_warnings, checkpoint, clip_gradients, open_model_input, resume,
    set_lr, setup_runtime, stopped_by, write_run_meta,
)
from storage.artifacts import Artifact

INPUTS = ("sft", "prefs")
OUTPUTS = ("reward_model",)
GPU = True


@dataclass(frozen=True)
class Config(TrainConfig):
    batch_size: int = 16  # pairs per step (2 * batch_size sequences)
    # the policy's knobs (stages/training.TrainConfig: warmup, then a constant lr), with the reward model's defaults
    lr: float = 3e-5  # small: the likelihood term starts at ~0.94 pair accuracy; 3e-4 lost 4 points of it in 220 steps
    max_steps: int = 300
    max_len: int = 0  # tokens per sequence; 0 = the backbone's max_seq_len; longer pairs are dropped
    eval_every: int = 100
    eval_pairs: int = 512  # held-out pairs per evaluation (all when fewer)
    train_backbone: bool = True  # false: only the head and the likelihood term's weight learn; the prior's likelihood stays
    lm_coef: float = 0.0  # weight of the chosen replies' language-modelling loss beside Bradley-Terry (see below)
    train_kinds: tuple[str, ...] = ()  # kinds of prefs pairs trained on ("near_miss", "slip"); () = all; val measures all

    def validate(self) -> None:
        for name in ("batch_size", "max_steps", "eval_every", "eval_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lm_coef < 0:
            raise ValueError(f"lm_coef must be >= 0, got {self.lm_coef}")
        if self.max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {self.max_len}")
        TrainConfig.validate(self)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) rewards -> (B,) losses -log sigma(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def pair_rewards(model: RewardModel, pairs: list[Pair], pad_id: int, device: torch.device,
                 with_loglik: bool = False) -> Any:
    """Rewards of the chosen and the rejected sequences, (B,) each, from one right-padded batch of 2B;
    with_loglik: and the chosen and the rejected replies' mean log-likelihoods, (B,) each."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids = pad_right(seqs, pad_id, device)  # (2B, T)
    mask = ids.new_zeros(ids.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, :len(s)] = True
    response = pad_right([p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs], False, device, torch.bool)
    r, loglik = model(ids, mask, response, with_loglik=True)  # (2B,), (2B,)
    if with_loglik:
        return r[:len(pairs)], r[len(pairs):], loglik[:len(pairs)], loglik[len(pairs):]
    return r[:len(pairs)], r[len(pairs):]


@torch.no_grad()
def evaluate(model: RewardModel, pairs: list[Pair], batch_size: int, pad_id: int, device: torch.device,
             autocast: contextlib.AbstractContextManager) -> tuple[dict[str, float], list[float]]:
    """Pairwise accuracy, a tie counting half (overall, per task "pair_acc/<task>" and per kind
    "pair_acc/<kind>"), mean Bradley-Terry loss and mean margin over `pairs`; and each pair's score."""
    model.eval()
    scores: list[float] = []
    loss, margin = 0.0, 0.0
    for i in range(0, len(pairs), batch_size):
        with autocast:
            rc, rr = pair_rewards(model, pairs[i:i + batch_size], pad_id, device)
        scores += pair_scores(rc - rr)
        loss += bradley_terry_loss(rc, rr).sum().item()
        margin += (rc - rr).sum().item()
    model.train()
    n = max(1, len(pairs))
    return {"pair_acc": sum(scores) / n, "loss": loss / n, "margin": margin / n,
            **accuracy_by_task(pairs, scores, "pair_acc"), **accuracy_by_kind(pairs, scores, "pair_acc")}, scores


def summarize(cfg: Config, derived: dict[str, Any], step: int, stop: str, ev: dict[str, float],
              curve: list[dict[str, Any]], versus_prior: list[dict[str, Any]] | None = None) -> StageResult:
    """Headline metrics (val_pair_acc overall, per task and per kind; the untrained prior's from the
    step-0 evaluation; with `versus_prior`, compare's rows against it, 95% half-widths and the paired
    gain), the summary and the eval curve."""
    groups = {k: v for k, v in ev.items() if k.startswith("pair_acc/")}
    prior = {k.removeprefix("val_"): v for k, v in (curve[0] if curve and curve[0]["step"] == 0 else {}).items()
             if k.startswith("val_pair_acc")}
    metrics = {"val_pair_acc": ev["pair_acc"], "val_loss": ev["loss"], "val_margin": ev["margin"], "steps": float(step),
               **{f"val_{k}": v for k, v in groups.items()}, **{f"val_prior_{k}": v for k, v in prior.items()}}
    for row in versus_prior or []:
        if "/" not in row["pairs"]:  # all, and each kind
            at = "" if row["pairs"] == "all" else f"/{row['pairs']}"
            metrics |= {f"val_pair_acc_ci95{at}": row["ci95"], f"val_pair_gain{at}": row["gain_over_prior"],
                        f"val_pair_gain_ci95{at}": row["gain_over_prior_ci95"]}
    summary = (
        f"Reward model: {step} of {cfg.max_steps} steps ({stop}) on {derived['train_pairs']} pairs; val pairwise "
        f"accuracy {ev['pair_acc']:.3f} on {derived['val_pairs']} pairs (a tie counts half; untrained prior "
        f"{prior.get('pair_acc', float('nan')):.3f}; loss {ev['loss']:.4f}, mean margin {ev['margin']:.3f})"
        + "".join(f"; {k.removeprefix('pair_acc/')} {v:.3f}" for k, v in groups.items()) + ".\n"
        + ("\n" + compare_markdown(versus_prior, "trained", {"prior": "untrained prior"}) + "\n" if versus_prior else "")
    )
    return StageResult(outputs={"reward_model": {"val_pair_acc": ev["pair_acc"], "steps": step}}, metrics=metrics,
                       summary=summary, tables={"eval_curve": curve, "versus_prior": versus_prior or []},
                       warnings=budget_warnings("reward", stop, step, cfg.max_steps, cfg.max_minutes))


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup
    rt = setup_runtime(ctx, seed=False)
    device, autocast = rt.device, rt.autocast
    sft_dir, tok, backbone = open_model_input(inputs, "sft", "reward")
    max_len = cfg.max_len or backbone.cfg.max_seq_len

    # data
    train, val, dropped = train_val_pairs(inputs["prefs"].path, tok, max_len, cfg.batch_size, cfg.eval_pairs, "reward",
                                          cfg.train_kinds)
    order = BatchOrder(len(train), cfg.batch_size, ctx.seed)

    # model and optimizer
    torch.manual_seed(ctx.seed)
    model = RewardModel(backbone).to(device)
    model.backbone.requires_grad_(cfg.train_backbone)
    model.train()
    optimizer = adamw(model, cfg, device)
    derived = {"train_pairs": len(train), "val_pairs": len(val), "dropped_too_long": dropped,
               "max_len": max_len, "epochs_planned": cfg.max_steps * cfg.batch_size / len(train), "params": model.backbone.num_params()}
    ctx.logger.info("reward: %s", json.dumps(derived))
    ctx.tracker.log_params({"derived": derived})

    # resume
    ck = resume(ctx, model, optimizer, device, order=order)
    step, curve, prior = ck.get("step", 0), ck.get("curve", []), ck.get("prior", [])  # prior: step 0's pair scores

    # the loop: evaluate, stop or take one step, checkpoint
    clock = Clock(ck.get("elapsed_s", 0.0))
    ev: dict[str, float] = {}
    loss_sum, acc_sum, n_log, run_pairs = 0.0, 0.0, 0, 0
    while True:
        last = step >= cfg.max_steps or clock.over(cfg.max_minutes)
        if step % cfg.eval_every == 0 or last:
            with clock.paused():
                ev, scores = evaluate(model, val, cfg.batch_size, tok.pad_id, device, autocast)
                prior = prior or scores
                ctx.tracker.log_metrics({f"val/{k}": v for k, v in ev.items()}, step=step)
                curve.append({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
        if last:
            break

        lr = set_lr(optimizer, cfg, step, cfg.max_steps)
        batch = [train[i] for i in order.next()]
        with autocast:
            rc, rr, loglik, _ = pair_rewards(model, batch, tok.pad_id, device, with_loglik=True)
        loss = bradley_terry_loss(rc, rr).mean() - cfg.lm_coef * loglik.mean()
        loss.backward()
        grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum += loss.item()
        acc_sum += sum(pair_scores(rc - rr)) / len(batch)
        n_log += 1
        run_pairs += len(batch)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = {"train/loss": loss_sum / n_log, "train/pair_acc": acc_sum / n_log, "train/lr": lr,
                       "train/grad_norm": grad_norm.item(), "train/samples_per_s": clock.lap(2 * n_log * cfg.batch_size)}
            ctx.tracker.log_metrics(metrics, step=step)
            ctx.progress(step, cfg.max_steps, "reward", loss=metrics["train/loss"], acc=metrics["train/pair_acc"])
            loss_sum, acc_sum, n_log = 0.0, 0.0, 0
        checkpoint(ctx, step, model, optimizer, cfg, clock, order=order, curve=curve, prior=prior)

    # save: a final checkpoint, then the artifact
    checkpoint(ctx, step, model, optimizer, cfg, clock, final=True, order=order, curve=curve, prior=prior)
    stop = stopped_by(step, cfg.max_steps)
    result = summarize(cfg, derived, step, stop, ev, curve, compare(val, scores, {"prior": prior}))
    result.metrics["samples_per_s"] = clock.rate(2 * run_pairs)  # training time only
    out = save_model_dir(model, sft_dir, ctx.output("reward_model"), hf=False)
    write_run_meta(out, "reward", step, cfg.max_steps, stop, result.metrics, derived, cfg, curve, val=ev)
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

"""GRPO: reinforcement learning from verifiable rewards on the DPO model (the final chat model).

What: reads `dpo` (model directory), `prompts` (prompts with reference answers and a verifier), `sft`
(scored on the held-out prompts unless the DPO stage recorded it) and, only with rm_weight > 0,
`reward_model` (see inputs()); samples G completions per train prompt, scores them, and updates the policy with Group
Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", section 4.1). Writes `grpo`: a model
directory (model.safetensors + config.json, tokenizer files, meta.json, hf/ export).

One step, for B prompts x G samples:
1. Generate: the KV-cache generator (models/generate.py), one left-padded batch of B*G rows, sampling at
   `temperature`, stopped at <|im_end|> or after max_new_tokens.
2. Reward: r = correct + format_weight * well_formed + rm_weight * RM(x, y), where correct is the row's
   verifier (stages/chat/verifiers.py) on the decoded completion, well_formed means the completion is
   non-empty and ended with <|im_end|> (not cut off), and RM is the reward model (models/heads.py; only
   loaded when rm_weight > 0; it is 0 by default because the verifier is the ground truth here).
3. Advantages, per group of G: A_i = (r_i - mean(r)) / (std(r) + eps), shared by every token of sample i.
4. Loss, per completion token t, with ratio rho = pi(t) / pi_old(t) and the k3 KL estimator
   (Schulman 2020) to the reference pi_ref (the input DPO model, frozen):
       kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
       l_t  = -[min(rho A, clip(rho, 1 - eps_clip, 1 + eps_clip) A) - beta kl_t]
   L = sum over all completion tokens of the batch of l_t / number of those tokens.
5. mu optimisation iterations on the same samples (pi_old = the policy that generated them). With
   mu = 1 (the default) pi_old = pi numerically, so rho = 1, nothing is clipped, and the update is the
   plain policy gradient of A with the KL term.

Deviations from DeepSeekMath GRPO:
- Token-level normalisation (DAPO, Yu et al. 2025): the loss is averaged over all completion tokens of
  the batch, not per sequence and then over the group (the paper's 1/G sum_i 1/|o_i| sum_t), so long
  completions are not down-weighted.
- Rewards come from rule-based verifiers plus a small format bonus (outcome supervision only), not
  from a learned reward model; the reward model can be mixed in with rm_weight.
- std is the unbiased group standard deviation (TRL's choice). Groups where every sample got the same
  reward have zero advantage; with drop_uniform_groups (the default) they are left out of the update
  (DAPO's dynamic sampling without the resampling: the batch shrinks instead), which saves their
  forward and backward passes and keeps their KL-only gradient from diluting the others; the share
  kept is logged as groups_used. A step where no group is left takes no update.
- `tasks` restricts training to some tasks' prompts (a task the model never gets right gives only
  uniform groups); held-out accuracy still covers every task.
- The reference model stays the input model for the whole run (the paper's iterative GRPO resets the
  reference and retrains the reward model every iteration).
- mu defaults to 1 (the paper uses 1 as well in its main run); the clipped objective is implemented for mu > 1.

Train prompts are the `prompts` train split; for generated tasks those are problems SFT never saw
(stages/instruct.py, rl_per_task). What it buys at tiny scale, measured: GRPO mostly sharpens
sampling toward what greedy decoding already answers. Over 300 steps at lr 5e-5 (7x the tiny
budget) the sampled accuracy rose 0.64 -> 0.91 while held-out greedy accuracy rose 0.751 -> 0.780
in the first 50 steps and 0.795 after 300 (SFT: 0.766), an eighth of SFT's error; the SFT model's
pass@8 (string 0.81 against greedy 0.77) bounds what sharpening alone can reach. lr 2e-4 lowered the
sampled accuracy.

Held-out: acc/<task> on the val prompts (greedy, stages/chat/evaluate.py) at the end,
start_acc/<task>, the input (DPO) model's accuracy on the same prompts, and sft_acc/<task>, the SFT
model's: the number GRPO has to improve on. The last two are read from the DPO model's meta.json
when the DPO stage measured them on the same prompts with the same answer length (same key), and
measured here otherwise. The step's time is split into
gen_seconds (sampling) and train_seconds (log-probs, loss, update).

Run:
    python -m stages.grpo --config c.json --inputs i.json --run-dir DIR
    with i.json = {"dpo": "DPO_DIR", "prompts": "PROMPTS_DIR", "sft": "SFT_DIR"} (+ "reward_model": "RM_DIR" when rm_weight > 0)
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from models.generate import generate
from models.gpt import GPT
from models.heads import RewardModel, score_batch
from models.hf_export import save_model_dir
from models.tokenizer import Tokenizer
from stages.chat.evaluate import accuracy_table, evaluate_prompts, heldout_key, pick_heldout, prompt_ids, recorded_eval
from stages.chat.preference import BatchOrder, pad_right, response_mask, token_logps
from stages.chat.verifiers import VERIFIERS, verify
from stages.contract import StageContext, StageError, StageResult, main
from stages.training import (
    Clock, TrainConfig, adamw, budget_warnings, checkpoint, clip_gradients, open_model_input, resume,
    set_lr, setup_runtime, stopped_by, write_run_meta,
)
from storage.artifacts import Artifact
from storage.parquet import iter_rows

INPUTS = ("dpo", "prompts", "reward_model", "sft")
OUTPUTS = ("grpo",)
GPU = True


@dataclass(frozen=True)
class Config(TrainConfig):
    prompts_per_step: int = 16  # B
    group_size: int = 8  # G samples per prompt
    temperature: float = 1.0
    max_new_tokens: int = 96  # room for a worked two-step word problem; a cut-off completion gets no format bonus
    # the policy's knobs (stages/training.TrainConfig: warmup, then a constant lr), with GRPO's defaults
    lr: float = 1e-4
    warmup_steps: int = 5
    max_steps: int = 40
    max_minutes: float = 20.0
    log_every: int = 1
    ckpt_every: int = 10
    beta: float = 0.04  # KL coefficient (DeepSeekMath)
    clip_eps: float = 0.2
    mu: int = 1  # optimisation iterations per generated batch
    adv_eps: float = 1e-4
    format_weight: float = 0.1
    rm_weight: float = 0.0
    tasks: tuple[str, ...] = ()  # train on the prompts of these tasks only (held-out accuracy still covers all); () = all
    drop_uniform_groups: bool = True  # leave groups whose samples all got the same reward out of the update
    eval_per_task: int = 100  # held-out prompts per task for acc/<task> (as sft chooses them)
    eval_new_tokens: int = 96

    def validate(self) -> None:
        for name in ("prompts_per_step", "max_new_tokens", "mu", "max_steps", "eval_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        TrainConfig.validate(self)
        if self.beta < 0 or self.clip_eps <= 0 or self.rm_weight < 0 or self.format_weight < 0 or self.eval_per_task < 0:
            raise ValueError("beta, rm_weight, format_weight, eval_per_task must be >= 0 and clip_eps > 0")


def inputs(cfg: Config) -> tuple[str, ...]:
    """The reward model is read only when its score is part of the reward (rm_weight > 0); otherwise
    it is not an input, so retraining it does not rebuild GRPO."""
    return INPUTS if cfg.rm_weight > 0 else tuple(i for i in INPUTS if i != "reward_model")


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(B, G) rewards -> (B, G) advantages (r - mean_g) / (std_g + eps), std unbiased over the group."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO objective with the k3 KL penalty, normalised over all completion tokens.

    logps, old_logps, ref_logps: (N, T) per-token log-probs of the sampled tokens under the policy
    (with grad), the sampling policy and the reference; advantages (N,); mask (N, T) bool, completion
    tokens. Returns the scalar loss and detached stats: kl (mean per token), clip_frac (share of tokens
    where the clipped term was the smaller one).
    """
    adv = advantages[:, None]  # (N, 1)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    surrogate = torch.minimum(unclipped, clipped)
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1.0  # k3: unbiased, always >= 0
    per_token = -(surrogate - beta * kl)
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    loss = (per_token * m).sum() / n
    stats = {"kl": ((kl * m).sum() / n).detach(), "clip_frac": (((clipped < unclipped).float() * m).sum() / n).detach()}
    return loss, stats


def train_prompts(path: str, tasks: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Train prompts whose verifier is known (others are unusable for a verifiable reward), of `tasks`
    when given."""
    return [r for r in iter_rows(path) if r["split"] == "train" and r["verifier"] in VERIFIERS and r["answer"]
            and (not tasks or r["task"] in tasks)]


def rollout_rewards(tok: Tokenizer, rows: list[dict[str, Any]], completions: list[list[int]], cfg: Config,
                    rm: RewardModel | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total reward, correctness and well-formedness of each completion (N,) each; rows[i] is completion i's prompt."""
    texts = [tok.decode(c, skip_special_tokens=True).strip() for c in completions]
    correct = torch.tensor([float(verify(r["verifier"], t, r["answer"])) for r, t in zip(rows, texts)])
    # generate() drops the stop token: a completion shorter than max_new_tokens stopped at <|im_end|>
    well_formed = torch.tensor([float(0 < len(c) < cfg.max_new_tokens) for c in completions])
    reward = correct + cfg.format_weight * well_formed
    if rm is not None:
        reward = reward + cfg.rm_weight * torch.tensor(score_batch(rm, tok, [r["prompt"] for r in rows], texts))
    return reward, correct, well_formed


def policy_update(policy: GPT, ref: GPT, optimizer: torch.optim.Optimizer, tok: Tokenizer, prompts: list[list[int]],
                  completions: list[list[int]], reward: torch.Tensor, cfg: Config, device: torch.device,
                  autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Advantages of one rollout batch (B*G,) grouped by prompt, then mu clipped-GRPO updates on it.

    The training sequence of a sample is prompt + completion (+ <|im_end|> when it stopped). Groups
    whose samples all got the same reward (zero advantage) are left out with drop_uniform_groups; a
    batch with none left takes no update. Returns the step's loss, kl, clip_frac, grad_norm and the
    share of samples used.
    """
    G = cfg.group_size
    adv = grpo_advantages(reward.view(-1, G), cfg.adv_eps).view(-1).to(device)  # (B*G,)
    keep = torch.ones(len(prompts), dtype=torch.bool)
    if cfg.drop_uniform_groups:
        keep = (reward.view(-1, G).std(dim=1) > 0).repeat_interleave(G)
    out = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "groups_used": keep.float().mean().item()}
    if not keep.any():
        return out
    kept = keep.nonzero().view(-1).tolist()
    adv = adv[keep.to(device)]
    seqs = [prompts[i] + completions[i] + ([tok.im_end_id] if len(completions[i]) < cfg.max_new_tokens else []) for i in kept]
    ids = pad_right(seqs, tok.pad_id, device)  # (N, T)
    mask = response_mask([len(prompts[i]) for i in kept], [len(s) for s in seqs], ids.shape[1], device)  # (N, T-1)
    with torch.no_grad(), autocast:
        ref_logps = token_logps(ref, ids, mask)
        old_logps = token_logps(policy, ids, mask) if cfg.mu > 1 else None
    for _ in range(cfg.mu):
        with autocast:
            logps = token_logps(policy, ids, mask)  # (N, T-1), 0 off the mask
        loss, stats = grpo_loss(logps, logps.detach() if old_logps is None else old_logps, ref_logps, adv, mask,
                                cfg.clip_eps, cfg.beta)
        loss.backward()
        grad_norm = clip_gradients(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {**out, "loss": loss.item(), "kl": stats["kl"].item(), "clip_frac": stats["clip_frac"].item(),
            "grad_norm": grad_norm.item()}


def summarize(cfg: Config, derived: dict[str, Any], step: int, stop: str, acc: dict[str, float], start_acc: dict[str, float],
              sft_acc: dict[str, float], curve: list[dict[str, Any]], gen_total: float, train_total: float) -> StageResult:
    """Headline metrics (held-out acc/<task> beside the start and SFT models'), the table and summary."""
    def mean_of(points: list[dict[str, float]], key: str) -> float:
        return sum(p[key] for p in points) / len(points) if points else float("nan")

    metrics = {**acc, **{f"start_{k}": v for k, v in start_acc.items()}, **{f"sft_{k}": v for k, v in sft_acc.items()},
               "steps": float(step), "gen_seconds": gen_total, "train_seconds": train_total,
               "reward_first5": mean_of(curve[:5], "reward/mean"), "reward_last5": mean_of(curve[-5:], "reward/mean")}
    table, md = accuracy_table({"sft_acc": sft_acc, "start_acc": start_acc, "grpo_acc": acc})
    summary = (
        f"GRPO: {step} of {cfg.max_steps} steps ({stop}), {cfg.prompts_per_step} prompts x {cfg.group_size} samples per "
        f"step; train reward {metrics['reward_first5']:.3f} (first 5 steps) -> {metrics['reward_last5']:.3f} (last 5); "
        f"time {gen_total:.1f} s generating, {train_total:.1f} s training.\n\n" + md
    )
    return StageResult(outputs={"grpo": {"steps": step, "acc": acc.get("acc", float("nan"))}}, metrics=metrics,
                       summary=summary, tables={"train_curve": curve, "heldout_accuracy": table},
                       warnings=budget_warnings("grpo", stop, step, cfg.max_steps, cfg.max_minutes))


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup
    rt = setup_runtime(ctx, seed=False)
    device, autocast = rt.device, rt.autocast
    src_dir, tok, policy = open_model_input(inputs, "dpo", "grpo", device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = RewardModel.from_pretrained(inputs["reward_model"].path, device=device).eval() if cfg.rm_weight > 0 else None

    # data
    train = train_prompts(inputs["prompts"].path, cfg.tasks)
    if len(train) < cfg.prompts_per_step:
        raise StageError(f"grpo: {inputs['prompts'].path} has {len(train)} train prompts with a known verifier "
                         f"({', '.join(VERIFIERS)}){f' of tasks {list(cfg.tasks)}' if cfg.tasks else ''}; "
                         f"need at least prompts_per_step={cfg.prompts_per_step}")
    val = [r for r in pick_heldout(iter_rows(inputs["prompts"].path), cfg.eval_per_task) if r["verifier"] in VERIFIERS]
    train_ids = [prompt_ids(tok, r["prompt"]) for r in train]
    order = BatchOrder(len(train), cfg.prompts_per_step, ctx.seed)
    key = heldout_key(val, cfg.eval_new_tokens)
    start_acc: dict[str, float] = {}
    sft_acc: dict[str, float] = {}
    if val:
        recorded = recorded_eval(src_dir / "meta.json", key)  # the DPO stage scored both models on these prompts
        if recorded is not None:
            start_acc, sft_acc = recorded["acc"], recorded["sft_acc"]
        else:
            start_acc = evaluate_prompts(ref, tok, val, cfg.eval_new_tokens)
            sft_acc = evaluate_prompts(open_model_input(inputs, "sft", "grpo", device)[2].eval(), tok, val, cfg.eval_new_tokens)
    derived = {"train_prompts": len(train), "val_prompts": len(val), "samples_per_step": cfg.prompts_per_step * cfg.group_size,
               "epochs_planned": cfg.max_steps * cfg.prompts_per_step / len(train)}
    ctx.logger.info("grpo: %s; start held-out accuracy %s", json.dumps(derived), json.dumps(start_acc))
    ctx.tracker.log_params({"derived": derived})

    # optimizer and resume
    policy.train()
    optimizer = adamw(policy, cfg, device)
    ck = resume(ctx, policy, optimizer, device, order=order)
    step, gen_total, train_total = ck.get("step", 0), ck.get("gen_seconds", 0.0), ck.get("train_seconds", 0.0)
    curve: list[dict[str, float]] = ck.get("curve", [])  # one point per step, kept in the checkpoints

    # the loop: sample, reward, mu updates, checkpoint
    clock = Clock(ck.get("elapsed_s", 0.0))
    G = cfg.group_size
    while not (step >= cfg.max_steps or clock.over(cfg.max_minutes)):
        lr = set_lr(optimizer, cfg, step, cfg.max_steps)
        # 1. generate B*G completions; the sampler's seed depends on (seed, step) only, so a resumed run samples the same
        t0 = time.perf_counter()
        idx = order.next()
        rows = [train[i] for i in idx for _ in range(G)]  # (B*G,) grouped by prompt
        prompts = [train_ids[i] for i in idx for _ in range(G)]
        gen = torch.Generator(device=device).manual_seed(ctx.seed * 1_000_003 + step)
        policy.eval()
        with autocast:
            completions = generate(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature,
                                   stop_ids=(tok.im_end_id,), pad_id=tok.pad_id, generator=gen)
        policy.train()
        reward, correct, well_formed = rollout_rewards(tok, rows, completions, cfg, rm)
        gen_s = time.perf_counter() - t0

        # 2. advantages and mu updates on the same samples
        t0 = time.perf_counter()
        upd = policy_update(policy, ref, optimizer, tok, prompts, completions, reward, cfg, device, autocast)
        step += 1
        train_s = time.perf_counter() - t0
        gen_total += gen_s
        train_total += train_s

        point = {"reward/mean": reward.mean().item(), "reward/std": reward.view(-1, G).std(dim=1).mean().item(),
                 "accuracy": correct.mean().item(), "format": well_formed.mean().item(), **upd,
                 "completion_len": sum(len(c) for c in completions) / len(completions), "lr": lr,
                 "gen_seconds": gen_s, "train_seconds": train_s, "samples_per_s": clock.lap(len(completions))}
        curve.append({"step": step, **point})
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            ctx.tracker.log_metrics({f"train/{k}": v for k, v in point.items()}, step=step)
            ctx.progress(step, cfg.max_steps, "grpo", reward=point["reward/mean"], acc=point["accuracy"])
        checkpoint(ctx, step, policy, optimizer, cfg, clock, order=order, curve=curve, gen_seconds=gen_total,
                   train_seconds=train_total)

    # save: a final checkpoint, the held-out accuracy, then the artifact
    checkpoint(ctx, step, policy, optimizer, cfg, clock, final=True, order=order, curve=curve, gen_seconds=gen_total,
               train_seconds=train_total)
    acc = evaluate_prompts(policy, tok, val, cfg.eval_new_tokens) if val else {}
    stop = stopped_by(step, cfg.max_steps)
    result = summarize(cfg, derived, step, stop, acc, start_acc, sft_acc, curve, gen_total, train_total)
    out = save_model_dir(policy, src_dir, ctx.output("grpo"))
    write_run_meta(out, "grpo", step, cfg.max_steps, stop, result.metrics, derived, cfg, curve,
                   heldout={"key": key, "acc": acc, "sft_acc": sft_acc})
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

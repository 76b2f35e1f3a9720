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
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from models.generate import generate
from models.gpt import GPT
from models.heads import RewardModel, score_batch
from models.hf_export import save_model_dir
from models.tokenizer import Tokenizer
from stages.chat.evaluate import evaluate_prompts, heldout_key, pick_heldout, prompt_ids, recorded_eval
from stages.chat.preference import BatchOrder, open_model_input, pad_right, response_mask, token_logps
from stages.chat.verifiers import VERIFIERS, verify
from stages.contract import StageContext, StageError, StageResult, main
from storage import checkpoints
from storage.artifacts import Artifact
from storage.parquet import iter_rows

INPUTS = ("dpo", "prompts", "reward_model", "sft")
OUTPUTS = ("grpo",)
GPU = True


@dataclass(frozen=True)
class Config:
    prompts_per_step: int = 16  # B
    group_size: int = 8  # G samples per prompt
    temperature: float = 1.0
    max_new_tokens: int = 96  # room for a worked two-step word problem; a cut-off completion gets no format bonus
    lr: float = 1e-4
    warmup_steps: int = 5  # linear warmup, then constant
    beta: float = 0.04  # KL coefficient (DeepSeekMath)
    clip_eps: float = 0.2
    mu: int = 1  # optimisation iterations per generated batch
    adv_eps: float = 1e-4
    format_weight: float = 0.1
    rm_weight: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 40
    max_minutes: float = 2.0  # wall-clock guard: stops early, still evaluates and saves
    log_every: int = 1
    ckpt_every: int = 10
    keep_checkpoints: int = 2
    tasks: tuple[str, ...] = ()  # train on the prompts of these tasks only (held-out accuracy still covers all); () = all
    drop_uniform_groups: bool = True  # leave groups whose samples all got the same reward out of the update
    eval_per_task: int = 100  # held-out prompts per task for acc/<task> (as sft chooses them)
    eval_new_tokens: int = 96

    def validate(self) -> None:
        for name in ("prompts_per_step", "max_new_tokens", "mu", "max_steps", "log_every", "ckpt_every",
                     "keep_checkpoints", "eval_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), got {self.group_size}")
        if self.temperature <= 0 or self.lr <= 0 or self.max_minutes <= 0:
            raise ValueError("temperature, lr and max_minutes must be > 0")
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


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    log = ctx.logger
    # setup
    device = torch.device(ctx.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
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
            sft_acc = evaluate_prompts(GPT.from_pretrained(inputs["sft"].path, device=device).eval(), tok, val,
                                       cfg.eval_new_tokens)
    derived = {"train_prompts": len(train), "val_prompts": len(val), "samples_per_step": cfg.prompts_per_step * cfg.group_size,
               "epochs_planned": cfg.max_steps * cfg.prompts_per_step / len(train)}
    log.info("grpo: %s; start held-out accuracy %s", json.dumps(derived), json.dumps(start_acc))
    ctx.tracker.log_params({"derived": derived})

    # optimizer and resume
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    step, elapsed_s, gen_total, train_total = 0, 0.0, 0.0, 0.0
    curve: list[dict[str, float]] = []  # one point per step, kept in the checkpoints
    resumed = checkpoints.resume(ctx.checkpoint_dir, policy, optimizer, map_location=str(device))
    if resumed is not None:
        found, meta = resumed
        order.load_state_dict(meta["order"])
        step, elapsed_s = meta["step"], meta["elapsed_s"]
        gen_total, train_total, curve = meta["gen_seconds"], meta["train_seconds"], meta["curve"]
        log.info("grpo: resumed from %s at step %d", found, step)

    def save_checkpoint() -> None:
        checkpoints.save(ctx.checkpoint_dir, step, policy.state_dict(), optimizer.state_dict(),
                         {"order": order.state_dict(), "elapsed_s": elapsed_s, "gen_seconds": gen_total,
                          "train_seconds": train_total, "curve": curve, "config": asdict(cfg)}, keep=cfg.keep_checkpoints)

    # the loop: sample, reward, mu updates, checkpoint
    stopped_by = "max_steps"
    G = cfg.group_size
    t_start, elapsed_start = time.perf_counter(), elapsed_s
    while True:
        elapsed_s = elapsed_start + time.perf_counter() - t_start
        if step >= cfg.max_steps or elapsed_s > 60 * cfg.max_minutes:
            stopped_by = "max_minutes" if step < cfg.max_steps else stopped_by
            break
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr

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

        # 2. advantages and the training batch: prompt + completion (+ <|im_end|> when it stopped), without the
        #    groups that teach nothing (every sample the same reward: zero advantage) when drop_uniform_groups
        t0 = time.perf_counter()
        adv = grpo_advantages(reward.view(-1, G), cfg.adv_eps).view(-1).to(device)  # (B*G,)
        keep = torch.ones(len(rows), dtype=torch.bool)
        if cfg.drop_uniform_groups:
            keep = (reward.view(-1, G).std(dim=1) > 0).repeat_interleave(G)
        used = keep.float().mean().item()
        stats = {"kl": torch.tensor(0.0), "clip_frac": torch.tensor(0.0)}
        loss, grad_norm = torch.tensor(0.0), torch.tensor(0.0)
        if keep.any():  # else nothing to learn from this batch: the step takes no update
            kept = keep.nonzero().view(-1).tolist()
            adv = adv[keep.to(device)]
            seqs = [prompts[i] + completions[i] + ([tok.im_end_id] if len(completions[i]) < cfg.max_new_tokens else [])
                    for i in kept]
            ids = pad_right(seqs, tok.pad_id, device)  # (N, T)
            mask = response_mask([len(prompts[i]) for i in kept], [len(s) for s in seqs], ids.shape[1], device)  # (N, T-1)
            with torch.no_grad(), autocast:
                ref_logps = token_logps(ref, ids)
                old_logps = token_logps(policy, ids) if cfg.mu > 1 else None

            # 3. mu updates on the same samples
            for _ in range(cfg.mu):
                with autocast:
                    logps = token_logps(policy, ids)  # (N, T-1)
                loss, stats = grpo_loss(logps, logps.detach() if old_logps is None else old_logps, ref_logps, adv, mask,
                                        cfg.clip_eps, cfg.beta)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                           cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        train_s = time.perf_counter() - t0
        gen_total += gen_s
        train_total += train_s

        metrics = {"reward/mean": reward.mean().item(), "reward/std": reward.view(-1, G).std(dim=1).mean().item(),
                   "accuracy": correct.mean().item(), "format": well_formed.mean().item(),
                   "kl": stats["kl"].item(), "clip_frac": stats["clip_frac"].item(), "loss": loss.item(),
                   "completion_len": sum(len(c) for c in completions) / len(completions), "grad_norm": grad_norm.item(),
                   "lr": lr, "gen_seconds": gen_s, "train_seconds": train_s, "groups_used": used}
        curve.append({"step": step, **metrics})
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            ctx.tracker.log_metrics(metrics, step=step)
            ctx.progress(step, cfg.max_steps, "grpo", reward=metrics["reward/mean"], acc=metrics["accuracy"])
        if step % cfg.ckpt_every == 0:
            elapsed_s = elapsed_start + time.perf_counter() - t_start
            save_checkpoint()

    # save: a final checkpoint, the held-out accuracy, then the artifact
    if step % cfg.ckpt_every != 0:
        save_checkpoint()
    acc = evaluate_prompts(policy, tok, val, cfg.eval_new_tokens) if val else {}
    out = save_model_dir(policy, src_dir, ctx.output("grpo"))
    first, last = curve[:5], curve[-5:]

    def mean_of(points: list[dict[str, float]], key: str) -> float:
        return sum(p[key] for p in points) / len(points) if points else float("nan")

    metrics = {**acc, **{f"start_{k}": v for k, v in start_acc.items()}, **{f"sft_{k}": v for k, v in sft_acc.items()},
               "steps": float(step),
               "gen_seconds": gen_total, "train_seconds": train_total,
               "reward_first5": mean_of(first, "reward/mean"), "reward_last5": mean_of(last, "reward/mean")}
    meta = {"steps": step, "stopped_by": stopped_by, "elapsed_s": elapsed_s, "metrics": metrics, "derived": derived,
            "heldout": {"key": key, "acc": acc, "sft_acc": sft_acc}, "config": asdict(cfg), "curve": curve}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    tasks = sorted(k.removeprefix("acc/") for k in acc if k.startswith("acc/"))
    rows = [{"task": t, "sft_acc": sft_acc[f"acc/{t}"], "start_acc": start_acc[f"acc/{t}"], "grpo_acc": acc[f"acc/{t}"]}
            for t in tasks]
    summary = (
        f"GRPO: {step} steps ({stopped_by}), {cfg.prompts_per_step} prompts x {cfg.group_size} samples per step; "
        f"train reward {metrics['reward_first5']:.3f} (first 5 steps) -> {metrics['reward_last5']:.3f} (last 5); "
        f"time {gen_total:.1f} s generating, {train_total:.1f} s training.\n\n"
        + ("| task | SFT acc | DPO acc (start) | GRPO acc |\n|---|---|---|---|\n" + "".join(
            f"| {r['task']} | {r['sft_acc']:.3f} | {r['start_acc']:.3f} | {r['grpo_acc']:.3f} |\n" for r in rows) if rows else "")
    )
    return StageResult(outputs={"grpo": {"steps": step, "acc": acc.get("acc", float("nan"))}}, metrics=metrics,
                       summary=summary, tables={"train_curve": curve, "heldout_accuracy": rows})


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

"""Reward model: the SFT backbone + a scalar head, trained on preference pairs (Bradley-Terry).

What: reads `sft` (a model directory) and `prefs` (Parquet, schema prefs), trains
`models.heads.RewardModel` (the SFT transformer + nn.Linear(d_model, 1) on the hidden state of the last
token of the templated conversation, plus a learned multiple of the backbone's mean log-likelihood of
the response: see models/heads.py for why) and writes `reward_model`: the backbone (config.json +
model.safetensors), head.safetensors, the tokenizer files and meta.json. Later stages and evaluation
score any (prompt, response) with `models.heads.score` / `score_batch`.

Loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1), per pair:

    L = -log sigma(r(x, y_chosen) - r(x, y_rejected))

Metric: pairwise accuracy on the held-out prefs split, the fraction of pairs with r_chosen > r_rejected
(ties count as wrong, so the untrained zero-initialised head scores 0, not 0.5).

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
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from models.heads import RewardModel
from models.hf_export import save_model_dir
from stages.chat.preference import BatchOrder, Pair, accuracy_by_task, open_model_input, pad_right, read_pairs
from stages.contract import StageContext, StageError, StageResult, main
from storage import checkpoints
from storage.artifacts import Artifact

INPUTS = ("sft", "prefs")
OUTPUTS = ("reward_model",)
GPU = True


@dataclass(frozen=True)
class Config:
    batch_size: int = 16  # pairs per step (2 * batch_size sequences)
    lr: float = 3e-5  # small: the likelihood term starts at ~0.94 pair accuracy; 3e-4 lost 4 points of it in 220 steps
    warmup_steps: int = 10  # linear warmup, then constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 300
    max_minutes: float = 3.0  # wall-clock guard: stops early, still evaluates and saves
    max_len: int = 0  # tokens per sequence; 0 = the backbone's max_seq_len; longer pairs are dropped
    log_every: int = 10
    eval_every: int = 100
    eval_pairs: int = 512  # held-out pairs per evaluation (all when fewer)
    ckpt_every: int = 100
    keep_checkpoints: int = 2

    def validate(self) -> None:
        for name in ("batch_size", "max_steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "eval_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.max_minutes <= 0 or self.max_len < 0:
            raise ValueError("lr and max_minutes must be > 0 and max_len >= 0")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) rewards -> (B,) losses -log sigma(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def pair_rewards(model: RewardModel, pairs: list[Pair], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected sequences, (B,) each, from one right-padded batch of 2B."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids = pad_right(seqs, pad_id, device)  # (2B, T)
    mask = ids.new_zeros(ids.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, :len(s)] = True
    response = pad_right([p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs], False, device, torch.bool)
    r = model(ids, mask, response)  # (2B,)
    return r[:len(pairs)], r[len(pairs):]


@torch.no_grad()
def evaluate(model: RewardModel, pairs: list[Pair], batch_size: int, pad_id: int, device: torch.device,
             autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Pairwise accuracy (overall and per task: "pair_acc/<task>"), mean Bradley-Terry loss and mean
    margin over `pairs`."""
    model.eval()
    correct: list[bool] = []
    loss, margin = 0.0, 0.0
    for i in range(0, len(pairs), batch_size):
        with autocast:
            rc, rr = pair_rewards(model, pairs[i:i + batch_size], pad_id, device)
        correct += (rc > rr).tolist()
        loss += bradley_terry_loss(rc, rr).sum().item()
        margin += (rc - rr).sum().item()
    model.train()
    n = max(1, len(pairs))
    return {"pair_acc": sum(correct) / n, "loss": loss / n, "margin": margin / n,
            **accuracy_by_task(pairs, correct, "pair_acc")}


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    log = ctx.logger
    # setup
    device = torch.device(ctx.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    sft_dir, tok, backbone = open_model_input(inputs, "sft", "reward")
    max_len = cfg.max_len or backbone.cfg.max_seq_len

    # data
    train, train_long = read_pairs(inputs["prefs"].path, "train", tok, max_len)
    val, val_long = read_pairs(inputs["prefs"].path, "val", tok, max_len)
    if len(train) < cfg.batch_size or not val:
        raise StageError(f"reward: {inputs['prefs'].path} has {len(train)} train and {len(val)} val pairs within "
                         f"{max_len} tokens; need at least batch_size={cfg.batch_size} train pairs and one val pair")
    val = val[:: max(1, math.ceil(len(val) / cfg.eval_pairs))]  # an evenly spread, fixed subset
    order = BatchOrder(len(train), cfg.batch_size, ctx.seed)

    # model and optimizer
    torch.manual_seed(ctx.seed)
    model = RewardModel(backbone).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    derived = {"train_pairs": len(train), "val_pairs": len(val), "dropped_too_long": train_long + val_long,
               "max_len": max_len, "epochs_planned": cfg.max_steps * cfg.batch_size / len(train), "params": model.backbone.num_params()}
    log.info("reward: %s", json.dumps(derived))
    ctx.tracker.log_params({"derived": derived})

    # resume
    step, elapsed_s = 0, 0.0
    resumed = checkpoints.resume(ctx.checkpoint_dir, model, optimizer, map_location=str(device))
    if resumed is not None:
        found, meta = resumed
        order.load_state_dict(meta["order"])
        step, elapsed_s = meta["step"], meta["elapsed_s"]
        log.info("reward: resumed from %s at step %d", found, step)

    def save_checkpoint() -> None:
        checkpoints.save(ctx.checkpoint_dir, step, model.state_dict(), optimizer.state_dict(),
                         {"order": order.state_dict(), "elapsed_s": elapsed_s, "config": asdict(cfg)},
                         keep=cfg.keep_checkpoints)

    # the loop: evaluate, stop or take one step, checkpoint
    curve: list[dict[str, float]] = []
    ev: dict[str, float] = {}
    loss_sum, acc_sum, n_log = 0.0, 0.0, 0
    stopped_by = "max_steps"
    t_start, elapsed_start = time.perf_counter(), elapsed_s
    while True:
        elapsed_s = elapsed_start + time.perf_counter() - t_start
        out_of_time = elapsed_s > 60 * cfg.max_minutes
        last = step >= cfg.max_steps or out_of_time
        if step % cfg.eval_every == 0 or last:
            ev = evaluate(model, val, cfg.batch_size, tok.pad_id, device, autocast)
            ctx.tracker.log_metrics({f"val/{k}": v for k, v in ev.items()}, step=step)
            curve.append({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
        if last:
            stopped_by = "max_minutes" if step < cfg.max_steps else stopped_by
            break

        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [train[i] for i in order.next()]
        with autocast:
            rc, rr = pair_rewards(model, batch, tok.pad_id, device)
        loss = bradley_terry_loss(rc, rr).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum += loss.item()
        acc_sum += (rc > rr).float().mean().item()
        n_log += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = {"train/loss": loss_sum / n_log, "train/pair_acc": acc_sum / n_log, "train/lr": lr,
                       "train/grad_norm": grad_norm.item()}
            ctx.tracker.log_metrics(metrics, step=step)
            ctx.progress(step, cfg.max_steps, "reward", loss=metrics["train/loss"], acc=metrics["train/pair_acc"])
            loss_sum, acc_sum, n_log = 0.0, 0.0, 0
        if step % cfg.ckpt_every == 0:
            elapsed_s = elapsed_start + time.perf_counter() - t_start
            save_checkpoint()

    # save: a final checkpoint, then the artifact
    if step % cfg.ckpt_every != 0:
        save_checkpoint()
    out = save_model_dir(model, sft_dir, ctx.output("reward_model"), hf=False)
    meta = {"steps": step, "stopped_by": stopped_by, "elapsed_s": elapsed_s, "val": ev, "derived": derived,
            "config": asdict(cfg), "curve": curve}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    metrics = {"val_pair_acc": ev["pair_acc"], "val_loss": ev["loss"], "val_margin": ev["margin"], "steps": float(step),
               **{f"val_{k}": v for k, v in ev.items() if k.startswith("pair_acc/")}}
    summary = (
        f"Reward model: {step} steps ({stopped_by}) on {len(train)} pairs; held-out pairwise accuracy "
        f"{ev['pair_acc']:.3f} on {len(val)} pairs (loss {ev['loss']:.4f}, mean margin {ev['margin']:.3f})"
        + "".join(f"; {k.removeprefix('pair_acc/')} {v:.3f}" for k, v in ev.items() if k.startswith("pair_acc/")) + ".\n"
    )
    return StageResult(outputs={"reward_model": {"val_pair_acc": ev["pair_acc"], "steps": step}}, metrics=metrics,
                       summary=summary, tables={"eval_curve": curve})


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

"""Pretrain the base model: next-token prediction over the packed token shards.

What: trains the Qwen3-style decoder of `models/gpt.py` on the `tokens` artifact (train.bin / val.bin /
meta.json of the tokenizer stage) and writes `base`: model.safetensors + config.json, the tokenizer
files, an HF-loadable export in `hf/`, and a meta.json with what the run did.

How (the nanoGPT / nanochat recipe, one loop read top to bottom in `run`):
- Data: the train stream is cut into windows of seq_len + 1 consecutive tokens (inputs and targets
  shifted by one). Documents are packed across their <|endoftext|> separators, as GPT-2 and nanoGPT
  pretrain. Windows are visited in a seeded random order per epoch; every rank takes its own slice of
  each global batch. The loader state is two integers (epoch, position), saved in every checkpoint.
- Optimizer: AdamW (Loshchilov & Hutter 2019, decoupled weight decay) with decay on matrices only;
  linear warmup, then cosine decay to min_lr_ratio * lr, or warmup-stable-decay ("wsd", Hu et al.
  2024, MiniCPM) with a linear decay over the last decay_ratio of the steps. Gradient clipping,
  gradient accumulation; bf16 autocast and optional torch.compile on CUDA only; DDP under torchrun,
  or FSDP2 with `fsdp: true` (stages/training.fully_shard_model: one unit per decoder block and the
  root), for models whose weights, gradients and AdamW moments do not fit one device's memory
  replicated. Under FSDP, checkpoints are gathered into the same full files one process writes (they
  resume on any world size, with DDP or FSDP), and evaluation, sampling and the export run on rank 0
  on a plain copy of the gathered weights.
- Evaluation: validation loss in nats/token on a fixed, evenly spread subset of val windows, and bits
  per byte, bpb = loss * val_tokens / (val_bytes * ln 2), which does not depend on the tokenizer. The
  trivial baseline next to it is `unigram_bpb`: val under the add-one-smoothed unigram distribution
  of the train tokens.

Deviations:
- The step budget (max_steps, or max_tokens) fixes the LR schedule. `max_minutes` is a wall-clock
  guard that ends training early (the LR then has not fully decayed) rather than stretching the
  schedule to the clock, so that a resumed run stays bit-identical to an uninterrupted one.
- Windows do not mask attention at document boundaries (no doc_ids): the nanoGPT choice; the model
  learns that <|endoftext|> starts a new context.

Run:
    python -m stages.pretrain --config c.json --inputs i.json --run-dir DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m stages.pretrain --config c.json --inputs i.json --run-dir DIR
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from models.generate import generate
from models.gpt import GPT, GPTConfig
from models.hf_export import save_model_dir
from models.tokenizer import Tokenizer
from stages.contract import StageContext, StageError, StageResult, main
from stages.training import (
    Clock, TrainConfig, adamw, all_ranks_max, all_ranks_sum, budget_warnings, checkpoint, clip_gradients,
    data_parallel, fully_shard_model, gradient_sync, resume, set_lr, setup_runtime, stopped_by, unsharded_copy,
    write_run_meta,
)
from storage.artifacts import Artifact

INPUTS = ("tokenizer", "tokens")
OUTPUTS = ("base",)
GPU = True


@dataclass(frozen=True)
class Config(TrainConfig):
    # model; vocab_size comes from the tokens' meta.json, head_dim and d_ff are derived by GPTConfig
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    seq_len: int = 256
    tie_embeddings: bool = True
    # batch: tokens per optimizer step = batch_size * grad_accum * seq_len * world_size
    batch_size: int = 16
    grad_accum: int = 1
    # the policy's knobs (stages/training.TrainConfig), with pretraining's defaults: cosine from 3e-3 over a
    # step budget of max_steps (or max_tokens // tokens per step when > 0), decay on matrices
    lr: float = 3e-3
    weight_decay: float = 0.1
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 30
    max_steps: int = 500
    max_minutes: float = 60.0
    max_tokens: int = 0
    eval_every: int = 100
    eval_tokens: int = 65536  # val tokens per evaluation (all of val when smaller)
    # under torchrun: FSDP2 instead of DDP (ignored by one process); a layout of the work, not of the result
    fsdp: bool = False
    # CUDA only (compile: not with fsdp)
    compile: bool = False
    peak_tflops: float = 989.0  # dense bf16 peak of one GPU for MFU (H100 SXM)
    # greedy samples logged at every evaluation
    sample_prompts: tuple[str, ...] = ("The", "In the beginning", "The best way to")
    sample_tokens: int = 32

    def validate(self) -> None:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_heads ({self.n_heads}) and n_heads by n_kv_heads ({self.n_kv_heads})")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        TrainConfig.validate(self)


# -- data ----------------------------------------------------------------------------------------


def read_shards(tokens_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, val, meta) with the bins memory-mapped; StageError naming the file when one is unusable."""
    meta_path = tokens_dir / "meta.json"
    if not meta_path.is_file():
        raise StageError(f"pretrain: no meta.json in tokens artifact {tokens_dir}; rebuild the tokenizer stage")
    meta = json.loads(meta_path.read_text())
    for key in ("dtype", "vocab_size", "eot_id", "val_bytes"):
        if key not in meta:
            raise StageError(f"pretrain: {meta_path} lacks {key!r}; rebuild the tokenizer stage")
    shards = []
    for name in ("train.bin", "val.bin"):
        path = tokens_dir / name
        if not path.is_file() or path.stat().st_size == 0:
            raise StageError(f"pretrain: {path} is missing or empty; the tokenizer stage must put at least one document in each split")
        shards.append(np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r"))
    if meta["val_bytes"] <= 0:
        raise StageError(f"pretrain: {meta_path} says val_bytes={meta['val_bytes']}; bits per byte need val text")
    return shards[0], shards[1], meta


class PackedLoader:
    """Windows of seq_len + 1 consecutive tokens in a seeded random order per epoch, sharded by rank.

    Window i starts at token i * seq_len, so consecutive windows share one token (the last target of
    one is the first input of the next) and every token is a target once per epoch. A global batch is
    batch_size * world_size consecutive entries of the epoch's permutation; rank r takes the r-th
    block of batch_size. The tail of an epoch smaller than a global batch is skipped.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = (len(tokens) - 1) // seq_len
        self.global_batch = batch_size * world_size
        if self.n_windows < self.global_batch:
            raise StageError(
                f"pretrain: train.bin has {len(tokens)} tokens, fewer than one global batch of "
                f"{self.global_batch} x {seq_len + 1}; lower batch_size or seq_len, or add data"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def next_windows(self) -> np.ndarray:
        """Start offsets of this rank's next batch_size windows, advancing the state by one global batch."""
        if self.position + self.global_batch > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        lo = self.position + self.rank * self.batch_size
        windows = self.order(self.epoch)[lo : lo + self.batch_size]
        self.position += self.global_batch
        return windows * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, targets: (B, T) int64."""
        buf = np.stack([self.tokens[s : s + self.seq_len + 1] for s in self.next_windows()]).astype(np.int64)  # (B, T+1)
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def eval_starts(n_tokens: int, seq_len: int, eval_tokens: int) -> np.ndarray:
    """Start offsets of a fixed subset of val windows spread evenly over val (all windows if few)."""
    n_windows = (n_tokens - 1) // seq_len
    if n_windows < 1:
        raise StageError(f"pretrain: val.bin has {n_tokens} tokens, fewer than one window of {seq_len + 1}; lower seq_len or add val data")
    keep = min(n_windows, max(1, eval_tokens // seq_len))
    return np.linspace(0, n_windows - 1, keep).round().astype(np.int64) * seq_len


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Mean loss per token (nats) -> bits per byte of the text those tokens encode."""
    return loss_nats * n_tokens / (n_bytes * math.log(2))


def unigram_bpb(train: np.ndarray, val: np.ndarray, vocab_size: int, val_bytes: int, chunk: int = 1 << 24) -> float:
    """Bits per byte of val under the train unigram distribution with add-one smoothing.

    p(t) = (count_train(t) + 1) / (n_train + V);  bpb = -sum_val log2 p(t) / val_bytes.
    """

    def counts(a: np.ndarray) -> np.ndarray:
        c = np.zeros(vocab_size, dtype=np.int64)
        for i in range(0, len(a), chunk):  # bincount on a chunk at a time: a memmap never loads whole
            c += np.bincount(a[i : i + chunk], minlength=vocab_size)[:vocab_size]
        return c

    train_counts = counts(train) + 1
    log2_p = np.log2(train_counts) - np.log2(train_counts.sum())
    return float(-(counts(val) * log2_p).sum() / val_bytes)


# -- model, optimizer, evaluation ------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: np.ndarray, starts: np.ndarray, seq_len: int, batch_size: int,
             device: torch.device, autocast: contextlib.AbstractContextManager, rank: int = 0, world_size: int = 1) -> float:
    """Mean next-token loss (nats) over the val windows at `starts`, split across ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    mine = starts[rank::world_size]
    for i in range(0, len(mine), batch_size):
        buf = torch.from_numpy(np.stack([val[s : s + seq_len + 1] for s in mine[i : i + batch_size]]).astype(np.int64))
        x, y = buf[:, :-1].to(device), buf[:, 1:].to(device)  # (B, T)
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def sample_text(model: GPT, tokenizer: Tokenizer, prompts: tuple[str, ...], max_new_tokens: int, eot_id: int,
                autocast: contextlib.AbstractContextManager) -> str:
    """Greedy continuations, one block per prompt; each prompt starts a document (after <|endoftext|>)."""
    ids = [[eot_id] + tokenizer.encode(p) for p in prompts]
    model.eval()
    with torch.no_grad(), autocast:
        outs = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=(eot_id,), pad_id=eot_id)
    model.train()
    return "\n\n".join(f"### {p}\n{p}{tokenizer.decode(o, skip_special_tokens=True)}" for p, o in zip(prompts, outs))


def read_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise StageError(f"pretrain: no tokenizer.json in tokenizer artifact {tokenizer_dir}; rebuild the tokenizer stage")
    try:
        return Tokenizer.load(tokenizer_dir)
    except Exception as e:  # a special token is missing, or the file does not parse
        raise StageError(f"pretrain: {tokenizer_dir}/tokenizer.json: {e}; rebuild the tokenizer stage") from None


def derive(cfg: Config, model: GPT, train_tokens: int, world_size: int, device: torch.device, baseline_bpb: float) -> dict[str, Any]:
    """The sizes the config implies: tokens per optimizer step, the step budget (max_tokens wins when
    set), planned epochs, FLOPs per token; with the trivial baseline, logged as the run's params."""
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * world_size
    total_steps = max(1, cfg.max_tokens // tokens_per_step) if cfg.max_tokens > 0 else cfg.max_steps
    return {
        "vocab_size": model.cfg.vocab_size, "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
        "tokens_per_step": tokens_per_step, "total_steps": total_steps, "planned_tokens": total_steps * tokens_per_step,
        "epochs_planned": total_steps * tokens_per_step / train_tokens, "flops_per_token": model.flops_per_token(cfg.seq_len),
        "world_size": world_size, "device": str(device), "unigram_bpb": baseline_bpb,
    }


# -- the report ------------------------------------------------------------------------------------


def summarize(cfg: Config, derived: dict[str, Any], step: int, stop: str, tokens_seen: int, tokens_per_s: float,
              train_loss: float | None, val_loss: float, val_bpb: float, curve: list[dict[str, Any]], samples: str,
              mfu: float | None = None) -> StageResult:
    """The stage's report from what the loop measured: headline metrics, the markdown summary, the
    eval curve, and the loud warning when the time cap ended training (no training needed to test it)."""
    n_params, baseline = derived["params"], derived["unigram_bpb"]
    metrics = {
        "val_loss": val_loss, "val_bpb": val_bpb, "unigram_bpb": baseline, "tokens_per_s": tokens_per_s,
        "params": float(n_params), "steps": float(step), "train_tokens_seen": float(tokens_seen),
    }
    if mfu is not None:
        metrics["mfu"] = mfu
    if train_loss is not None:
        metrics["train_loss"] = train_loss
    summary = (
        f"Base model: {n_params / 1e6:.2f}M params, {step} of {derived['total_steps']} steps ({stop}), "
        f"{tokens_seen / 1e6:.2f}M tokens at {tokens_per_s:,.0f} tok/s.\n\n"
        f"| val loss | val bpb | unigram bpb |\n|---|---|---|\n| {val_loss:.4f} | {val_bpb:.4f} | {baseline:.4f} |\n\n"
        f"Samples (greedy):\n\n{samples}\n"
    )
    return StageResult(
        outputs={"base": {"params": n_params, "steps": step, "val_bpb": val_bpb, "seq_len": cfg.seq_len}},
        metrics=metrics, summary=summary, tables={"eval_curve": curve},
        warnings=budget_warnings("pretrain", stop, step, derived["total_steps"], cfg.max_minutes),
    )


# -- the stage -------------------------------------------------------------------------------------


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    log = ctx.logger
    # setup: one process per device; DDP when torchrun started more than one; the same seed on every rank
    rt = setup_runtime(ctx)
    device, autocast = rt.device, rt.autocast

    # data
    tokenizer_dir, tokens_dir = Path(inputs["tokenizer"].path), Path(inputs["tokens"].path)
    tokenizer = read_tokenizer(tokenizer_dir)
    train, val, meta = read_shards(tokens_dir)
    vocab_size, eot_id = int(meta["vocab_size"]), int(meta["eot_id"])
    if tokenizer.vocab_size > vocab_size:
        raise StageError(f"pretrain: tokenizer has {tokenizer.vocab_size} tokens but {tokens_dir}/meta.json says vocab_size={vocab_size}; rebuild both from one tokenizer run")
    loader = PackedLoader(train, cfg.seq_len, cfg.batch_size, ctx.seed, ctx.rank, ctx.world_size)
    starts = eval_starts(len(val), cfg.seq_len, cfg.eval_tokens)
    val_tokens, val_bytes = len(val), int(meta["val_bytes"])

    # model (the same init on every rank; DDP also broadcasts rank 0's weights) and optimizer
    gcfg = GPTConfig(vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                     n_kv_heads=cfg.n_kv_heads, max_seq_len=cfg.seq_len, tie_embeddings=cfg.tie_embeddings)
    raw_model = GPT(gcfg).to(device)
    sharded = rt.ddp and cfg.fsdp  # before the optimizer, which must hold the sharded parameters
    plain = fully_shard_model(raw_model, ctx) if sharded else None  # rank 0's copy for evaluation, sampling, export
    optimizer = adamw(raw_model, cfg, device)

    # derived sizes, logged so the run is self-describing
    derived = derive(cfg, raw_model, len(train), ctx.world_size, device, unigram_bpb(train, val, vocab_size, val_bytes))
    tokens_per_step, total_steps, flops_per_token = derived["tokens_per_step"], derived["total_steps"], derived["flops_per_token"]
    if ctx.is_main:
        log.info("pretrain: %s", json.dumps(derived))
        ctx.tracker.log_params({"derived": derived, "model": gcfg.to_dict()})

    # resume: weights, optimizer, RNG, loader position, step and the training time spent so far
    ck = resume(ctx, raw_model, optimizer, device, loader=loader)
    step, tokens_seen, curve = ck.get("step", 0), ck.get("tokens_seen", 0), ck.get("curve", [])
    model: torch.nn.Module = raw_model
    if not rt.cuda and ctx.is_main:  # a GPU recipe (small, base) on CPU: say what does not apply
        log.info("pretrain: bf16 autocast is CUDA-only: off on %s, training in fp32%s", device,
                 "; compile is CUDA-only: off" if cfg.compile else "")
    if rt.cuda and cfg.compile and not sharded:
        model = torch.compile(model)
    eval_model, model = model, data_parallel(model, rt)  # evaluation must not run DDP's collectives

    def mfu(tok_s: float) -> float | None:
        return flops_per_token * tok_s / (cfg.peak_tflops * 1e12 * ctx.world_size) if rt.cuda else None

    # the loop: evaluate, stop or take one optimizer step, checkpoint
    clock = Clock(ck.get("elapsed_s", 0.0))
    train_loss, val_loss, samples = ck.get("train_loss"), float("nan"), ""  # the last logged mean goes into the curve
    run_tokens, tokens_log = 0, 0  # this process's share of this run, for tokens/s
    # train loss summed over the steps since the last log (kept in checkpoints: a resumed run logs the same means)
    loss_acc, n_acc = torch.tensor(ck.get("loss_sum", 0.0), device=device), ck.get("loss_n", 0)

    def loop_state() -> dict[str, Any]:
        return {"loader": loader, "tokens_seen": tokens_seen, "curve": curve, "train_loss": train_loss,
                "loss_sum": loss_acc.item(), "loss_n": n_acc, "gpt_config": gcfg.to_dict()}

    while True:
        out_of_time = step % cfg.log_every == 0 and all_ranks_max(float(clock.over(cfg.max_minutes)), ctx.world_size, device) > 0
        last = step >= total_steps or out_of_time
        if step % cfg.eval_every == 0 or last:
            with clock.paused():
                one = unsharded_copy(raw_model, plain) if sharded else eval_model  # FSDP: rank 0 evaluates the gathered weights
                if one is not None:
                    val_loss = evaluate(one, val, starts, cfg.seq_len, cfg.batch_size, device, autocast,
                                        *((0, 1) if sharded else (ctx.rank, ctx.world_size)))
                if ctx.is_main:
                    ctx.tracker.log_metrics({"val/loss": val_loss, "val/bpb": bits_per_byte(val_loss, val_tokens, val_bytes)}, step=step)
                    samples = sample_text(plain if sharded else raw_model, tokenizer, cfg.sample_prompts, cfg.sample_tokens, eot_id, autocast)
                    ctx.tracker.log_text(samples, f"samples/step-{step:06d}.md")
                    curve.append({"step": step, "train_loss": train_loss, "val_loss": val_loss,
                                  "val_bpb": bits_per_byte(val_loss, val_tokens, val_bytes)})
        if last:
            break

        lr = set_lr(optimizer, cfg, step, total_steps)
        step_loss = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, T)
            sync = gradient_sync(model, rt, micro == cfg.grad_accum - 1)  # reduce gradients on the last micro-batch only
            with sync, autocast:
                _, loss = model(x, y)
            with sync:
                (loss / cfg.grad_accum).backward()
            step_loss += loss.detach() / cfg.grad_accum
        # DDP: the whole batch's mean on every rank, so a checkpoint's running sum (rank 0's) is every rank's
        loss_acc += all_ranks_sum(step_loss / ctx.world_size, ctx.world_size) if rt.ddp else step_loss
        n_acc += 1
        grad_norm = clip_gradients(raw_model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        run_tokens += tokens_per_step
        tokens_log += tokens_per_step

        if step % cfg.log_every == 0 or step == total_steps:
            train_loss = (loss_acc / n_acc).item()  # with the ones below, the loop's only host-device syncs
            loss_acc.zero_()
            n_acc = 0
            tok_s = clock.lap(tokens_log)
            tokens_log = 0
            metrics = {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm.item(), "train/tokens_per_s": tok_s}
            if rt.cuda:
                metrics["train/mfu"] = mfu(tok_s)
            if ctx.is_main:
                ctx.tracker.log_metrics(metrics, step=step)
                ctx.progress(step, total_steps, "pretrain", loss=train_loss)
        checkpoint(ctx, step, raw_model, optimizer, cfg, clock, **loop_state())

    # save: a final checkpoint (a crash during export resumes here), then the `base` artifact
    checkpoint(ctx, step, raw_model, optimizer, cfg, clock, final=True, **loop_state())
    tokens_per_s = clock.rate(run_tokens)
    val_bpb = bits_per_byte(val_loss, val_tokens, val_bytes)
    result = summarize(cfg, derived, step, stopped_by(step, total_steps), tokens_seen, tokens_per_s, train_loss,
                       val_loss, val_bpb, curve, samples, mfu(tokens_per_s))
    if ctx.is_main:  # FSDP: `plain` holds the final weights, gathered for the last evaluation
        out = save_model_dir(plain if sharded else raw_model, tokenizer_dir, ctx.output("base"))
        write_run_meta(out, "pretrain", step, total_steps, stopped_by(step, total_steps), result.metrics, derived,
                       cfg, curve, seq_len=cfg.seq_len, eot_id=eot_id)
        ctx.tracker.log_text(samples, "samples/final.md")
    rt.close()
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

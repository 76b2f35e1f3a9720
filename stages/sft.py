"""Supervised fine-tuning (SFT): teach the base model to answer in chat turns.

What: fine-tunes the `base` model on the `chat` conversations (split "train") and writes `sft`, a
model directory like `base` (model.safetensors + config.json, tokenizer files with <|im_end|> as the
eos token, meta.json, an HF export in hf/). Measured on held-out data: the loss on `chat` val, and
the greedy exact-match accuracy per task on `prompts` val (stages/chat/evaluate.py) of the SFT model
zero-shot ("acc/<task>") and of the base model few-shot ("base_acc/<task>"; see evaluate.py for why
the base model gets solved examples in plain "Question:/Answer:" text, the format it has read), next
to the trivial baseline "majority_acc/<task>": always giving the task's most common train answer.

How (InstructGPT's SFT step, Ouyang et al. 2022, in the shape of nanochat's chat_sft):
- Each conversation is rendered in ChatML and trained on with next-token cross-entropy on the
  assistant turns only (their content and closing <|im_end|>); every other target is -100 (TRL's
  assistant_only_loss). The loss is the mean over the batch's assistant tokens.
- Packing: conversations in a seeded random order per epoch fill rows of seq_len tokens first-come;
  `doc_ids` make attention block-diagonal and restart positions at every conversation, so a packed
  row computes exactly what each conversation would alone (Krell et al. 2021, "Efficient sequence
  packing without cross-contamination"). pack=false trains one conversation per row instead, each
  batch right-padded to its longest row. A conversation longer than seq_len is dropped and counted.
- AdamW, linear warmup then cosine decay to min_lr_ratio * lr, gradient clipping. The schedule runs
  over max_steps, or `epochs` passes over the packed train rows when max_steps is 0.
- LoRA (Hu et al. 2021; models/lora.py) when lora_r > 0: the base weights stay frozen and only the
  adapters on `lora_targets` train; they are merged into the weights before saving, so `sft` is a
  plain model either way.
- Resume: checkpoints hold weights (adapters included), optimizer, RNG, the loader's (epoch,
  position) and the base model's few-shot scores, so a resumed run ends with the same weights as an
  uninterrupted one.
- DDP under torchrun (`launch: {sft: {nproc: N}}`): batch_size is the global batch (rows per
  optimizer step over all ranks, unlike pretrain's per-rank batch_size: the epochs budget counts
  global batches, so the step budget and a checkpoint's loader position do not depend on the world
  size). Every rank packs the same rows and takes its block of each global batch; its loss is
  weighted by its share of the batch's assistant tokens, so DDP's gradient average is the gradient of
  the 1-process loss (the mean over the whole batch's assistant tokens). The val loss is sharded by
  batch and summed; the task accuracies (greedy decoding) run on rank 0, which alone writes
  checkpoints, outputs and MLflow.

Deviations: `max_minutes` ends training early without stretching the schedule (as in pretrain), so a
resumed run stays identical; task accuracy is measured once, at the end (the val loss is tracked
during training), because greedy decoding of every val prompt costs more than the steps between.

Run:
    python -m stages.sft --config c.json --inputs i.json --run-dir DIR
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m stages.sft --config c.json --inputs i.json --run-dir DIR
    e.g. c.json = {"epochs": 3, "lr": 1e-3}, i.json = {"base": "DIR/base", "chat": "DIR/chat", "prompts": "DIR/prompts"}
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from models.gpt import GPT
from models.hf_export import save_model_dir
from models.lora import apply_lora, merge_lora
from models.tokenizer import IM_END, Tokenizer
from stages.chat.evaluate import accuracy_table, few_shot_base_eval, generate_answers, majority_baseline, pick_heldout, score
from stages.contract import StageContext, StageError, StageResult, main
from stages.training import (
    Clock, TrainConfig, adamw, all_ranks_max, all_ranks_sum, budget_warnings, checkpoint, clip_gradients,
    data_parallel, open_model_input, resume, set_lr, setup_runtime, shard, stopped_by, write_run_meta,
)
from storage.artifacts import Artifact
from storage.parquet import iter_rows

INPUTS = ("base", "chat", "prompts")
OUTPUTS = ("sft",)
GPU = True
IGNORE = -100


@dataclass(frozen=True)
class Config(TrainConfig):
    # data: rows of seq_len tokens (0: the base model's max_seq_len), several conversations per row
    seq_len: int = 0
    pack: bool = True
    batch_size: int = 16  # rows per optimizer step (the global batch: split over ranks under torchrun)
    # the policy's knobs (stages/training.TrainConfig), with SFT's defaults: cosine from 1e-3 over max_steps,
    # or `epochs` passes over the packed train rows when max_steps is 0
    lr: float = 1e-3
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    max_steps: int = 0
    max_minutes: float = 30.0
    ckpt_every: int = 200
    epochs: float = 3.0
    # LoRA: lora_r = 0 is a full fine-tune
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    eval_every: int = 100
    # held-out task accuracy: greedy decoding of at most eval_per_task val prompts per task
    eval_per_task: int = 100
    max_new_tokens: int = 96  # a worked two-step word problem takes ~80 tokens
    eval_batch_size: int = 64
    base_shots: int = 3  # solved examples before each question for the base model
    base_shot_format: Literal["text", "chat"] = "text"

    def validate(self) -> None:
        for name in ("batch_size", "eval_every", "eval_per_task", "max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "lora_r", "base_shots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("give epochs > 0 or max_steps > 0")
        TrainConfig.validate(self)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


# -- data ----------------------------------------------------------------------------------------


def encode_example(tok: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one conversation, both of length n - 1 for its n ChatML tokens.

    targets[t] = ids[t + 1] when token t + 1 is the assistant's to write (content or closing
    <|im_end|>), else -100: the model is never trained to write the user's or the system's turns.
    """
    ids, mask = tok.encode_chat(messages)
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]


def encode_rows(tok: Tokenizer, rows: list[dict[str, Any]], seq_len: int) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """Encoded conversations, and counts of those left out by reason."""
    examples, dropped = [], {"too_long": 0, "no_assistant_turn": 0}
    for row in rows:
        x, y = encode_example(tok, row["messages"])
        if all(t == IGNORE for t in y):
            dropped["no_assistant_turn"] += 1
        elif len(x) > seq_len:
            dropped["too_long"] += 1
        else:
            examples.append((x, y))
    return examples, dropped


def pack_rows(examples: list[tuple[list[int], list[int]]], order: np.ndarray, seq_len: int, pad_id: int,
              pack: bool) -> torch.Tensor:
    """(R, 3, seq_len) int64 rows of [input ids, targets, doc ids] in `order`.

    Packed: conversations fill a row until the next one does not fit. Unpacked: one per row. Within a
    row the k-th conversation has doc id k and the padding after them doc id k + 1 (targets -100).
    """
    groups: list[list[int]] = []
    used = seq_len + 1
    for i in order:
        n = len(examples[i][0])
        if not pack or used + n > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(int(i))
        used += n
    rows = torch.empty(len(groups), 3, seq_len, dtype=torch.long)
    for r, group in enumerate(groups):
        ids, targets, docs = [], [], []
        for k, i in enumerate(group):
            x, y = examples[i]
            ids += x
            targets += y
            docs += [k] * len(x)
        pad = seq_len - len(ids)
        rows[r, 0] = torch.tensor(ids + [pad_id] * pad)
        rows[r, 1] = torch.tensor(targets + [IGNORE] * pad)
        rows[r, 2] = torch.tensor(docs + [len(group)] * pad)
    return rows


def to_batch(rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, seq_len) rows -> inputs, targets, doc ids (B, T), cut after the last target of any row
    (later positions carry no loss and, attention being causal, change nothing before them)."""
    has_target = (rows[:, 1] != IGNORE).any(0)  # (seq_len,)
    T = int(has_target.nonzero().max()) + 1 if has_target.any() else 1
    rows = rows[:, :, :T].to(device)
    return rows[:, 0], rows[:, 1], rows[:, 2]


def rank_rows(rows: torch.Tensor, rank: int, world_size: int, pad_id: int) -> tuple[torch.Tensor, int]:
    """Under torchrun: this rank's block of a global batch of rows (`training.shard`) and the number of
    assistant tokens in the whole batch. A rank left without rows (the epoch's last batch has fewer
    rows than ranks) gets one row without targets, so that it still joins DDP's all-reduce."""
    n_batch = int((rows[:, 1] != IGNORE).sum())
    mine = rows[shard(len(rows), rank, world_size)]
    if not len(mine):
        seq_len = rows.shape[-1]
        mine = torch.stack([torch.full((seq_len,), pad_id), torch.full((seq_len,), IGNORE), torch.zeros(seq_len, dtype=torch.long)])[None]
    return mine, n_batch


def rank_loss(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, n_batch: int, world_size: int) -> torch.Tensor:
    """This rank's mean loss over its n assistant tokens, weighted by world_size * n / n_batch: DDP
    averages gradients over ranks, and the average of the weighted gradients is the gradient of the
    mean over the whole batch's n_batch tokens (the 1-process loss), however unevenly the tokens fall.
    A rank without targets contributes zero gradients (its mean is nan: no token)."""
    n = int((targets != IGNORE).sum())
    return loss * (n * world_size / n_batch) if n else logits.sum() * 0.0


class ChatLoader:
    """Batches of packed rows; the conversations are shuffled (seed, epoch) before packing.

    An epoch ends with a batch of whatever rows are left, so no conversation is skipped. The state is
    two integers, (epoch, position), saved in every checkpoint.
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, batch_size: int, pad_id: int,
                 pack: bool, seed: int):
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.pad_id, self.pack, self.seed = pad_id, pack, seed
        self.epoch, self.position = 0, 0
        self._rows_epoch, self._rows = -1, torch.empty(0)

    def rows(self, epoch: int) -> torch.Tensor:
        if self._rows_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._rows = pack_rows(self.examples, order, self.seq_len, self.pad_id, self.pack)
            self._rows_epoch = epoch
        return self._rows

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def next_rows(self) -> torch.Tensor:
        if self.position >= len(self.rows(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.rows(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch


# -- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model: GPT, rows: torch.Tensor, batch_size: int, pack: bool, device: torch.device,
              autocast: contextlib.AbstractContextManager, rank: int = 0, world_size: int = 1) -> float:
    """Mean cross-entropy (nats) per assistant token over packed val rows; under torchrun rank r
    takes every world_size-th batch and the sums are all-reduced."""
    model.eval()
    total, count = 0.0, 0
    for lo in range(rank * batch_size, len(rows), batch_size * world_size):
        x, y, docs = to_batch(rows[lo:lo + batch_size], device)
        n = int((y != IGNORE).sum())
        with autocast:
            _, loss = model(x, y, doc_ids=docs if pack else None, at=y != IGNORE)
        total += loss.item() * n
        count += n
    if world_size > 1:
        sums = all_ranks_sum(torch.tensor([total, count], dtype=torch.float64, device=device), world_size)
        total, count = sums[0].item(), int(sums[1].item())
    model.train()
    return total / max(1, count)


def read_split(path: str, split: str) -> list[dict[str, Any]]:
    try:
        return [r for r in iter_rows(path) if r["split"] == split]
    except FileNotFoundError:
        raise StageError(f"sft: no dataset at {path}; rebuild the instruct stage") from None


def load_data(cfg: Config, tok: Tokenizer, inputs: dict[str, Artifact], seq_len: int, seed: int) -> dict[str, Any]:
    """The stage's data: the train loader, the packed val rows, the held-out prompts and the few-shot
    pool (train prompts), and the counts of conversations left out."""
    train_ex, dropped = encode_rows(tok, read_split(inputs["chat"].path, "train"), seq_len)
    val_ex, _ = encode_rows(tok, read_split(inputs["chat"].path, "val"), seq_len)
    if not train_ex:
        raise StageError(f"sft: no usable train conversations in {inputs['chat'].path} (dropped: {dropped}); "
                         f"check the instruct stage or raise seq_len")
    return {"train_ex": train_ex, "val_ex": val_ex, "dropped": dropped,
            "loader": ChatLoader(train_ex, seq_len, cfg.batch_size, tok.pad_id, cfg.pack, seed),
            "val_rows": pack_rows(val_ex, np.arange(len(val_ex)), seq_len, tok.pad_id, cfg.pack),
            "eval_prompts": pick_heldout(read_split(inputs["prompts"].path, "val"), cfg.eval_per_task),
            "shot_pool": read_split(inputs["prompts"].path, "train")}


def pick_samples(rows: list[dict[str, Any]], completions: list[str], n: int = 12) -> list[dict[str, Any]]:
    """At least one completion of every task, and the first n overall, for the report."""
    samples, seen = [], set()
    for row, completion in zip(rows, completions):
        if row["task"] not in seen or len(samples) < n:
            seen.add(row["task"])
            samples.append({"task": row["task"], "prompt": row["prompt"][-1]["content"], "completion": completion,
                            "answer": row["answer"]})
    return samples


# -- the report ------------------------------------------------------------------------------------


def summarize(cfg: Config, derived: dict[str, Any], step: int, stop: str, val_loss: float, tokens_per_s: float,
              eval_prompts: list[dict[str, Any]], acc: dict[str, float], base_acc: dict[str, float],
              majority_acc: dict[str, float], samples: list[dict[str, Any]], curve: list[dict[str, Any]]) -> StageResult:
    """Headline metrics (acc/<task> with its base_ and majority_ baselines), the accuracy table and
    the markdown summary, from what the run measured."""
    metrics: dict[str, float] = {"val_loss": val_loss, "steps": float(step), "tokens_per_s": tokens_per_s,
                                 "trainable_params": float(derived["trainable_params"]), **acc,
                                 **{f"base_{k}": v for k, v in base_acc.items()},
                                 **({f"majority_{k}": v for k, v in majority_acc.items()} if acc else {})}
    table, md = accuracy_table({"most common answer": majority_acc, "base (few-shot)": base_acc, "sft": acc}, eval_prompts)
    lora = f" (LoRA r={cfg.lora_r} on {derived['lora_layers']} layers)" if derived["lora_layers"] else ""
    lines = [f"SFT: {step} of {derived['total_steps']} steps ({stop}), {derived['trainable_params'] / 1e6:.2f}M trainable "
             f"params{lora}, val loss {val_loss:.4f}.", ""]
    if table:
        lines += [f"Held-out accuracy (greedy; base: {cfg.base_shots}-shot {cfg.base_shot_format}):", "", md, "", "Samples:", ""]
        lines += [f"- [{s['task']}] {s['prompt']!r} -> {s['completion']!r} (answer {s['answer']!r})" for s in samples]
    return StageResult(
        outputs={"sft": {"params": derived["params"], "steps": step, "val_loss": val_loss, "acc": metrics.get("acc")}},
        metrics=metrics, summary="\n".join(lines), tables={"eval": table, "eval_curve": curve, "samples": samples},
        warnings=budget_warnings("sft", stop, step, derived["total_steps"], cfg.max_minutes),
    )


# -- the stage -------------------------------------------------------------------------------------


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    log = ctx.logger
    # setup, and the base model with its tokenizer
    rt = setup_runtime(ctx)
    device, autocast = rt.device, rt.autocast
    base_dir, tok, model = open_model_input(inputs, "base", "sft", device)
    seq_len = cfg.seq_len or model.cfg.max_seq_len

    # data
    data = load_data(cfg, tok, inputs, seq_len, ctx.seed)
    loader, val_rows, eval_prompts = data["loader"], data["val_rows"], data["eval_prompts"]
    steps_per_epoch = math.ceil(len(loader.rows(0)) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    derived = {
        "seq_len": seq_len, "train_conversations": len(data["train_ex"]), "val_conversations": len(data["val_ex"]),
        "dropped": data["dropped"], "rows_per_epoch": len(loader.rows(0)), "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps, "assistant_tokens_per_epoch": sum(sum(t != IGNORE for t in y) for _, y in data["train_ex"]),
        "eval_prompts": len(eval_prompts), "device": str(device), "params": model.num_params(),
    }

    # LoRA: freeze the base, train adapters only; then the optimizer
    try:
        lora_layers = apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) if cfg.lora_r else []
    except ValueError as e:
        raise StageError(f"sft: lora_targets: {e}") from None
    derived["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    derived["lora_layers"] = len(lora_layers)
    if ctx.is_main:
        log.info("sft: %s", json.dumps(derived))
    ctx.tracker.log_params({"derived": derived})
    optimizer = adamw(model, cfg, device)

    # resume, or score the base model before any step changes it (on rank 0: the others wait in DDP's
    # first broadcast)
    ck = resume(ctx, model, optimizer, device, loader=loader)
    step, curve, base_acc = ck.get("step", 0), ck.get("curve", []), ck.get("base_metrics", {})
    if not ck and eval_prompts and ctx.is_main:
        ctx.progress(0, 1, "base model few-shot eval")
        with autocast:
            base_acc = few_shot_base_eval(model, tok, eval_prompts, data["shot_pool"], cfg.base_shots, cfg.base_shot_format,
                                          cfg.max_new_tokens, cfg.eval_batch_size, ctx.seed)
        ctx.progress(1, 1, "base model few-shot eval")
        ctx.tracker.log_metrics({f"base_{k}": v for k, v in base_acc.items()})

    # the loop: evaluate, stop or take one optimizer step, checkpoint
    model.train()
    train_model = data_parallel(model, rt)  # `model` stays unwrapped: evaluation runs no DDP collective
    clock = Clock(ck.get("elapsed_s", 0.0))
    train_loss, val_loss = ck.get("train_loss"), float("nan")  # the last logged mean goes into the curve
    loss_acc, n_acc = torch.tensor(ck.get("loss_sum", 0.0), device=device), ck.get("loss_n", 0)  # since the last log
    tokens_log, run_tokens = 0, 0

    def loop_state() -> dict[str, Any]:
        return {"loader": loader, "curve": curve, "base_metrics": base_acc, "train_loss": train_loss,
                "loss_sum": loss_acc.item(), "loss_n": n_acc}

    while True:
        last = step >= total_steps or all_ranks_max(float(clock.over(cfg.max_minutes)), ctx.world_size, device) > 0
        if (step % cfg.eval_every == 0 or last) and len(val_rows):
            with clock.paused():
                val_loss = eval_loss(model, val_rows, cfg.batch_size, cfg.pack, device, autocast, ctx.rank, ctx.world_size)
                ctx.tracker.log_metrics({"val/loss": val_loss}, step=step)
                curve.append({"step": step, "train_loss": train_loss, "val_loss": val_loss})
        if last:
            break

        lr = set_lr(optimizer, cfg, step, total_steps)
        rows = loader.next_rows()  # (B, 3, seq_len): the global batch, the same on every rank
        if rt.ddp:
            rows, n_batch = rank_rows(rows, ctx.rank, ctx.world_size, tok.pad_id)
        x, y, docs = to_batch(rows, device)  # (B, T) each
        with autocast:
            logits, loss = train_model(x, y, doc_ids=docs if cfg.pack else None, at=y != IGNORE)
        if rt.ddp:
            loss = rank_loss(loss, logits, y, n_batch, ctx.world_size)
        loss.backward()
        grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # DDP: the batch's mean on every rank, so that a checkpoint's running sum is the whole batch's
        loss_acc += all_ranks_sum(loss.detach() / ctx.world_size, ctx.world_size) if rt.ddp else loss.detach()
        n_acc += 1
        tokens_log += x.numel()
        run_tokens += x.numel()
        if step % cfg.log_every == 0 or step == total_steps:
            train_loss = (loss_acc / n_acc).item()
            loss_acc.zero_()
            n_acc = 0
            ctx.tracker.log_metrics({"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm.item(),
                                     "train/tokens_per_s": clock.lap(tokens_log), "train/epoch": loader.epoch}, step=step)
            tokens_log = 0
            ctx.progress(step, total_steps, "sft", loss=train_loss, val_loss=val_loss)
        checkpoint(ctx, step, model, optimizer, cfg, clock, **loop_state())

    # a final checkpoint (a crash during evaluation or export resumes here), then merge and evaluate.
    # The process group closes here: the rest runs on rank 0 alone, and the other ranks must not wait
    # for its decoding in a collective that can time out.
    checkpoint(ctx, step, model, optimizer, cfg, clock, final=True, **loop_state())
    rt.close()
    if lora_layers:
        merge_lora(model)
    model.eval()
    acc, samples = {}, []
    if eval_prompts and ctx.is_main:
        ctx.progress(0, 1, "sft model eval")
        with autocast:
            completions = generate_answers(model, tok, [r["prompt"] for r in eval_prompts], cfg.max_new_tokens,
                                           cfg.eval_batch_size)
        ctx.progress(1, 1, "sft model eval")
        acc, samples = score(eval_prompts, completions), pick_samples(eval_prompts, completions)
    stop = stopped_by(step, total_steps)
    result = summarize(cfg, derived, step, stop, val_loss, clock.rate(run_tokens), eval_prompts, acc, base_acc,
                       majority_baseline(data["shot_pool"], eval_prompts) if eval_prompts else {}, samples, curve)
    ctx.tracker.log_metrics(result.metrics, step=step)

    # save the `sft` model directory: a chat model's turn ends at <|im_end|>
    if not ctx.is_main:
        return result
    out = save_model_dir(model, base_dir, ctx.output("sft"), eos_token=IM_END)
    write_run_meta(out, "sft", step, total_steps, stop, result.metrics, derived, cfg, curve, base=inputs["base"].fingerprint)
    ctx.tracker.log_text(result.summary, "sft_summary.md")
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

"""Shared pieces of the preference stages (reward, dpo, grpo): encoded pairs, batch order, log-probs.

- `read_pairs`: prefs rows of one split -> token ids of prompt+chosen and prompt+rejected, with a mask
  of the response tokens (the assistant's content and its <|im_end|>); pairs longer than the model's
  context are dropped and counted.
- `train_val_pairs`: both splits as a trainer needs them, or a one-line error.
- `BatchOrder`: a seeded permutation per epoch, consumed batch by batch; its state is two integers,
  so a checkpoint resumes the exact data order.
- `accuracy_by_task`: a pairwise accuracy per task ("pair_acc/arith").
- `pad_right`, `token_logps`, `sequence_logps`: right-padded batches and per-token / per-sequence
  log-probabilities of the response tokens under a causal LM. Right padding needs no attention
  mask: a real token never attends to the padding after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.heads import conversation_ids
from stages.contract import StageError
from storage.parquet import iter_rows


@dataclass
class Pair:
    id: str
    prompt: list[dict[str, str]]
    chosen: list[int]  # prompt + chosen response, rendered with the chat template
    rejected: list[int]
    chosen_mask: list[bool]  # True at the tokens the response writes
    rejected_mask: list[bool]
    task: str = ""  # the prefs row's task ("" when it has none)


def read_pairs(path: str | Path, split: str, tok: Any, max_len: int) -> tuple[list[Pair], int]:
    """Pairs of `split` and the number dropped for exceeding max_len tokens."""
    pairs, too_long = [], 0
    for row in iter_rows(path, columns=["id", "prompt", "chosen", "rejected", "task", "split"]):
        if row["split"] != split:
            continue
        chosen, chosen_mask = conversation_ids(tok, row["prompt"], row["chosen"])
        rejected, rejected_mask = conversation_ids(tok, row["prompt"], row["rejected"])
        if max(len(chosen), len(rejected)) > max_len:
            too_long += 1
            continue
        pairs.append(Pair(row["id"], row["prompt"], chosen, rejected, chosen_mask, rejected_mask, row["task"] or ""))
    return pairs, too_long


def train_val_pairs(path: str | Path, tok: Any, max_len: int, batch_size: int, eval_pairs: int,
                    stage: str) -> tuple[list[Pair], list[Pair], int]:
    """The train pairs, an evenly spread fixed subset of at most eval_pairs val pairs, and how many
    pairs were dropped as longer than max_len; a StageError when there is not one batch to train on or
    no val pair to measure."""
    train, train_long = read_pairs(path, "train", tok, max_len)
    val, val_long = read_pairs(path, "val", tok, max_len)
    if len(train) < batch_size or not val:
        raise StageError(f"{stage}: {path} has {len(train)} train and {len(val)} val pairs within {max_len} tokens; "
                         f"need at least batch_size={batch_size} train pairs and one val pair")
    return train, val[:: max(1, math.ceil(len(val) / eval_pairs))], train_long + val_long


class BatchOrder:
    """Indices 0..n-1 in a seeded random order per epoch, `batch_size` at a time (the last partial
    batch of an epoch is dropped, so every step sees a full batch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"{n} examples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def next(self) -> list[int]:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        batch = order[self.position:self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return batch


def accuracy_by_task(pairs: list[Pair], correct: list[bool], name: str) -> dict[str, float]:
    """{f"{name}/<task>": share of `correct` among the pairs of each task}, for pairs that have a task."""
    by_task: dict[str, list[bool]] = {}
    for pair, ok in zip(pairs, correct):
        if pair.task:
            by_task.setdefault(pair.task, []).append(ok)
    return {f"{name}/{task}": sum(oks) / len(oks) for task, oks in sorted(by_task.items())}


def pad_right(seqs: list[list[int]], pad_id: int | bool, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Token lists (or masks) -> (B, T), right-padded with pad_id."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=dtype)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=dtype)
    return ids.to(device)


def response_mask(starts: list[int], lengths: list[int], T: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, T - 1) bool over next-token targets: target t (token t + 1) is a response token when
    start <= t + 1 < length."""
    pos = torch.arange(1, T, device=device)[None, :]  # (1, T-1): index of the predicted token
    s = torch.tensor(starts, device=device)[:, None]
    n = torch.tensor(lengths, device=device)[:, None]
    return (pos >= s) & (pos < n)


def token_logps(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T - 1) log p(ids[:, t + 1] | ids[:, :t + 1]) in fp32."""
    logits, _ = model(ids[:, :-1])  # (B, T-1, V)
    targets = ids[:, 1:]
    # -cross_entropy is log_softmax + gather without materialising a second (B, T, V) tensor
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def sequence_logps(model: torch.nn.Module, seqs: list[list[int]], masks: list[list[bool]], pad_id: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs of the masked (response) tokens of each sequence (B,), and their counts (B,)."""
    ids = pad_right(seqs, pad_id, device)  # (B, T)
    mask = pad_right(masks, False, device, torch.bool)[:, 1:]  # (B, T-1): target t is token t + 1
    logps = token_logps(model, ids)  # (B, T-1)
    return (logps * mask).sum(dim=1), mask.sum(dim=1)

"""Shared pieces of the preference stages (reward, dpo, grpo): encoded pairs, batch order, log-probs.

- `read_pairs`: prefs rows of one split -> token ids of prompt+chosen and prompt+rejected, with a mask
  of the response tokens (the assistant's content and its <|im_end|>); pairs longer than the model's
  context are dropped and counted.
- `train_val_pairs`: the train and val splits as a trainer needs them, or a one-line error (the test
  split is never read here: it is reported only, by the evaluate stage).
- `BatchOrder`: a seeded permutation per epoch, consumed batch by batch; its state is two integers,
  so a checkpoint resumes the exact data order.
- `pair_scores`, `accuracy_by_task`, `accuracy_by_kind`: a pairwise accuracy in which a tie counts half,
  so that chance (a model that cannot tell the two replies apart) is 0.5, overall, per task
  ("pair_acc/arith") and per kind of rejected reply ("pair_acc/slip": stages/instruct.py).
- `compare`: that accuracy next to a baseline's on the same pairs (the reward model before training,
  DPO's reference), with Wilson 95% intervals for both and a normal one for the paired difference.
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
    kind: str = ""  # how rejected was made: "near_miss", "slip" ("" for imported pairs)


def read_pairs(path: str | Path, split: str, tok: Any, max_len: int) -> tuple[list[Pair], int]:
    """Pairs of `split` and the number dropped for exceeding max_len tokens."""
    pairs, too_long = [], 0
    for row in iter_rows(path, columns=["id", "prompt", "chosen", "rejected", "task", "kind", "split"]):
        if row["split"] != split:
            continue
        chosen, chosen_mask = conversation_ids(tok, row["prompt"], row["chosen"])
        rejected, rejected_mask = conversation_ids(tok, row["prompt"], row["rejected"])
        if max(len(chosen), len(rejected)) > max_len:
            too_long += 1
            continue
        pairs.append(Pair(row["id"], row["prompt"], chosen, rejected, chosen_mask, rejected_mask, row["task"] or "",
                          row["kind"] or ""))
    return pairs, too_long


def train_val_pairs(path: str | Path, tok: Any, max_len: int, batch_size: int, eval_pairs: int,
                    stage: str, train_kinds: tuple[str, ...] = ()) -> tuple[list[Pair], list[Pair], int]:
    """The train pairs (only those of `train_kinds` when given; val keeps every kind), a fixed subset of
    at most eval_pairs val pairs (`spread`), and how many pairs were dropped as longer than max_len; a
    StageError when there is not one batch to train on or no val pair to measure."""
    train, train_long = read_pairs(path, "train", tok, max_len)
    val, val_long = read_pairs(path, "val", tok, max_len)
    train = [p for p in train if not train_kinds or p.kind in train_kinds]
    if len(train) < batch_size or not val:
        of = f" of kinds {list(train_kinds)}" if train_kinds else ""
        raise StageError(f"{stage}: {path} has {len(train)} train{of} and {len(val)} val pairs within {max_len} tokens; "
                         f"need at least batch_size={batch_size} train pairs and one val pair")
    return train, spread(val, eval_pairs), train_long + val_long


def spread(pairs: list[Pair], n: int) -> list[Pair]:
    """At most n of `pairs`, evenly spread over them in id order (content hashes, so in effect a random
    sample): in file order the rows of one item sit together, near miss then slip, and a stride of 2
    over the file would keep only one kind."""
    pairs = sorted(pairs, key=lambda p: p.id)
    return pairs[:: max(1, math.ceil(len(pairs) / n))]


class BatchOrder:
    """Indices 0..n-1 in a seeded random order per epoch, `batch_size` at a time (the last partial
    batch of an epoch is dropped, so every step sees a full batch).

    Given `lengths` (one per example), each window of `window` batches of that random order is
    sorted by length, cut into batches and the batches shuffled (bucketing): a right-padded batch
    then holds rows of similar length, so less of its compute goes to padding (about half of a
    random batch of the tiny chat data), while the window keeps the batches mixed."""

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None, window: int = 8):
        if n < batch_size:
            raise ValueError(f"{n} examples, fewer than one batch of {batch_size}")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.n, self.batch_size, self.seed, self.lengths, self.window = n, batch_size, seed, lengths, window
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def epoch_order(self) -> np.ndarray:
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        if self.lengths is None:
            self._cached = (self.epoch, order)
            return order
        B, w = self.batch_size, self.batch_size * self.window
        full = self.n // B * B  # the partial batch at the end stays there (it is dropped)
        for lo in range(0, full, w):
            chunk = order[lo:min(lo + w, full)]
            chunk = chunk[np.argsort([self.lengths[i] for i in chunk], kind="stable")].reshape(-1, B)
            order[lo:lo + chunk.size] = chunk[rng.permutation(len(chunk))].reshape(-1)
        self._cached = (self.epoch, order)
        return order

    def next(self) -> list[int]:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_order()[self.position:self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return batch


def pair_scores(margins: torch.Tensor) -> list[float]:
    """(B,) margins (chosen minus rejected) -> 1 for a pair ranked right, 0.5 for a tie, 0 for wrong:
    a model that scores both replies alike (DPO's policy at step 0) is at chance, 0.5, not at 0."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).tolist()


def accuracy_by_task(pairs: list[Pair], scores: list[float], name: str) -> dict[str, float]:
    """{f"{name}/<task>": mean of `scores` over the pairs of each task}, for pairs that have a task."""
    return _mean_by(pairs, scores, name, "task")


def accuracy_by_kind(pairs: list[Pair], scores: list[float], name: str) -> dict[str, float]:
    """{f"{name}/<kind>": mean of `scores` over the pairs of each kind}, for pairs that have a kind."""
    return _mean_by(pairs, scores, name, "kind")


def _mean_by(pairs: list[Pair], scores: list[float], name: str, attr: str) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for pair, s in zip(pairs, scores):
        if getattr(pair, attr):
            groups.setdefault(getattr(pair, attr), []).append(s)
    return {f"{name}/{g}": sum(v) / len(v) for g, v in sorted(groups.items())}


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval, 1.96 * sd / sqrt(n) (sd with n - 1): for paired
    differences, which can be negative."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, 1.96 * math.sqrt(var / n)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% score interval (lo, hi) for a share p of n (Wilson 1927): unlike p ± 1.96 sd it does
    not shrink to nothing at 0 or 1, where near-miss pairs sit. A tie's half counts as half a success."""
    if n == 0:
        return float("nan"), float("nan")
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def compare(pairs: list[Pair], scores: list[float], baselines: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per group of pairs (all, each kind, each kind and task): n, the accuracy with its Wilson
    95% interval (lo, hi; ci95 is half its width), and for each named baseline scored on the same pairs
    its accuracy and interval, and the paired difference (accuracy minus baseline) with the normal 95%
    half-width over the per-pair differences."""
    groups: dict[str, list[int]] = {"all": list(range(len(pairs)))}
    for i, p in enumerate(pairs):
        if p.kind:
            groups.setdefault(p.kind, []).append(i)
            groups.setdefault(f"{p.kind}/{p.task or '-'}", []).append(i)
    rows = []
    for group, idx in sorted(groups.items(), key=lambda g: (g[0] != "all", "/" in g[0], g[0])):
        row: dict[str, Any] = {"pairs": group, "n": len(idx)}
        for name, values in {"acc": scores, **baselines}.items():
            value = sum(values[i] for i in idx) / len(idx)
            lo, hi = wilson(value, len(idx))
            row |= {name: value, f"{name}_lo": lo, f"{name}_hi": hi, f"{name}_ci95": (hi - lo) / 2}
        row["ci95"] = row.pop("acc_ci95")
        for name, base in baselines.items():
            row[f"gain_over_{name}"], row[f"gain_over_{name}_ci95"] = mean_ci95([scores[i] - base[i] for i in idx])
        rows.append(row)
    return rows


def compare_markdown(rows: list[dict[str, Any]], label: str, baselines: dict[str, str]) -> str:
    """The rows of `compare` as a markdown table: accuracy [95%], each baseline [95%], the gain ± 95%."""
    head = f"| pairs | n | {label} | " + " | ".join(f"{title} | gain over it" for title in baselines.values()) + " |"
    lines = [head, "|---|---|---|" + "---|---|" * len(baselines)]
    for r in rows:
        cells = [f"{r[n]:.3f} [{r[f'{n}_lo']:.3f}, {r[f'{n}_hi']:.3f}] | "
                 f"{r[f'gain_over_{n}']:+.3f} ± {r[f'gain_over_{n}_ci95']:.3f}" for n in baselines]
        lines.append(f"| {r['pairs']} | {r['n']} | {r['acc']:.3f} [{r['acc_lo']:.3f}, {r['acc_hi']:.3f}] | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def token_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) ids -> (B, T - 1) log p(ids[:, t + 1] | ids[:, :t + 1]) in fp32. Given mask (B, T - 1)
    bool, the head and the softmax run only where it is True (models/gpt.GPT.forward's `at`) and
    the other entries are 0."""
    targets = ids[:, 1:]
    if mask is None:
        logits, _ = model(ids[:, :-1])  # (B, T-1, V)
        # -cross_entropy is log_softmax + gather without materialising a second (B, T, V) tensor
        return -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    logits, _ = model(ids[:, :-1], at=mask)  # (N, V)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=ids.device)
    return out.masked_scatter(mask, -F.cross_entropy(logits.float(), targets[mask], reduction="none"))


def sequence_logps(model: torch.nn.Module, seqs: list[list[int]], masks: list[list[bool]], pad_id: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs of the masked (response) tokens of each sequence (B,), and their counts (B,)."""
    ids = pad_right(seqs, pad_id, device)  # (B, T)
    mask = pad_right(masks, False, device, torch.bool)[:, 1:]  # (B, T-1): target t is token t + 1
    logps = token_logps(model, ids, mask)  # (B, T-1), 0 off the mask
    return logps.sum(dim=1), mask.sum(dim=1)

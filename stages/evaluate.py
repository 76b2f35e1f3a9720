"""Evaluate: every member of the family on the test split, its promotion gates, and the family report.

What: reads every member the recipe builds, the prompts and chat data, rag's evaluation and the data
stages' outputs (the DAG's "everything -> evaluate": OPTIONAL_INPUTS, so a recipe without a member,
say no vl, shows that member as absent instead of failing) and writes
`report`, a directory with evaluation.json (every figure below, the gates, the model cards),
report.html (one self-contained page, plots inline as PNG: stages/report/) and summary.txt (what
`family report` prints). The flow sets the MLflow alias `champion` on the registered version of
every member that passes all its gates (stages never talk to the registry).

Measured here, on the `prompts` rows of split "test" (no stage trains on them or picks a setting by
them): the first `test_per_task` of each task by id, the same rows for every member.
- The chat line base -> sft -> dpo -> grpo, and small (distilled from grpo): greedy zero-shot
  accuracy per task, graded by each row's verifier (stages/chat/evaluate.py), with Wilson 95%
  intervals, next to the trivial baseline (the task's most common train answer, graded the same way).
  The base model never saw a chat turn: it is asked in plain "Question: ...\nAnswer:" text, the
  shape of what it read (after `base_shots` solved train examples when > 0, as sft's base
  evaluation), and the first non-empty line of its greedy completion is graded.
- Likelihood ranking (rank_acc), for each of `rank_members`: is the reference answer more likely
  than `rank_distractors` other test answers of the same task (summed log-probability of the answer
  given the prompt; for chat models the answer and its <|im_end|>)? A fair reading of a base model
  that cannot yet answer in a chat turn; chance is 1 / (distractors + 1) (rank_chance).
- Paired deltas along the lineage (base -> sft -> dpo -> grpo; grpo -> small; fp32 -> int8/int4) on
  the same prompts: the difference of accuracies with its Wald interval over the per-prompt
  differences, and McNemar's exact test (two-sided binomial test on the discordant pairs).
- Sampling, for each of `sample_members` (grpo and its start, dpo): `samples` completions per prompt
  at T = 1 for the first `sample_per_task` prompts per task: pass@1 and pass@k with the unbiased
  estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1), normal
  intervals over prompts, and the paired pass@1 delta against the start; headroom@n, the share of
  those prompts that greedy decoding gets wrong and one of the n samples right (what sharpening the
  sampling toward its right answers, GRPO's effect at this scale, can at most add to greedy accuracy).
- The reward model and DPO on the first `pair_rows` test preference pairs, per kind of rejected reply
  (stages/chat/pair_eval.py): the reward model against its untrained prior (the SFT likelihood), DPO's
  implicit reward against chance 0.5, with the paired differences and their intervals.
- Quantized members against their fp32 model: the relative increase of the assistant-token loss on
  `loss_rows` test conversations of `chat` (a percentile bootstrap interval over conversations,
  paired: both models on the same resamples) and greedy accuracy on the first `quant_per_task`
  prompts per task, paired. Sizes are the bytes of the weight files.
Read from the members' own published results (result.json beside each output), where their stages
already measure on held-out data with intervals: retrieval (test queries: BM25 -> dense -> hybrid ->
reranked, with their paired bootstrap intervals), vl (test images: accuracy against the blind
baseline, text retention against the chat model), the reward model's and DPO's val figures and rag
(as recorded, split named), the data funnel (the data stages' counts). Training curves (loss, lr, val) come from each
training stage's MLflow run (its id is in its result.json), else from the curve it recorded.

Figures (evaluation.json "figures", and the stage's metrics; <m> is a member's output name):
<m>/acc, <m>/acc_lo, <m>/acc_hi (and /<task>: <m>/acc/arith, <m>/acc_lo/arith, ...), <m>/baseline
(the most common answer on <m>'s prompts), <m>/prompts, majority/acc..., <m>/rank_acc..., rank_chance,
<m>/pass@1, <m>/pass@<k>, <m>/headroom@<n> (with _lo, _hi), reward_model|dpo|dpo_policy/pair_acc[/<kind>]
(_lo, _hi), reward_model_vs_prior|dpo_vs_chance|dpo_policy_vs_ref/pair_acc_delta[/<kind>] (_lo, _hi), <new>_vs_<old>/acc_delta (_lo, _hi), <new>_vs_<old>/
acc_mcnemar_p, <new>_vs_<old>/rank_acc_delta..., grpo_vs_dpo/pass@1_delta..., <q>/loss_increase
(_lo, _hi), <m>/test_loss, <m>/bytes; recorded: bm25|embedder|hybrid|reranker/ndcg@10|mrr@10|
recall@10|recall@50 (_lo, _hi), embedder_vs_bm25/ndcg@10_delta, hybrid_vs_bm25/...,
reranker_vs_hybrid/..., <embedder|reranker>/baseline, vl/acc (_lo, _hi; per task vl/acc/<task>,
vl/blind_acc/<task>, ...), vl/blind_acc, vl/baseline, vl_vs_blind/acc_delta, vl_vs_grpo/
val_text_acc_delta (val prompts, as vl measured it). lm_eval/agreement, when lm_eval_prompts > 0
and stages/chat/lm_eval_check.py imports (lm_eval_hook). The headline (evaluation.json "headline",
`family status --json`) is one test figure per member with its interval and baseline.

Gates (`gates`, per member output name): {metric: {min|max: threshold}}, a threshold being a number
or another figure of this evaluation ("sft/acc_lo"). A member passes when every rule holds; a
member that is absent, or a figure that was not measured, fails its rule with that reason.

Deviation from "evaluate everything again": figures a member's stage already measured on test with
intervals are read, not recomputed (retrieval, vl); recomputing them would cost minutes for the
same numbers.

Run:
    python -m stages.evaluate --config c.json --inputs i.json --run-dir DIR
    with i.json mapping any of INPUTS to their paths, e.g. {"prompts": DIR, "chat": DIR, "sft": DIR, "grpo": DIR}
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.generate import generate
from models.gpt import GPT
from models.quant import load_model
from models.tokenizer import Tokenizer
from stages.chat.evaluate import complete, few_shot_prompt, generate_answers, pick_heldout, prompt_ids
from stages.chat.pair_eval import pair_figures
from stages.chat.preference import sequence_logps
from stages.chat.preference import wilson as preference_wilson
from stages.chat.verifiers import verify
from stages.contract import StageContext, StageError, StageResult, main
from stages.report import html
from stages.report.cards import card
from stages.report.gates import check_gates, evaluate_gates, promoted
from stages.report.recorded import curves, funnel, read_record, retrieval, vision, weights
from storage.artifacts import Artifact
from storage.parquet import iter_rows

# the chat line and what each member came from (the lineage the paired deltas follow)
CHAT_LINE = {"base": None, "sft": "base", "dpo": "sft", "grpo": "dpo", "small": "grpo"}
QUANTIZED = {"chat_int8": "grpo", "chat_int4": "grpo", "small_int8": "small", "small_int4": "small"}
MEMBERS = {  # output name -> what it is
    "base": "pretrained base model", "sft": "SFT chat model", "dpo": "DPO chat model",
    "grpo": "GRPO chat model (the final chat model)", "reward_model": "reward model",
    "small": "distilled small chat model", "chat_int8": "chat model, int8 weights", "chat_int4": "chat model, int4 weights",
    "small_int8": "small model, int8 weights", "small_int4": "small model, int4 weights",
    "embedder": "dense embedder", "reranker": "cross-encoder reranker", "vl": "vision-language model",
}
DATA = ("pages", "docs", "docs_dedup", "docs_clean", "tokens")  # the data stages' outputs: the funnel
INPUTS = ("prompts", "chat", "prefs", *MEMBERS, "rag_eval", *DATA)
OPTIONAL_INPUTS = INPUTS  # the recipe wires those it produces (flows/recipe.py); the rest are absent
OUTPUTS = ("report",)
GPU = True
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Config:
    test_per_task: int = 300  # test prompts per task (the first by id), the same for every member
    max_new_tokens: int = 96  # a worked two-step word problem takes ~80 tokens
    batch_size: int = 64
    base_shots: int = 0  # solved train examples before each base-model question (fewer if they do not fit)
    base_new_tokens: int = 16  # the base model's answer is its completion's first non-empty line
    rank_distractors: int = 3  # other test answers of the task each reference is ranked against
    rank_members: tuple[str, ...] = ("base", "sft", "dpo", "grpo", "small")  # likelihood ranking (4 forwards a prompt)
    sample_members: tuple[str, ...] = ("dpo", "grpo")  # sampled at T = 1 for pass@k (grpo against its start)
    sample_per_task: int = 50
    samples: int = 4  # n completions per prompt
    pass_k: int = 4  # k of pass@k (<= samples)
    quant_per_task: int = 100  # greedy prompts per task for the quantized members (paired with fp32)
    loss_rows: int = 256  # test conversations of `chat` for the quantized members' loss increase
    bootstrap: int = 1000  # resamples of the loss-increase interval
    pair_rows: int = 512  # test preference pairs the reward model and DPO rank (stages/chat/pair_eval.py); 0: none
    lm_eval_prompts: int = 0  # > 0: lm-eval's agreement with our greedy answers on this many test prompts (lm_eval_hook)
    lm_eval_docs: int = 0  # > 0: lm-eval's rolling log-likelihood of this many held-out docs against the base model's bpb
    # member output name -> {figure: {min|max: number or "member/figure"}}
    gates: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("test_per_task", "max_new_tokens", "batch_size", "base_new_tokens", "samples", "pass_k", "bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("base_shots", "rank_distractors", "sample_per_task", "quant_per_task", "loss_rows",
                     "lm_eval_prompts", "lm_eval_docs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pass_k > self.samples:
            raise ValueError(f"pass_k ({self.pass_k}) must be <= samples ({self.samples})")
        unknown = [m for m in self.sample_members if m not in CHAT_LINE or m == "base"]
        if unknown:
            raise ValueError(f"sample_members: {sorted(unknown)} are not chat models (choose from sft, dpo, grpo, small)")
        unknown = [m for m in self.rank_members if m not in CHAT_LINE]
        if unknown:
            raise ValueError(f"rank_members: {sorted(unknown)} are not chat-line models (choose from {', '.join(CHAT_LINE)})")
        check_gates(self.gates, MEMBERS)


def inputs(cfg: Config) -> tuple[str, ...]:
    """None is required: every input is optional (OPTIONAL_INPUTS) and an absent one is an absent member."""
    return ()


# -- statistics ----------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (stages/chat/preference.py `wilson`); (0, 1) for n = 0."""
    return preference_wilson(k / n, n, z) if n else (0.0, 1.0)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: 2 P[X <= min(b, c)], X ~ Bin(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_delta(old: list[bool], new: list[bool], z: float = Z95) -> dict[str, float]:
    """new - old on the same prompts: the accuracy difference, its Wald interval over the per-prompt
    differences d_i in {-1, 0, 1}, McNemar's exact p, and the discordant counts (gained, lost)."""
    n = len(old)
    if n == 0 or n != len(new):
        raise ValueError(f"paired_delta needs two equally long non-empty lists, got {len(old)} and {len(new)}")
    gained = sum(1 for a, b in zip(old, new) if b and not a)
    lost = sum(1 for a, b in zip(old, new) if a and not b)
    d = (gained - lost) / n
    se = math.sqrt(max(0.0, (gained + lost) / n - d * d) / n)
    return {"delta": d, "lo": d - z * se, "hi": d + z * se, "p": mcnemar_exact(gained, lost), "gained": gained,
            "lost": lost, "n": n}


def headroom(greedy: list[bool], sampled: list[int]) -> list[float]:
    """Per prompt, 1.0 where greedy decoding is wrong and one of the samples right (c > 0 of n): what
    sharpening the sampling toward its right answers (GRPO at this scale) can at most turn into greedy
    accuracy on these prompts."""
    return [float(not g and c > 0) for g, c in zip(greedy, sampled, strict=True)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean of per-prompt values and its normal 95% interval (sample standard deviation)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return 0.0, 0.0, 1.0
    m = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return m, m - z * se, m + z * se


def loss_increase(fp_nll: list[float], q_nll: list[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Relative increase of the summed loss, sum(q) / sum(fp) - 1, over the same conversations, and
    its 95% percentile bootstrap interval (both models on every resample: a paired interval)."""
    fp, q = np.asarray(fp_nll, dtype=float), np.asarray(q_nll, dtype=float)
    point = float(q.sum() / fp.sum() - 1.0)
    idx = np.random.default_rng(seed).integers(0, len(fp), size=(n_boot, len(fp)))
    ratios = q[idx].sum(1) / fp[idx].sum(1) - 1.0
    return point, float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


# -- data ----------------------------------------------------------------------------------------


def first_per_task(rows: list[dict[str, Any]], per_task: int) -> list[int]:
    """Indices of the first per_task rows of each task (rows in pick_heldout order)."""
    seen: Counter = Counter()
    out = []
    for i, r in enumerate(rows):
        task = r["task"] or "all"
        if seen[task] < per_task:
            out.append(i)
            seen[task] += 1
    return out


def distractors(rows: list[dict[str, Any]], k: int, seed: int) -> list[list[str]]:
    """Per row, up to k other answers of test rows of its task that its verifier rejects, drawn with
    a generator seeded by the row's id (the same distractors in every run and for every member)."""
    answers: dict[str, list[str]] = {}
    for r in rows:
        answers.setdefault(r["task"] or "all", []).append(r["answer"])
    out = []
    for r in rows:
        pool = sorted({a for a in answers[r["task"] or "all"] if not verify(r["verifier"], a, r["answer"])})
        out.append(random.Random(f"{seed}:{r['id']}").sample(pool, min(k, len(pool))))
    return out


def majority_correct(train_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[bool]:
    """The trivial baseline per row: the task's most common train answer, graded by the row's verifier."""
    counts: dict[str, Counter] = {}
    for r in train_rows:
        counts.setdefault(r["task"] or "all", Counter())[r["answer"]] += 1
    guess = {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}
    return [bool(verify(r["verifier"], guess.get(r["task"] or "all", ""), r["answer"])) for r in rows]


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# -- measurements --------------------------------------------------------------------------------


def base_prompts(tok: Tokenizer, rows: list[dict[str, Any]], shot_pool: list[dict[str, Any]], shots: int, max_len: int,
                 seed: int) -> list[list[int]]:
    """Few-shot "Question:/Answer:" prompts (stages/chat/evaluate.few_shot_prompt); shots drawn per row
    from train rows of its task with a seeded generator, dropped from the end while the prompt does
    not fit in max_len tokens."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for s in shot_pool:
        by_task.setdefault(s["task"] or "all", []).append(s)
    rng = random.Random(seed)
    out = []
    for row in rows:
        pool = [s for s in by_task.get(row["task"] or "all", []) if s["prompt"] != row["prompt"]]
        chosen = rng.sample(pool, min(shots, len(pool)))
        ids = few_shot_prompt(tok, row, chosen, "text")
        while len(ids) > max_len and chosen:
            chosen.pop()
            ids = few_shot_prompt(tok, row, chosen, "text")
        out.append(ids[-max_len:])
    return out


@torch.no_grad()
def answer_logps(model: GPT, seqs: list[list[int]], masks: list[list[bool]], pad_id: int, batch_size: int) -> list[float]:
    """Summed log-probability of the masked tokens of each sequence given the tokens before them
    (stages/chat/preference.sequence_logps: the head and the softmax run only at the masked
    positions), in batches of similar length, right-padded (causal attention: a real token never
    sees the padding after it)."""
    device = next(model.parameters()).device
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        sums, _ = sequence_logps(model, [seqs[j] for j in chunk], [masks[j] for j in chunk], pad_id, device)
        for j, v in zip(chunk, sums.tolist()):
            out[j] = v
    return out


def rank_correct(model: GPT, prompts: list[list[int]], candidates: list[list[list[int]]], pad_id: int, batch_size: int,
                 max_len: int) -> list[bool]:
    """Per prompt: does its first candidate (the reference) get a higher summed log-probability than
    every other candidate (a tie is a miss)? Sequences longer than max_len keep their last max_len tokens."""
    seqs, masks, owner = [], [], []
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        for c in cands:
            seqs.append((p + c)[-max_len:])
            masks.append(([False] * len(p) + [True] * len(c))[-max_len:])
            owner.append(i)
    scores = answer_logps(model, seqs, masks, pad_id, batch_size)
    by_prompt: dict[int, list[float]] = {}
    for i, v in zip(owner, scores):
        by_prompt.setdefault(i, []).append(v)
    # a prompt whose task has no other answer has one candidate: ranked first, as its chance (1) says
    return [len(s) == 1 or s[0] > max(s[1:]) for s in (by_prompt[i] for i in range(len(prompts)))]


@torch.no_grad()
def sampled_counts(model: GPT, tok: Tokenizer, rows: list[dict[str, Any]], n: int, max_new_tokens: int, batch_size: int,
                   seed: int) -> list[int]:
    """Per row, how many of n completions sampled at T = 1 its verifier accepts."""
    ids = [prompt_ids(tok, r["prompt"]) for r in rows for _ in range(n)]
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    right = [0] * len(rows)
    for lo in range(0, len(ids), batch_size):
        outs = generate(model, ids[lo:lo + batch_size], max_new_tokens, temperature=1.0, generator=g,
                        stop_ids=(tok.im_end_id, tok.eot_id), pad_id=tok.pad_id)
        for j, toks in enumerate(outs, start=lo):
            r = rows[j // n]
            right[j // n] += bool(verify(r["verifier"], tok.decode(toks, skip_special_tokens=True).strip(), r["answer"]))
    return right


def conversation_nll(model: GPT, encoded: list[tuple[list[int], list[bool]]], pad_id: int, batch_size: int) -> list[float]:
    """Summed next-token NLL of the assistant tokens of each encoded conversation (ids, mask)."""
    return [-v for v in answer_logps(model, [ids for ids, _ in encoded], [m for _, m in encoded], pad_id, batch_size)]


def lm_eval_hook(model_dir: Path, rows: list[dict[str, Any]], completions: list[str], max_new_tokens: int) -> dict[str, float]:
    """lm-eval's agreement with our greedy answers (stages/chat/lm_eval_check.py; lm-eval is installed
    by the set-up): {"lm_eval/agreement", "lm_eval/acc", "lm_eval/our_acc", ...}; {} when lm-eval is
    not installed (the report then shows the check as not run)."""
    from stages.chat.lm_eval_check import agreement

    try:
        got = agreement(model_dir / "hf", rows, completions, max_new_tokens)
    except ImportError:
        return {}
    return {"lm_eval/agreement": got["agreement"], "lm_eval/acc": got["lm_eval_acc"], "lm_eval/our_acc": got["our_acc"],
            "lm_eval/prompts": float(got["n"]), "lm_eval/token_mismatches": float(got["token_mismatches"])}


def lm_eval_bpb_hook(base_dir: Path, tokens_dir: Path, n_docs: int) -> dict[str, float]:
    """lm-eval's rolling log-likelihood of the first n_docs held-out (val) documents of the tokenizer
    stage against our bits per byte of the same documents with the base model: {"lm_eval/bpb",
    "lm_eval/our_bpb", "lm_eval/bpb_rel_diff"}; {} when lm-eval is not installed."""
    from stages.chat.lm_eval_check import heldout_docs, rolling_bpb

    try:
        docs = heldout_docs(tokens_dir, Tokenizer.load(base_dir))[:n_docs]
        got = rolling_bpb(base_dir / "hf", docs)
    except ImportError:
        return {}
    return {"lm_eval/bpb": got["lm_eval_bpb"], "lm_eval/our_bpb": got["our_bpb"], "lm_eval/bpb_rel_diff": got["bpb_rel_diff"],
            "lm_eval/docs": float(got["docs"])}


@dataclass
class Measured:
    """What one member did on the test rows (indices into them), per row: the raw material of every figure."""

    idx: list[int]
    correct: list[bool]  # greedy answer accepted by the verifier
    ranked: list[bool] = field(default_factory=list)  # reference ranked first (same idx), chat line only
    sample_idx: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)  # correct samples of cfg.samples per row of sample_idx
    nll: list[float] = field(default_factory=list)  # per test conversation of `chat`
    examples: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    lm_eval: dict[str, float] = field(default_factory=dict)  # the third-party evaluator's figures (grpo)
    seconds: float = 0.0


def measure(name: str, model: GPT, tok: Tokenizer, model_dir: Path, cfg: Config, data: dict[str, Any], seed: int
            ) -> Measured:
    """Every measurement of one member on the test rows of `data` (see the module docstring)."""
    t0 = time.perf_counter()
    rows, max_len = data["rows"], model.cfg.max_seq_len
    idx = data["quant_idx"] if name in QUANTIZED else list(range(len(rows)))
    sub = [rows[i] for i in idx]
    if name == "base":
        prompts = base_prompts(tok, sub, data["train"], cfg.base_shots, max_len - cfg.base_new_tokens, seed)
        raw = complete(model, tok, prompts, cfg.base_new_tokens, cfg.batch_size, stop_ids=(tok.eot_id, tok.im_start_id))
        answers = [first_line(a) for a in raw]
        cands = [[tok.encode(" " + a) for a in [r["answer"], *d]] for r, d in zip(sub, data["distractors"])]
    else:
        prompts = [prompt_ids(tok, r["prompt"]) for r in sub]
        answers = generate_answers(model, tok, [r["prompt"] for r in sub], cfg.max_new_tokens, cfg.batch_size)
        cands = [[tok.encode(a) + [tok.im_end_id] for a in [r["answer"], *d]] for r, d in zip(sub, data["distractors"])]
    m = Measured(idx, [bool(verify(r["verifier"], a, r["answer"])) for r, a in zip(sub, answers)])
    seen: set[str] = set()
    for r, a, ok in zip(sub, answers, m.correct):  # one example per task for the model card
        if (r["task"] or "all") not in seen:
            seen.add(r["task"] or "all")
            m.examples.append({"task": r["task"], "prompt": r["prompt"][-1]["content"], "answer": r["answer"],
                               "completion": a, "correct": ok})
    if name in cfg.rank_members and cfg.rank_distractors > 0:
        m.ranked = rank_correct(model, prompts, cands, tok.pad_id, cfg.batch_size, max_len)
    if name in cfg.sample_members and data["sample_idx"]:
        m.sample_idx = data["sample_idx"]
        m.sampled = sampled_counts(model, tok, [rows[i] for i in m.sample_idx], cfg.samples, cfg.max_new_tokens,
                                   cfg.batch_size, seed)
    if data["conversations"] and (name in QUANTIZED or name in QUANTIZED.values()):
        encoded = [(ids[:max_len], mask[:max_len]) for ids, mask in (tok.encode_chat(c) for c in data["conversations"])]
        m.nll = conversation_nll(model, encoded, tok.pad_id, cfg.batch_size)
        m.extra["test_loss"] = sum(m.nll) / max(1, sum(sum(mask[1:]) for _, mask in encoded))
    if name == "grpo" and cfg.lm_eval_prompts > 0:  # lm-eval's agreement on the chat model's first test prompts
        pick = first_per_task(sub, -(-cfg.lm_eval_prompts // max(1, len({r["task"] for r in sub}))))
        m.lm_eval = lm_eval_hook(model_dir, [sub[i] for i in pick], [answers[i] for i in pick], cfg.max_new_tokens)
    m.seconds = time.perf_counter() - t0
    return m


# -- the evaluation ------------------------------------------------------------------------------


def evaluation_data(cfg: Config, inputs: dict[str, Artifact], seed: int) -> dict[str, Any]:
    """The test rows every chat-line member answers, and what goes with them; {} when there is no
    chat model or no prompts to ask it."""
    if "prompts" not in inputs or not any(n in inputs for n in (*CHAT_LINE, *QUANTIZED)):
        return {}
    every = list(iter_rows(inputs["prompts"].path))
    rows = pick_heldout(every, cfg.test_per_task, split="test")
    if not rows:
        raise StageError(f"evaluate: the prompts at {inputs['prompts'].path} have no rows of split 'test' (splits: "
                         f"{', '.join(sorted({str(r['split']) for r in every})) or 'none'}); rebuild instruct with a test split")
    train = [r for r in every if r["split"] == "train"]
    conversations = []
    if "chat" in inputs:
        test_chat = sorted((r for r in iter_rows(inputs["chat"].path) if r["split"] == "test"), key=lambda r: r["id"])
        conversations = [r["messages"] for r in test_chat[:cfg.loss_rows]]
    return {"rows": rows, "train": train, "majority": majority_correct(train, rows),
            "distractors": distractors(rows, cfg.rank_distractors, seed), "quant_idx": first_per_task(rows, cfg.quant_per_task),
            "sample_idx": first_per_task(rows, cfg.sample_per_task) if cfg.sample_per_task else [],
            "conversations": conversations}


def proportion(values: list[bool]) -> dict[str, float]:
    k, n = sum(values), len(values)
    lo, hi = wilson(k, n)
    return {"acc": k / n if n else 0.0, "lo": lo, "hi": hi, "n": n}


def share(name: str, figure: str, rows: list[dict[str, Any]], idx: list[int], values: list[bool]
          ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """{name/figure, _lo, _hi, and per task name/figure/<task>, ...} and the per-task proportions."""
    by_task: dict[str, list[bool]] = {}
    for i, v in zip(idx, values):
        by_task.setdefault(rows[i]["task"] or "all", []).append(v)
    tasks = {t: proportion(v) for t, v in sorted(by_task.items())}
    p = proportion(values)
    out = {f"{name}/{figure}": p["acc"], f"{name}/{figure}_lo": p["lo"], f"{name}/{figure}_hi": p["hi"]}
    for t, q in tasks.items():
        out |= {f"{name}/{figure}/{t}": q["acc"], f"{name}/{figure}_lo/{t}": q["lo"], f"{name}/{figure}_hi/{t}": q["hi"]}
    return out, tasks


def aligned(a_idx: list[int], a: list[Any], b_idx: list[int], b: list[Any]) -> tuple[list[Any], list[Any]]:
    """The values of two members on the rows both answered, in row order."""
    bmap = dict(zip(b_idx, b))
    both = [(v, bmap[i]) for i, v in zip(a_idx, a) if i in bmap]
    return [x for x, _ in both], [y for _, y in both]


def chat_summary(cfg: Config, data: dict[str, Any], measured: dict[str, Measured], sizes: dict[str, dict[str, Any]]
                 ) -> dict[str, Any]:
    """Figures, per-task tables, paired deltas, sampling and quantization rows, headline entries of
    the members measured here."""
    rows = data["rows"]
    figures: dict[str, float] = {}
    tasks: dict[str, dict] = {}
    rank: dict[str, dict] = {}
    headline, deltas, sampling, quant = [], [], [], []
    majority, tasks_base = share("majority", "acc", rows, list(range(len(rows))), data["majority"])
    figures |= majority
    chance = [1 / (1 + len(d)) for d in data["distractors"]]
    figures["rank_chance"] = sum(chance) / len(chance)
    for name, m in measured.items():
        f, tasks[name] = share(name, "acc", rows, m.idx, m.correct)
        figures |= f | {f"{name}/prompts": float(len(m.idx)),
                        f"{name}/baseline": sum(data["majority"][i] for i in m.idx) / len(m.idx)}
        if m.ranked:
            f, rank[name] = share(name, "rank_acc", rows, m.idx, m.ranked)
            figures |= f
        if m.sampled:
            k = cfg.pass_k
            greedy, _ = aligned(m.idx, m.correct, m.sample_idx, m.sampled)
            figs = [("greedy acc", mean_interval([float(x) for x in greedy])),
                    ("pass@1", mean_interval([c / cfg.samples for c in m.sampled])),
                    (f"pass@{k}", mean_interval([pass_at_k(cfg.samples, c, k) for c in m.sampled])),
                    (f"headroom@{cfg.samples}", mean_interval(headroom(greedy, m.sampled)))]
            for label, (v, lo, hi) in figs[1:]:
                figures |= {f"{name}/{label}": v, f"{name}/{label}_lo": lo, f"{name}/{label}_hi": hi}
            sampling.append({"member": name, "n": cfg.samples, "prompts": len(m.sampled),
                             "figures": [{"figure": label, "value": v, "lo": lo, "hi": hi} for label, (v, lo, hi) in figs]})
        figures |= {f"{name}/{k}": v for k, v in m.extra.items()}
        if name == "base" and m.ranked:  # the base model's fair reading: ranking, against chance
            entry = ("rank_acc", figures["rank_chance"], "chance")
        else:
            entry = ("acc", figures[f"{name}/baseline"], "most common answer")
        headline.append({"member": name, "figure": entry[0], "value": figures[f"{name}/{entry[0]}"],
                         "lo": figures[f"{name}/{entry[0]}_lo"], "hi": figures[f"{name}/{entry[0]}_hi"], "baseline": entry[1],
                         "baseline_name": entry[2], "split": "test", "n": len(m.idx)})
    for new, old in (*CHAT_LINE.items(), *QUANTIZED.items()):
        if old is None or new not in measured or old not in measured:
            continue
        a, b = measured[old], measured[new]
        for figure, av, bv in (("acc", a.correct, b.correct), ("rank_acc", a.ranked, b.ranked)):
            if av and bv:
                x, y = aligned(b.idx, bv, a.idx, av)
                d = paired_delta(y, x)
                deltas.append({"from": old, "to": new, "figure": figure, **d, "test": "McNemar exact, Wald interval"})
                figures |= {f"{new}_vs_{old}/{figure}_delta": d["delta"], f"{new}_vs_{old}/{figure}_delta_lo": d["lo"],
                            f"{new}_vs_{old}/{figure}_delta_hi": d["hi"], f"{new}_vs_{old}/{figure}_mcnemar_p": d["p"]}
        if a.sampled and b.sampled:
            x, y = aligned(b.sample_idx, b.sampled, a.sample_idx, a.sampled)
            v, lo, hi = mean_interval([(bx - ay) / cfg.samples for bx, ay in zip(x, y)])
            deltas.append({"from": old, "to": new, "figure": "pass@1", "delta": v, "lo": lo, "hi": hi, "n": len(x),
                           "test": "paired normal"})
            figures |= {f"{new}_vs_{old}/pass@1_delta": v, f"{new}_vs_{old}/pass@1_delta_lo": lo,
                        f"{new}_vs_{old}/pass@1_delta_hi": hi}
    for name, src in QUANTIZED.items():
        if name in measured and src in measured and measured[name].nll and measured[src].nll:
            inc, lo, hi = loss_increase(measured[src].nll, measured[name].nll, cfg.bootstrap)
            figures |= {f"{name}/loss_increase": inc, f"{name}/loss_increase_lo": lo, f"{name}/loss_increase_hi": hi}
            model, variant = name.split("_")  # chat_int4 -> chat, int4
            if not any(r["member"] == src for r in quant):
                quant.append({"model": model, "variant": "fp32", "member": src, "bytes": sizes[src]["bytes"],
                              "test_loss": measured[src].extra["test_loss"], "increase": 0.0, "lo": 0.0, "hi": 0.0})
            quant.append({"model": model, "variant": variant, "member": name, "bytes": sizes[name]["bytes"],
                          "test_loss": measured[name].extra["test_loss"], "increase": inc, "lo": lo, "hi": hi})
    for name, w in sizes.items():
        figures[f"{name}/bytes"] = float(w["bytes"])
    return {"figures": figures, "tasks": tasks, "baseline": tasks_base, "rank": rank, "headline": headline,
            "deltas": deltas, "sampling": sampling, "quantization": quant}


def summarize(cfg: Config, data: dict[str, Any], measured: dict[str, Measured], records: dict[str, dict[str, Any]],
              sizes: dict[str, dict[str, Any]], training_curves: dict[str, Any], fingerprint: str,
              pairs: tuple[dict[str, float], list[dict[str, Any]]] = ({}, [])) -> dict[str, Any]:
    """evaluation.json: every figure, the gates and the model cards (pure: no model, no file); `pairs`
    is pair_figures' (figures, table) on the test preference pairs."""
    ev = chat_summary(cfg, data, measured, sizes) if measured else {
        "figures": {}, "tasks": {}, "baseline": {}, "rank": {}, "headline": [], "deltas": [], "sampling": [], "quantization": []}
    ev["figures"] |= pairs[0]
    ev["pairs"] = pairs[1]
    if "reward_model/pair_acc" in pairs[0]:
        f = pairs[0]
        ev["headline"].append({"member": "reward_model", "figure": "pair_acc", "value": f["reward_model/pair_acc"],
                               "lo": f["reward_model/pair_acc_lo"], "hi": f["reward_model/pair_acc_hi"],
                               "baseline": f["reward_model/prior_pair_acc"], "baseline_name": "untrained prior",
                               "split": "test", "n": int(f["reward_model/pairs"])})
    rows = data.get("rows", [])
    ev |= {"fingerprint": fingerprint, "split": "test", "rank_chance": ev["figures"].get("rank_chance", 0.0),
           "prompts": {"rows": len(rows), "per_task": dict(sorted(Counter(r["task"] or "all" for r in rows).items())),
                       "conversations": len(data.get("conversations", []))}}
    fig, deltas = retrieval(records.get("embedder", {}).get("metrics", {}), records.get("reranker", {}).get("metrics", {}))
    ev["figures"] |= fig
    ev["deltas"] += deltas
    for name, base in (("embedder", "BM25"), ("reranker", "hybrid first stage")):
        if f"{name}/ndcg@10" in fig:
            ev["headline"].append({"member": name, "figure": "ndcg@10", "value": fig[f"{name}/ndcg@10"],
                                   "lo": fig.get(f"{name}/ndcg@10_lo"), "hi": fig.get(f"{name}/ndcg@10_hi"),
                                   "baseline": fig.get(f"{name}/baseline"), "baseline_name": base, "split": "test",
                                   "n": int(records[name]["metrics"].get("test_queries", 0))})
    fig, deltas, vl_rows = vision(records.get("vl", {}))
    ev["figures"] |= fig
    ev["deltas"] += deltas
    ev["vl"] = {"tasks": vl_rows}
    if "vl/acc" in fig:
        ev["headline"].append({"member": "vl", "figure": "acc", "value": fig["vl/acc"], "lo": fig["vl/acc_lo"],
                               "hi": fig["vl/acc_hi"], "baseline": fig.get("vl/baseline"),
                               "baseline_name": "blind (another image)", "split": "test",
                               "n": sum(r["test_rows"] for r in vl_rows)})
    ev["recorded"] = {name: {k: v for k, v in records[name].get("metrics", {}).items() if k.startswith(prefixes)}
                      for name, prefixes in (("reward_model", ("val_pair_acc", "val_prior_pair_acc", "val_pair_gain")),
                                             ("dpo", ("val_pref_acc", "val_logp_acc", "val_ref_logp_acc")),
                                             ("rag_eval", ("docqa_", "answer_in")))
                      if name in records}
    ev["funnel"] = funnel({k: records[k] for k in DATA if k in records})
    ev["decontam"] = (records.get("prompts") or {}).get("tables", {}).get("decontam", [])  # the instruct stage's table
    ev["curves"] = training_curves
    present = {m for m in MEMBERS if m in records or m in sizes}
    ev["members"] = {m: {"what": what, "status": "measured" if m in measured else "recorded" if m in present else "absent"}
                     for m, what in MEMBERS.items()}
    ev["gates"] = evaluate_gates(cfg.gates, ev["figures"], present)
    ev["promote"] = promoted(ev["gates"])
    heads = {h["member"]: h for h in ev["headline"]}
    sources = {**CHAT_LINE, **QUANTIZED, "reward_model": "sft", "embedder": "base", "reranker": "base", "vl": "grpo"}
    ev["cards"] = [card(m, MEMBERS[m], records.get(m, {}), sizes.get(m, {}), heads.get(m), ev["tasks"].get(m, {}),
                        ev["baseline"], measured[m].examples if m in measured else [], sources.get(m))
                   for m in MEMBERS if m in present]
    return ev


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    t0 = time.perf_counter()
    device = torch.device(ctx.device if ctx.device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    records = {name: read_record(a.path) for name, a in inputs.items()}
    sizes = {name: weights(inputs[name].path) for name in MEMBERS if name in inputs}
    data = evaluation_data(cfg, inputs, ctx.seed)

    measured: dict[str, Measured] = {}
    todo = [n for n in (*CHAT_LINE, *QUANTIZED) if n in inputs and data]
    for i, name in enumerate(todo):
        ctx.progress(i, len(todo), f"measuring {name}")
        path = Path(inputs[name].path)
        model, tok = load_model(path, device).eval(), Tokenizer.load(path)
        measured[name] = measure(name, model, tok, path, cfg, data, ctx.seed)
        del model
    pairs: tuple[dict[str, float], list[dict[str, Any]]] = ({}, [])
    if cfg.pair_rows > 0 and "prefs" in inputs and "sft" in inputs and ("reward_model" in inputs or "dpo" in inputs):
        ctx.progress(len(todo), len(todo), "preference pairs")
        pairs = pair_figures(inputs["prefs"].path, Path(inputs["sft"].path),
                             Path(inputs["reward_model"].path) if "reward_model" in inputs else None,
                             Path(inputs["dpo"].path) if "dpo" in inputs else None, cfg.pair_rows, 32, device)
    lm_eval = {k: v for m in measured.values() for k, v in m.lm_eval.items()}
    if cfg.lm_eval_docs > 0 and "base" in inputs and "tokens" in inputs:
        ctx.progress(len(todo), len(todo), "lm-eval: rolling log-likelihood")
        lm_eval |= lm_eval_bpb_hook(Path(inputs["base"].path), Path(inputs["tokens"].path), cfg.lm_eval_docs)
    ctx.progress(len(todo), len(todo), "report")

    ev = summarize(cfg, data, measured, records, sizes, curves(records, getattr(ctx.tracker, "history", None)),
                   ctx.fingerprint, pairs)
    ev["figures"] |= lm_eval
    ev["lm_eval"] = lm_eval
    out = ctx.output("report")
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(ev, indent=1, default=float))
    (out / "report.html").write_text(html.render(ev))
    (out / "summary.txt").write_text(html.text_summary(ev) + "\n")
    ctx.tracker.log_artifact(out / "report.html")

    warnings = [] if data.get("conversations") or not any(n in measured for n in QUANTIZED) else [
        "the chat dataset has no test conversations: the quantized members' loss increase is not measured"]
    metrics = {**{f"{h['member']}/{h['figure']}": h["value"] for h in ev["headline"]}, **ev["figures"],
               **{f"{n}/eval_seconds": m.seconds for n, m in measured.items()}, "eval_seconds": time.perf_counter() - t0}
    return StageResult(outputs={"report": {"promote": ev["promote"], "members": sorted(m for m, s in ev["members"].items()
                                                                                       if s["status"] != "absent")}},
                       metrics=metrics, summary=html.markdown_summary(ev), warnings=warnings,
                       tables={"headline": ev["headline"], "gates": ev["gates"]})


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))

"""The reward model and DPO on the test preference pairs (the evaluate stage's pair figures).

On the `prefs` rows of split "test" (the first `n` by id, evenly spread: in file order a near miss and
its slips sit together), each kind of rejected reply apart ("near_miss", "slip"):
- reward_model: pairwise accuracy (a tie counts half) against its untrained prior, the same model
  before its first step: a zero head plus the SFT model's own mean log-likelihood of the reply
  (models/heads.RewardModel on the SFT backbone), with the paired difference and its 95% interval;
- dpo: the implicit reward beta * (log pi - log pi_ref), pi_ref the SFT model, against chance 0.5
  (a policy that cannot tell the replies apart), and the policy's own likelihood ranking against the
  reference's (`logp`, `ref_logp`).
Accuracies carry Wilson 95% intervals (stages/chat/preference.compare). The stages themselves
report the same figures on val, where their settings were chosen.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from models.gpt import GPT
from models.heads import RewardModel
from models.tokenizer import Tokenizer
from stages.chat.preference import Pair, compare, read_pairs


def heldout_pairs(prefs_path: str | Path, tok: Tokenizer, max_len: int, n: int) -> list[Pair]:
    pairs, _ = read_pairs(prefs_path, "test", tok, max_len)
    pairs = sorted(pairs, key=lambda p: p.id)
    return pairs[:: max(1, math.ceil(len(pairs) / n))] if pairs else []


def figures_of(name: str, rows: list[dict[str, Any]], baseline: str) -> dict[str, float]:
    """<name>/pair_acc[/<kind>] with _lo, _hi; <name>/<baseline>_pair_acc[/<kind>]; and
    <name>_vs_<baseline>/pair_acc_delta[/<kind>] with _lo, _hi (the paired normal interval)."""
    out: dict[str, float] = {}
    for r in rows:
        if "/" in r["pairs"]:
            continue  # kind x task: in the table only
        at = "" if r["pairs"] == "all" else f"/{r['pairs']}"
        d, half = r[f"gain_over_{baseline}"], r[f"gain_over_{baseline}_ci95"]
        out |= {f"{name}/pair_acc{at}": r["acc"], f"{name}/pair_acc_lo{at}": r["acc_lo"], f"{name}/pair_acc_hi{at}": r["acc_hi"],
                f"{name}/{baseline}_pair_acc{at}": r[baseline], f"{name}/pairs{at}": float(r["n"]),
                f"{name}_vs_{baseline}/pair_acc_delta{at}": d, f"{name}_vs_{baseline}/pair_acc_delta_lo{at}": d - half,
                f"{name}_vs_{baseline}/pair_acc_delta_hi{at}": d + half}
    return out


@torch.no_grad()
def pair_figures(prefs_path: str | Path, sft_dir: Path, reward_dir: Path | None, dpo_dir: Path | None, n: int,
                 batch_size: int, device: torch.device) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(figures, table rows {member, baseline, pairs, n, acc, ...}) for the members given."""
    from stages import dpo as dpo_stage
    from stages import reward as reward_stage

    tok = Tokenizer.load(sft_dir)
    sft = GPT.from_pretrained(sft_dir).to(device).eval()
    pairs = heldout_pairs(prefs_path, tok, sft.cfg.max_seq_len, n)
    if not pairs:
        return {}, []
    figures: dict[str, float] = {}
    table: list[dict[str, Any]] = []
    null = contextlib.nullcontext()
    if reward_dir is not None:
        _, prior = reward_stage.evaluate(RewardModel(sft).to(device), pairs, batch_size, tok.pad_id, device, null)
        rm = RewardModel.from_pretrained(reward_dir, device=device)
        _, scores = reward_stage.evaluate(rm, pairs, batch_size, tok.pad_id, device, null)
        rows = compare(pairs, scores, {"prior": prior})
        figures |= figures_of("reward_model", rows, "prior")
        table += [{"member": "reward_model", "baseline": "untrained prior", **r} for r in rows]
        del rm
    if dpo_dir is not None:
        policy = GPT.from_pretrained(dpo_dir).to(device).eval()
        cfg = dpo_stage.Config(batch_size=batch_size)
        ref_c, ref_r = dpo_stage.reference_logps(sft, pairs, batch_size, tok.pad_id, device, null)
        _, scores = dpo_stage.evaluate_pairs(policy, pairs, ref_c, ref_r, cfg, tok.pad_id, device, null)
        rows = compare(pairs, scores["pref"], {"chance": [0.5] * len(pairs)})
        figures |= figures_of("dpo", rows, "chance")
        table += [{"member": "dpo", "baseline": "chance", **r} for r in rows]
        rows = compare(pairs, scores["logp"], {"ref": scores["ref_logp"]})
        figures |= {k.replace("dpo/", "dpo_policy/").replace("dpo_vs_ref", "dpo_policy_vs_ref"): v
                    for k, v in figures_of("dpo", rows, "ref").items()}
        table += [{"member": "dpo policy likelihood", "baseline": "reference likelihood", **r} for r in rows]
    return figures, table

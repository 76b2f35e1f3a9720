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

from pathlib import Path
from typing import Any

import torch

from models.gpt import GPT
from models.heads import RewardModel
from models.tokenizer import Tokenizer
from stages.chat.preference import Pair, compare, pair_scores, read_pairs, spread


def heldout_pairs(prefs_path: str | Path, tok: Tokenizer, max_len: int, n: int) -> list[Pair]:
    """At most n test pairs (preference.spread), ordered by length (batches pad less)."""
    pairs, _ = read_pairs(prefs_path, "test", tok, max_len)
    return sorted(spread(pairs, n), key=lambda p: (max(len(p.chosen), len(p.rejected)), p.id))


@torch.no_grad()
def pair_scores_of(model: RewardModel, pairs: list[Pair], batch_size: int, pad_id: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards (chosen, rejected) and summed response log-likelihoods (chosen, rejected), (N,) each, in
    one pass of the model (stages/reward.pair_rewards: the LM head only at the response tokens)."""
    from stages.reward import pair_rewards

    out: list[list[torch.Tensor]] = [[], [], [], []]
    model.eval()
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        rc, rr, mean_c, mean_r = pair_rewards(model, batch, pad_id, device, with_loglik=True)
        counts_c = torch.tensor([sum(p.chosen_mask[1:]) for p in batch], dtype=torch.float32, device=device)
        counts_r = torch.tensor([sum(p.rejected_mask[1:]) for p in batch], dtype=torch.float32, device=device)
        for k, v in enumerate((rc, rr, mean_c * counts_c, mean_r * counts_r)):
            out[k].append(v.float().cpu())
    return tuple(torch.cat(v) for v in out)  # type: ignore[return-value]


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
                 batch_size: int, device: torch.device, beta: float = 0.1) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(figures, table rows {member, baseline, baseline_key, pairs, n, acc, ...}) for the members given
    (baseline_key names the row's gain_over_<key> columns). The SFT
    model is run once: its mean log-likelihood is the reward model's prior (a zero head), its sum
    DPO's reference."""
    tok = Tokenizer.load(sft_dir)
    sft = GPT.from_pretrained(sft_dir).to(device).eval()
    pairs = heldout_pairs(prefs_path, tok, sft.cfg.max_seq_len, n)
    if not pairs:
        return {}, []
    figures: dict[str, float] = {}
    table: list[dict[str, Any]] = []
    prior_c, prior_r, ref_c, ref_r = pair_scores_of(RewardModel(sft).to(device), pairs, batch_size, tok.pad_id, device)
    if reward_dir is not None:
        rm = RewardModel.from_pretrained(reward_dir, device=device)
        rc, rr, _, _ = pair_scores_of(rm, pairs, batch_size, tok.pad_id, device)
        rows = compare(pairs, pair_scores(rc - rr), {"prior": pair_scores(prior_c - prior_r)})
        figures |= figures_of("reward_model", rows, "prior")
        table += [{"member": "reward_model", "baseline": "untrained prior", "baseline_key": "prior", **r} for r in rows]
        del rm
    if dpo_dir is not None:
        policy = RewardModel(GPT.from_pretrained(dpo_dir)).to(device)  # a zero head: only its likelihoods are read
        _, _, pc, pr = pair_scores_of(policy, pairs, batch_size, tok.pad_id, device)
        implicit = pair_scores(beta * ((pc - ref_c) - (pr - ref_r)))  # the sign: any beta > 0 ranks alike
        rows = compare(pairs, implicit, {"chance": [0.5] * len(pairs)})
        figures |= figures_of("dpo", rows, "chance")
        table += [{"member": "dpo", "baseline": "chance", "baseline_key": "chance", **r} for r in rows]
        rows = compare(pairs, pair_scores(pc - pr), {"ref": pair_scores(ref_c - ref_r)})
        figures |= {k.replace("dpo/", "dpo_policy/").replace("dpo_vs_ref", "dpo_policy_vs_ref"): v
                    for k, v in figures_of("dpo", rows, "ref").items()}
        table += [{"member": "dpo policy likelihood", "baseline": "reference likelihood", "baseline_key": "ref", **r}
                  for r in rows]
    return figures, table

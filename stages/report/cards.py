"""Model cards: per member, what it is, its size, what it was trained on and how, its test figures
and its limits (Mitchell et al. 2019, "Model Cards for Model Reporting", cut to what a tiny family
can say with numbers). Limits are derived from the figures, never written by hand: tasks where a
member does not beat its baseline, tasks it cannot do, and what its stage warned about."""
from __future__ import annotations

from typing import Any

# what each stage trains on (the recipe's datasets, always their train split)
DATA = {
    "pretrain": "next-token prediction on the tokenized, deduplicated and filtered corpus (train documents)",
    "sft": "chat conversations, train split (assistant tokens only)",
    "reward": "preference pairs (chosen, rejected), train split",
    "dpo": "preference pairs (chosen, rejected), train split, against the SFT model as reference",
    "grpo": "prompts with verifiable answers, train split, sampled and scored by their verifiers",
    "distill": "chat conversations, train split, with the chat model as teacher (logit distillation)",
    "quantize": "train chat conversations for calibration only (weight-only post-training quantization)",
    "embed": "query-passage pairs of the corpus, train split (contrastive)",
    "rerank": "query-passage pairs with mined negatives, train split",
    "vl": "rendered image scenes with questions, train split, mixed with text chat rows",
}
TRAINING_FIELDS = ("max_steps", "epochs", "lr", "batch_size", "beta", "group_size", "method", "bits", "temperature")


def training(record: dict[str, Any]) -> str:
    """One line: steps and the config fields that define the run. Not its seconds: the report is a
    function of the members and the config, the same bytes after a crash and a resume."""
    m, cfg = record.get("metrics", {}), record.get("config", {})
    parts = [f"{int(m['steps'])} steps"] if "steps" in m else []
    parts += [f"{k} {cfg[k]}" for k in TRAINING_FIELDS if cfg.get(k) not in (None, 0, 0.0, "")]
    return ", ".join(parts) or "not recorded"


def limits(member: str, headline: dict[str, Any] | None, tasks: dict[str, dict[str, float]],
           baseline: dict[str, dict[str, float]], record: dict[str, Any], weak: float = 0.1) -> list[str]:
    """What the figures say this member cannot be trusted with."""
    out = []
    for task, t in sorted(tasks.items()):
        b = baseline.get(task)
        if t["acc"] < weak:
            out.append(f"{task}: right on {t['acc']:.0%} of test prompts")
        elif b is not None and t["hi"] < b["acc"]:
            out.append(f"{task}: below the trivial baseline ({t['acc']:.2f} against {b['acc']:.2f})")
        elif b is not None and t["lo"] <= b["acc"]:
            out.append(f"{task}: not distinguishable from the trivial baseline ({t['acc']:.2f} against {b['acc']:.2f})")
    if headline and headline.get("baseline") is not None and headline["hi"] < headline["baseline"]:
        out.append(f"{headline['figure']} {headline['value']:.3f} is below its baseline, {headline['baseline_name']} "
                   f"({headline['baseline']:.3f})")
    if member == "base":
        out.append("not a chat model: it continues text; its answers are read from few-shot prompts")
    if member.endswith(("_int8", "_int4")):
        out.append("weight-only quantization: activations and the KV cache stay in fp32")
    out += [f"stage warning: {w}" for w in record.get("warnings", [])]
    out.append("trained only on this recipe's corpus and generated tasks: it knows little beyond them")
    return out


def card(member: str, what: str, record: dict[str, Any], weights: dict[str, Any], headline: dict[str, Any] | None,
         tasks: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]], examples: list[dict[str, Any]],
         source: str | None) -> dict[str, Any]:
    stage = record.get("stage", "")
    return {
        "member": member, "what": what, "stage": stage, "fingerprint": record.get("fingerprint", ""),
        "from": source, "params": weights.get("params"), "bytes": weights.get("bytes"),
        "data": DATA.get(stage, "not recorded"), "training": training(record), "headline": headline,
        "tasks": tasks, "limits": limits(member, headline, tasks, baseline, record), "examples": examples,
    }

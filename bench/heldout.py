"""The chat line's task accuracy on large fresh held-out sets: SFT against DPO and GRPO, with error bars.

    python -m bench.heldout [--home DIR] [--per-task N] [--seed S]

The stages score ~100 held-out prompts per task, so one task's accuracy moves by several points
from run to run, and "DPO stays within 2 points of SFT" cannot be judged from them alone. This
bench draws N new problems per generated task (arith, count, string, wordprob) from the same
generators and settings the home's instruct stage used (its config.json), with a generator seeded by
`--seed` (another seed, other problems), drops every question the instruct stage already wrote (chat
and prompts, any split) and every problem whose equivalence key (stages/instruct.py, Splits: the
same sum with commuted operands, the same word problem with other names, the same word) is in one
of its train sets (chat, prefs, prompts), and decodes them greedily with the home's sft, dpo and
grpo models (whichever are built) exactly as the stages evaluate. count and string use the words of
the instruct stage's own string questions. Prints a table and, last, one JSON object:
{task: {model: accuracy, ..., "n": N, "ci95": half-width of a 95% interval for one accuracy},
"excluded": {task: problems drawn and dropped as already written or trained on}}.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path

from models.gpt import GPT
from models.tokenizer import Tokenizer
from stages import instruct
from stages.chat.evaluate import generate_answers
from stages.chat.verifiers import verify
from storage.parquet import iter_rows

MODELS = ("sft", "dpo", "grpo")


def latest(home: Path, stage: str, output: str) -> Path | None:
    """The newest published output `output` of `stage` in the home (None when never built)."""
    found = sorted((home / "artifacts" / stage).glob(f"*/{output}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def fresh_items(cfg: instruct.Config, seen: set[str], train_keys: set[str], words: list[str], n: int, seed: int = 0
                ) -> tuple[dict[str, list[instruct.Item]], dict[str, int]]:
    """At most n new items per generated task, none of whose questions the instruct stage wrote and
    none of whose problems (keys) it trained on; and per task how many drawn items were dropped."""
    out, dropped = {}, {}
    for task, make in instruct.task_makers(cfg, words).items():
        # most of the instruct stage's words are trained on: string problems (key: the word) need many draws
        items = instruct.unique_items(make, 16 * n, random.Random(f"bench.heldout:{seed}:{task}"))
        kept = [it for it in items if it.question not in seen and it.key not in train_keys]
        out[task], dropped[task] = kept[:n], len(items) - len(kept)
    return out, dropped


def train_keys(inst: Path) -> set[str]:
    """The equivalence keys of every train row of the instruct artifact's chat, prefs and prompts."""
    keys = {r.get("key") for kind in instruct.KINDS for r in iter_rows(inst.parent / kind, columns=["split", "key"])
            if r["split"] == "train"}
    if None in keys:
        raise SystemExit(f"bench.heldout: {inst.parent} has train rows without an equivalence key (built before keys "
                         f"existed); rebuild the instruct stage")
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=".family", help="the family home (default ./.family)")
    ap.add_argument("--per-task", type=int, default=800, help="new problems per task (default 800)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the draw of new problems (default 0)")
    args = ap.parse_args()
    home = Path(args.home)
    inst = latest(home, "instruct", "chat")
    if inst is None:
        raise SystemExit(f"bench.heldout: no instruct artifact in {home}; run `family run --until sft` first")
    recorded = json.loads((inst.parent / "config.json").read_text())["config"]
    cfg = instruct.Config(**{k: v for k, v in recorded.items() if k in instruct.Config.__dataclass_fields__})
    questions = [r["messages"][0]["content"] for r in iter_rows(inst)]
    words = sorted({m.replace(" ", "") if cfg.letters_apart else m
                    for q in questions if q.startswith(("Reverse the letters", "Write \"", "What is the first", "What is the last"))
                    for m in re.findall(r'"([^"]+)"', q)[:1]})
    written = set(questions) | {r["prompt"][0]["content"] for r in iter_rows(inst.parent / "prompts")}  # + RL problems
    items, dropped = fresh_items(cfg, written, train_keys(inst), words or list(instruct.FALLBACK_WORDS), args.per_task, args.seed)

    result: dict[str, dict[str, float]] = {}
    for model_name in MODELS:
        d = latest(home, model_name, model_name)
        if d is None:
            continue
        model, tok = GPT.from_pretrained(d).eval(), Tokenizer.load(d)
        for task, its in items.items():
            answers = generate_answers(model, tok, [[{"role": "user", "content": it.question}] for it in its], 96, 64)
            acc = sum(verify(it.verifier, a, it.answer) for a, it in zip(answers, its)) / max(1, len(its))
            result.setdefault(task, {"n": len(its)})[model_name] = acc
    for row in result.values():
        p = row.get("sft", 0.5)
        row["ci95"] = 1.96 * math.sqrt(p * (1 - p) / max(1, row["n"]))
    names = [m for m in MODELS if any(m in r for r in result.values())]
    print("| task | n | " + " | ".join(names) + " | 95% CI (one accuracy) |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for task, row in result.items():
        print(f"| {task} | {row['n']} | " + " | ".join(f"{row[m]:.3f}" for m in names) + f" | ±{row['ci95']:.3f} |")
    print(json.dumps({**{t: {k: round(v, 4) for k, v in r.items()} for t, r in result.items()}, "excluded": dropped}))


if __name__ == "__main__":
    main()

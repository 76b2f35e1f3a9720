"""Can the reward model beat its untrained prior? Reward-stage variants side by side, in one run.

    python -m bench.reward [--home DIR] [--variants JSON] [--threads T]

After `family run` (sft, instruct and reward built): stages.reward trained from the home's SFT model
on its prefs, once per variant (the home's reward config with the variant's overrides, default
VARIANTS), each from the same start and the same batch order. For each: val pair accuracy per kind
of rejected reply (near_miss, slip), and the gain over the untrained prior (step 0: the zero head plus
the SFT model's own mean log-likelihood of the reply, models/heads.py) with its 95% interval over the
paired per-pair differences. Last line: one JSON object, variant -> figures.

The val pairs are the stage's own (tuning data): this chooses the recipe's settings; the family
report's figures are on test.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stages import reward
from stages.contract import StageContext, build_config
from storage.artifacts import Artifact
from storage.tracking import NullTracker

# what the tiny recipe's reward settings were chosen against (README, "Reward model")
VARIANTS = {
    "recipe": {},
    "lr 3e-5, no LM term": {"lr": 3e-5, "lm_coef": 0.0},
    "lr 3e-5, LM term": {"lr": 3e-5, "lm_coef": 1.0},
    "lr 5e-6, no LM term": {"lr": 5e-6, "lm_coef": 0.0},
    "frozen backbone, lr 3e-4": {"train_backbone": False, "lr": 3e-4, "lm_coef": 0.0},
}
KINDS = ("near_miss", "slip")


def newest(home: Path, stage: str) -> Path:
    found = sorted((home / "artifacts" / stage).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"bench.reward: no {stage} artifact under {home}; run `family run --until reward` first")
    return found[-1].parent


def figures(metrics: dict[str, float]) -> dict[str, float]:
    out = {"acc": metrics["val_pair_acc"], "prior": metrics["val_prior_pair_acc"], "gain": metrics["val_pair_gain"],
           "gain_ci95": metrics["val_pair_gain_ci95"]}
    for kind in KINDS:
        if f"val_pair_acc/{kind}" in metrics:
            out |= {f"{kind}/acc": metrics[f"val_pair_acc/{kind}"], f"{kind}/prior": metrics[f"val_prior_pair_acc/{kind}"],
                    f"{kind}/gain": metrics[f"val_pair_gain/{kind}"], f"{kind}/gain_ci95": metrics[f"val_pair_gain_ci95/{kind}"]}
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, default=Path(".family"), help="a home with sft, instruct and reward built")
    ap.add_argument("--variants", help="JSON {name: {Config field: value}}; default: VARIANTS")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = json.loads(args.variants) if args.variants else VARIANTS
    recorded = json.loads((newest(args.home, "reward") / "config.json").read_text())["config"]
    inputs = {"sft": Artifact("sft", str(newest(args.home, "sft") / "sft"), "", {}),
              "prefs": Artifact("prefs", str(newest(args.home, "instruct") / "prefs"), "", {})}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp:
        for name, overrides in variants.items():
            cfg = build_config(reward.Config, {**recorded, **overrides}, f"bench.reward: {name}")
            root = Path(tmp) / str(len(results))
            ctx = StageContext(stage="reward", run_dir=root / "out", checkpoint_dir=root / "ckpt", state_dir=root / "state",
                               tracker=NullTracker())
            t0 = time.perf_counter()
            metrics = reward.run(cfg, inputs, ctx).metrics
            results[name] = figures(metrics) | {"seconds": round(time.perf_counter() - t0, 1)}
            r = results[name]
            print(f"{name:<28} acc {r['acc']:.3f} (prior {r['prior']:.3f}, gain {r['gain']:+.3f} +- {r['gain_ci95']:.3f}); "
                  + "; ".join(f"{k} {r[f'{k}/acc']:.3f} ({r[f'{k}/gain']:+.3f} +- {r[f'{k}/gain_ci95']:.3f})"
                              for k in KINDS if f"{k}/acc" in r), flush=True)
    print(json.dumps({"bench": "reward", "home": str(args.home), "variants": results}))


if __name__ == "__main__":
    main()

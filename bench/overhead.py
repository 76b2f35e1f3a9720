"""Backbone overhead: what orchestration, tracking and publishing cost on top of the stages' work.

    python -m bench.overhead [--recipe PATH] [--repeats N]

Runs `family run` as a user would (a fresh process, the ephemeral Prefect server on the home's
database, MLflow tracking on) in a temporary home:
  1. a cold run: per stage, the task's wall time minus the stage's own time (lease, MLflow child run,
     Prefect artifacts, publishing with sha256 manifest);
  2. fully cached re-runs: total wall time from process start to exit, Prefect start-up included,
     split into CLI start-up + plan and the flow itself.
The default recipe is the toy recipe of the tests (three millisecond stages), so the figures are the
backbone's own cost. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "tests" / "flows" / "toy" / "toy.yaml"


def family_run(home: Path, recipe: str, *extra: str) -> tuple[float, dict]:
    env = dict(os.environ, FAMILY_HOME=str(home), PYTHONPATH=str(REPO))
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--recipe", recipe, *extra], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"family run failed:\n{p.stderr[-3000:]}")
    return wall, json.loads((home / "state" / "last_report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(TOY))
    ap.add_argument("--repeats", type=int, default=3, help="fully cached re-runs to time")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="family-bench-") as tmp:
        home = Path(tmp) / "home"
        cold_wall, cold = family_run(home, args.recipe)
        per_stage = {
            s: {"task_s": r["task_seconds"], "stage_s": r["seconds"], "overhead_s": r["task_seconds"] - r["seconds"]}
            for s, r in cold["stages"].items()
            if r["status"] == "built"
        }
        print(f"cold run: {cold_wall:.1f} s wall, flow {cold['seconds']:.1f} s")
        for s, r in per_stage.items():
            print(f"  {s:<12} task {r['task_s']:.3f} s  stage {r['stage_s']:.3f} s  overhead {r['overhead_s']:.3f} s")

        cached = []
        for _ in range(args.repeats):
            wall, rep = family_run(home, args.recipe)
            assert all(r["status"] == "reused" for r in rep["stages"].values()), rep
            cached.append({"wall_s": wall, "flow_s": rep["seconds"]})
        med = statistics.median(c["wall_s"] for c in cached)
        each = ", ".join(f"{c['wall_s']:.1f}" for c in cached)
        print(f"fully cached re-run: median {med:.1f} s wall over {args.repeats} (each: {each})")

    figures = {
        "recipe": Path(args.recipe).stem,
        "cold_wall_s": round(cold_wall, 2),
        "per_stage_overhead_s": {s: round(r["overhead_s"], 3) for s, r in per_stage.items()},
        "mean_stage_overhead_s": round(statistics.mean(r["overhead_s"] for r in per_stage.values()), 3) if per_stage else None,
        "cached_rerun_wall_s": round(med, 2),
        "cached_rerun_flow_s": round(statistics.median(c["flow_s"] for c in cached), 3),
        "cached_rerun_startup_s": round(med - statistics.median(c["flow_s"] for c in cached), 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Does distillation pay at this size? KD against CE-only students, per step and per FLOP, in one run.

    python -m bench.distill [--home DIR] [--steps N] [--students JSON] [--threads T]

After `family run` (grpo and instruct built): the distill stage's student (its Config defaults, or
each shape in --students, e.g. '[{}, {"d_model": 128, "n_heads": 1, "n_kv_heads": 1, "d_ff": 64}]'),
pruned from the teacher exactly as stages/distill.py does, then trained three ways from that init on
the same data order (batch 16, AdamW lr 2e-3, 10 warmup steps):
  kd        N steps of stages.distill.distill_loss at the recipe's alpha, T, beta (teacher forwards),
  ce_steps  N steps of CE only (same steps and data: what the teacher's soft targets add per step),
  ce_flops  CE only for as many steps as cost the FLOPs `kd` spent (teacher forwards counted, as the
            stage's baseline does: what a FLOP spent on the teacher buys against one spent on training).
Each is measured on the first 200 val conversations: CE per assistant token, KL(teacher || student)
and top-1 agreement. Last line: one JSON object per student shape, with the ratios
kd/ce_steps and kd/ce_flops of the val loss (< 1: distillation wins).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.gpt import GPT
from stages import distill as D
from stages.training import open_model_input
from storage.artifacts import Artifact
from storage.parquet import iter_rows


def latest(home: Path, stage: str) -> Path:
    found = sorted((home / "artifacts" / stage).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"bench.distill: no {stage} artifact under {home}; run `family run` first")
    return found[-1].parent


@torch.no_grad()
def measure(student: GPT, teacher: GPT, val: list, pad_id: int) -> dict[str, float]:
    student.eval()
    ce, n = 0.0, 0
    for lo in range(0, len(val), 32):
        x, y = D.batch_of(val[lo:lo + 32], pad_id, torch.device("cpu"))
        m = y != D.IGNORE
        ce += F.cross_entropy(student(x, at=m)[0], y[m], reduction="sum").item()
        n += int(m.sum())
    out = {"val_ce": ce / n, **D.agreement(student, teacher, val, pad_id, 32, torch.device("cpu"))}
    student.train()
    return out


def train(student: GPT, teacher: GPT | None, train_set: list, steps: int, cfg: D.Config, pad_id: int) -> float:
    """Train in place; returns the FLOPs spent (student forward + backward, teacher forwards)."""
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0)).tolist()
    mean_len = sum(len(x) for x, _ in train_set) / len(train_set)
    fs, ft = D.train_flops(student, mean_len), (D.train_flops(teacher, mean_len) if teacher is not None else (0.0, 0.0))
    f = (fs[0] + ft[0] / 3, fs[1] + ft[1] / 3)  # (per position, per scored position), as the stage counts
    flops, B = 0.0, 16
    student.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 10)
        idx = [order[(step * B + i) % len(order)] for i in range(B)]
        x, y = D.batch_of([train_set[i] for i in idx], pad_id, torch.device("cpu"))
        at = y != D.IGNORE
        t = teacher(x, at=at)[0] if teacher is not None else None
        alpha = cfg.alpha if teacher is not None else 1.0
        loss, _ = D.distill_loss(student(x, at=at)[0], t, y[at], alpha, cfg.temperature, cfg.beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        flops += x.numel() * f[0] + int(at.sum()) * f[1]
    return flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=".family")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--students", default="[{}]", help="JSON list of distill Config overrides (student shapes)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    home = Path(args.home)
    grpo, instruct = latest(home, "grpo"), latest(home, "instruct")
    _, tok, teacher = open_model_input({"grpo": Artifact("grpo", str(grpo / "grpo"), "", {})}, "grpo", "bench.distill", "cpu")
    teacher.eval().requires_grad_(False)
    chat = sorted(iter_rows(str(instruct / "chat")), key=lambda r: r["id"])
    train_set, _ = D.encode_rows(tok, [r for r in chat if r["split"] == "train"], teacher.cfg.max_seq_len)
    val, _ = D.encode_rows(tok, [r for r in chat if r["split"] == "val"][:200], teacher.cfg.max_seq_len)
    imp = D.importances(teacher, [D.batch_of(train_set[i:i + 16], tok.pad_id, torch.device("cpu")) for i in range(0, 64, 16)])
    report = []
    for overrides in json.loads(args.students):
        cfg = D.Config(**overrides)
        scfg = D.student_config(teacher.cfg, cfg)
        init = D.prune(teacher, scfg, imp).state_dict()
        row: dict = {"student": overrides, "params": GPT(scfg).num_params(), "steps": args.steps,
                     "alpha": cfg.alpha, "temperature": cfg.temperature, "beta": cfg.beta}
        kd_flops = None
        for arm in ("kd", "ce_steps", "ce_flops"):
            student = GPT(scfg)
            student.load_state_dict(init)
            steps = args.steps
            if arm == "ce_flops":  # the CE step's FLOPs as counted on the same (padded) batches
                steps = round(kd_flops / (row["ce_steps"]["flops"] / row["ce_steps"]["steps"]))
            t0 = time.perf_counter()
            flops = train(student, teacher if arm == "kd" else None, train_set, steps, cfg, tok.pad_id)
            kd_flops = flops if arm == "kd" else kd_flops
            row[arm] = {"steps": steps, "flops": flops, "seconds": round(time.perf_counter() - t0, 1),
                        **measure(student, teacher, val, tok.pad_id)}
            print(arm, json.dumps(row[arm]), flush=True)
        row["val_ce_ratio_kd_vs_ce_steps"] = row["kd"]["val_ce"] / row["ce_steps"]["val_ce"]
        row["val_ce_ratio_kd_vs_ce_flops"] = row["kd"]["val_ce"] / row["ce_flops"]["val_ce"]
        report.append(row)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""What the members' own stages published, read from the artifact directory around each output.

A published output lives in `<home>/artifacts/<stage>/<fingerprint>/<output>`; beside it are the
stage's config.json (config, code and input hashes) and result.json (metrics, tables, seconds,
the MLflow run id). An output given by a bare path (`python -m stages.evaluate` on a folder that
was not published) has neither: its record is empty and what depends on it is shown as not recorded.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Z95 = 1.959963984540054
# MLflow metric keys that are curves: train/loss, train/kd/loss, train/vit_loss, train/lr, val/loss, val/bpb
CURVE_KEY = re.compile(r"^(train|val)/(.+/)?(\w*loss|lr|bpb)$")
TRAINING_STAGES = ("pretrain", "sft", "reward", "dpo", "grpo", "distill", "embed", "rerank", "vl")


def read_record(output_path: str | Path) -> dict[str, Any]:
    """{stage, fingerprint, config, inputs, metrics, tables, summary, seconds, mlflow_run_id, warnings}
    of the published artifact holding `output_path`; {} when it has no result.json."""
    d = Path(output_path).parent
    try:
        result = json.loads((d / "result.json").read_text())
    except (OSError, ValueError):
        return {}
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return {"stage": config.get("stage", d.parent.name), "fingerprint": d.name, "config": config.get("config", {}),
            "inputs": sorted(k for k in config.get("inputs", {}) if not k.startswith("files:")),
            "metrics": result.get("metrics", {}), "tables": result.get("tables", {}), "summary": result.get("summary", ""),
            "seconds": result.get("seconds"), "mlflow_run_id": result.get("mlflow_run_id"),
            "warnings": result.get("warnings", [])}


def weights(model_dir: str | Path) -> dict[str, Any]:
    """Bytes of the weight files (*.safetensors at the top of the directory) and, for a model that is
    not quantized, its parameter count from their headers (tied weights are stored once)."""
    from safetensors import safe_open

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    out: dict[str, Any] = {"bytes": sum(f.stat().st_size for f in files), "params": None}
    try:
        quantized = "quantization" in json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        quantized = False
    if files and not quantized:
        n = 0
        for f in files:
            with safe_open(str(f), "pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 (safe_open has keys(), not iteration)
        out["params"] = n
    return out


def funnel(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """pages -> docs -> deduped -> kept -> tokens from the data stages' metrics, and the drops by reason."""
    m = {name: r.get("metrics", {}) for name, r in records.items()}
    steps = []
    for step, name, docs_key, bytes_key in (("pages", "pages", "pages_fetched", "bytes"), ("docs", "docs", "docs", None),
                                            ("deduped", "docs_dedup", "docs_out", None),
                                            ("kept", "docs_clean", "docs_kept", "bytes_kept")):
        if docs_key in m.get(name, {}):
            steps.append({"step": step, "docs": int(m[name][docs_key]),
                          "bytes": int(m[name][bytes_key]) if bytes_key and bytes_key in m[name] else None})
    if "train_tokens" in m.get("tokens", {}):
        steps.append({"step": "train tokens", "docs": None, "bytes": None, "tokens": int(m["tokens"]["train_tokens"])})
    drops = []
    for key in ("url_dups", "exact_dups", "near_dups"):
        if m.get("docs_dedup", {}).get(key):
            drops.append({"stage": "dedupe", "reason": key, "docs": int(m["docs_dedup"][key])})
    for key, v in sorted(m.get("docs_clean", {}).items()):
        if key.startswith("dropped/") and v:
            drops.append({"stage": "filter", "reason": key.removeprefix("dropped/"), "docs": int(v)})
    if m.get("docs", {}).get("dropped"):
        drops.append({"stage": "extract", "reason": "no text", "docs": int(m["docs"]["dropped"])})
    return {"steps": steps, "drops": sorted(drops, key=lambda d: -d["docs"])}


RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@50")


def retrieval(embed: dict[str, float], rerank: dict[str, float]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Figures of BM25 -> dense (embedder) -> hybrid -> reranked (reranker) on the test queries, as the
    embed and rerank stages measured them (means with 95% bootstrap intervals), and their paired deltas."""
    systems = {"bm25": (embed, "bm25_"), "embedder": (embed, ""), "hybrid": (embed, "hybrid_"), "reranker": (rerank, "")}
    figures: dict[str, float] = {}
    for name, (src, prefix) in systems.items():
        for metric in RETRIEVAL_METRICS:
            for tail in ("", "_lo", "_hi"):
                if f"{prefix}{metric}{tail}" in src:
                    figures[f"{name}/{metric}{tail}"] = float(src[f"{prefix}{metric}{tail}"])
    for tail in ("", "_lo", "_hi"):
        if f"served_ndcg@10{tail}" in rerank:
            figures[f"reranker/served_ndcg@10{tail}"] = float(rerank[f"served_ndcg@10{tail}"])
    if "bm25/ndcg@10" in figures and "embedder/ndcg@10" in figures:
        figures["embedder/baseline"] = figures["bm25/ndcg@10"]
    if "first_stage_ndcg@10" in rerank:
        figures["reranker/baseline"] = float(rerank["first_stage_ndcg@10"])
    deltas = []
    for to, frm, src, key in (("embedder", "bm25", embed, "delta_dense_bm25_ndcg@10"),
                              ("hybrid", "bm25", embed, "delta_hybrid_bm25_ndcg@10"),
                              ("reranker", "hybrid", rerank, "delta_rerank_first_stage_ndcg@10")):
        if key in src:
            d = {"from": frm, "to": to, "figure": "ndcg@10", "delta": float(src[key]), "lo": src.get(key + "_lo"),
                 "hi": src.get(key + "_hi"), "test": "paired bootstrap (recorded)"}
            deltas.append(d)
            figures[f"{to}_vs_{frm}/ndcg@10_delta"] = d["delta"]
            for tail in ("lo", "hi"):
                if d[tail] is not None:
                    figures[f"{to}_vs_{frm}/ndcg@10_delta_{tail}"] = float(d[tail])
    return figures, deltas


def _pooled(rows: list[dict[str, Any]], value: str, ci: str | None) -> tuple[float, float, float] | None:
    """Question-weighted mean of a per-task figure and its normal interval from the per-task halves."""
    rows = [r for r in rows if r.get(value) is not None and r.get("test_rows")]
    n = sum(r["test_rows"] for r in rows)
    if not n:
        return None
    mean = sum(r[value] * r["test_rows"] for r in rows) / n
    var = sum((r["test_rows"] * (r.get(ci) or 0.0) / Z95) ** 2 for r in rows) / n**2 if ci else 0.0
    return mean, mean - Z95 * math.sqrt(var), mean + Z95 * math.sqrt(var)


def vision(record: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]], list[dict[str, Any]]]:
    """The vl stage's test figures (acc, blind, swap, majority per task with 95% halves), pooled over
    tasks, the VL-vs-blind delta (an unpaired interval: the blind figure averages several draws), and
    text retention against the chat model (val prompts, as vl measured it)."""
    m, tables = record.get("metrics", {}), record.get("tables", {})
    rows = [r for r in tables.get("eval", []) if r.get("test_rows")]
    figures: dict[str, float] = {}
    for r in rows:
        t = r["task"]
        for fig in ("acc", "blind_acc", "swap_acc", "majority_acc", "comp_acc"):
            if r.get(fig) is not None:
                figures[f"vl/{fig}/{t}"] = float(r[fig])
                half = m.get(f"{fig}_ci95/{t}")
                if half is not None:
                    figures[f"vl/{fig}_lo/{t}"], figures[f"vl/{fig}_hi/{t}"] = r[fig] - half, r[fig] + half
    deltas = []
    acc = _pooled([{**r, "ci": m.get(f"acc_ci95/{r['task']}")} for r in rows], "acc", "ci")
    blind = _pooled([{**r, "ci": m.get(f"blind_acc_ci95/{r['task']}")} for r in rows], "blind_acc", "ci")
    if acc:
        figures |= {"vl/acc": acc[0], "vl/acc_lo": acc[1], "vl/acc_hi": acc[2]}
    if blind:
        figures |= {"vl/blind_acc": blind[0], "vl/blind_acc_lo": blind[1], "vl/blind_acc_hi": blind[2],
                    "vl/baseline": blind[0]}
    if acc and blind:
        half = math.sqrt(((acc[2] - acc[1]) / 2) ** 2 + ((blind[2] - blind[1]) / 2) ** 2)
        d = acc[0] - blind[0]
        deltas.append({"from": "blind", "to": "vl", "figure": "acc", "delta": d, "lo": d - half, "hi": d + half,
                       "test": "unpaired normal (recorded)"})
        figures |= {"vl_vs_blind/acc_delta": d, "vl_vs_blind/acc_delta_lo": d - half, "vl_vs_blind/acc_delta_hi": d + half}
    text = tables.get("text_eval", [])
    if text:
        d = sum(r["text_delta"] for r in text) / len(text)
        half = math.sqrt(sum(r.get("text_delta_ci95", 0.0) ** 2 for r in text)) / len(text)
        deltas.append({"from": "grpo", "to": "vl", "figure": "val_text_acc", "delta": d, "lo": d - half, "hi": d + half,
                       "test": "paired normal, val prompts (recorded)"})
        figures |= {"vl_vs_grpo/val_text_acc_delta": d, "vl_vs_grpo/val_text_acc_delta_lo": d - half,
                    "vl_vs_grpo/val_text_acc_delta_hi": d + half}
    return figures, deltas, rows


def recorded_curve(record: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Curves a stage recorded in its result tables (*curve*: step plus numeric columns; a `phase`
    column splits them), for runs without MLflow."""
    series: dict[str, list[list[float]]] = {}
    for name, rows in record.get("tables", {}).items():
        if "curve" not in name:
            continue
        for r in rows:
            if not isinstance(r.get("step"), (int, float)):
                continue
            for col, v in r.items():
                if col in ("step", "phase") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if col.endswith(("loss", "lr", "bpb")) and math.isfinite(v):
                    key = f"{r['phase']}/{col}" if r.get("phase") else col
                    series.setdefault(key, []).append([float(r["step"]), float(v)])
    return series


def curves(records: dict[str, dict[str, Any]], history: Callable[[str, Callable[[str], bool]], dict[str, list]] | None
           ) -> dict[str, dict[str, Any]]:
    """Per training stage: {"source": "mlflow" | "recorded", "series": {key: [[step, value], ...]}}, read
    from the stage's MLflow run when `history` (the tracker's) finds it, else from its own tables."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records.values():
        stage = rec.get("stage")
        if stage not in TRAINING_STAGES or stage in out:
            continue
        series: dict[str, list] = {}
        if history is not None and rec.get("mlflow_run_id"):
            try:
                series = {k: v for k, v in history(rec["mlflow_run_id"], CURVE_KEY.match).items() if len(v) > 1}
            except Exception:  # an MLflow run that is gone (another backend, a deleted run): the recorded curve
                series = {}
        if series:
            out[stage] = {"source": "mlflow", "series": series}
        elif (rc := recorded_curve(rec)):
            out[stage] = {"source": "recorded", "series": rc}
    return {s: out[s] for s in TRAINING_STAGES if s in out}

"""The family report's figures: matplotlib's object API (Figure, no pyplot state, the Agg canvas),
each returned as a base64 PNG for an inline <img>. Every function takes the plain dicts of
evaluation.json, so a figure can be redrawn from a published report without the models."""
from __future__ import annotations

import base64
import io
import math
from typing import Any

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    axes = fig.subplots(1, ncols)
    return fig, axes


def funnel_plot(steps: list[dict[str, Any]]) -> str:
    """Documents left after each data stage (bars), their bytes as labels."""
    rows = [s for s in steps if s.get("docs") is not None]
    fig, ax = _figure(6.5, 0.5 + 0.45 * max(1, len(rows)))
    names = [s["step"] for s in rows][::-1]
    docs = [s["docs"] for s in rows][::-1]
    ax.barh(names, docs, color=COLOURS[0])
    for i, s in enumerate(rows[::-1]):
        label = f"{s['docs']:,}" + (f"  ({s['bytes'] / 1e6:.1f} MB)" if s.get("bytes") else "")
        ax.text(s["docs"], i, " " + label, va="center", fontsize=8)
    ax.set_xlabel("documents")
    ax.set_xlim(0, max(docs or [1]) * 1.35)
    ax.set_title("data funnel")
    return png(fig)


def curves_plot(stage: str, series: dict[str, list[list[float]]]) -> str:
    """Loss-like series (train and val) on the left, learning rates on the right."""
    fig, (left, right) = _figure(9, 2.8, 2)
    lrs = {k: v for k, v in series.items() if k.endswith("lr")}
    losses = {k: v for k, v in series.items() if k not in lrs}
    for i, (k, v) in enumerate(sorted(losses.items())):
        left.plot([p[0] for p in v], [p[1] for p in v], label=k, color=COLOURS[i % len(COLOURS)],
                  marker="o" if len(v) < 15 else None, markersize=3)
    for i, (k, v) in enumerate(sorted(lrs.items())):
        right.plot([p[0] for p in v], [p[1] for p in v], label=k, color=COLOURS[i % len(COLOURS)])
    left.set_title(f"{stage}: loss")
    right.set_title(f"{stage}: learning rate")
    for ax, got in ((left, losses), (right, lrs)):
        ax.set_xlabel("step")
        if got:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return png(fig)


def interval_bars(groups: list[str], series: dict[str, dict[str, dict[str, float]]], title: str, ylabel: str,
                  baseline: dict[str, float] | None = None, baseline_name: str = "baseline", ylim: tuple | None = (0, 1)
                  ) -> str:
    """Grouped bars: for each group (a task, a metric) one bar per series with its 95% interval,
    and the baseline of each group as a black tick."""
    names = list(series)
    fig, ax = _figure(max(6.0, 0.28 * len(groups) * max(1, len(names)) + 2), 3.2)
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ys, err = [], [], [[], []]
        for i, g in enumerate(groups):
            v = series[name].get(g)
            if v is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(v["value"])
            err[0].append(max(0.0, v["value"] - v.get("lo", v["value"])))
            err[1].append(max(0.0, v.get("hi", v["value"]) - v["value"]))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=name, color=COLOURS[j % len(COLOURS)])
    if baseline:
        bx = [i for i, g in enumerate(groups) if g in baseline]
        ax.scatter(bx, [baseline[groups[i]] for i in bx], marker="_", s=400, color="black", zorder=3, label=baseline_name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=0 if len(groups) < 8 else 30, fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(5, len(names) + 1), loc="upper left", bbox_to_anchor=(0, -0.12))
    return png(fig)


def quant_plot(rows: list[dict[str, Any]]) -> str:
    """Weight bytes against the test loss increase over fp32 (with its interval), one line per model."""
    fig, ax = _figure(6.5, 3.2)
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault(r["model"], []).append(r)
    for i, (model, pts) in enumerate(sorted(lines.items())):
        pts = sorted(pts, key=lambda p: p["bytes"])
        xs = [p["bytes"] / 1e6 for p in pts]
        ys = [100 * p["increase"] for p in pts]
        err = [[100 * (p["increase"] - p["lo"]) for p in pts], [100 * (p["hi"] - p["increase"]) for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=model, color=COLOURS[i % len(COLOURS)])
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(p["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("weight files (MB)")
    ax.set_ylabel("test loss increase over fp32 (%)")
    ax.set_title("quantization: size against loss")
    ax.legend(fontsize=8)
    return png(fig)


def pass_plot(rows: list[dict[str, Any]]) -> str:
    """Greedy accuracy, sampled pass@1 and pass@k per sampled member, with 95% intervals."""
    groups = [r["figure"] for r in rows[0]["figures"]] if rows else []
    series = {r["member"]: {f["figure"]: f for f in r["figures"]} for r in rows}
    return interval_bars(groups, series, "sampling at T = 1 (same prompts)", "share of prompts")


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

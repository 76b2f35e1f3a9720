"""The data funnel across stages: pages -> docs -> deduped -> kept, in documents and bytes, and
every drop with its reason, computed with DuckDB from the published datasets themselves."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

# (step, artifact, bytes expression)
STEPS = (
    ("pages", "pages", "sum(octet_length(body))"),
    ("docs", "docs", "sum(strlen(text))"),
    ("deduped", "docs_dedup", "sum(strlen(text))"),
    ("kept", "docs_clean", "sum(strlen(text))"),
)
EXCLUDED = ("extract_excluded", "dedupe_excluded", "excluded")


def _glob(path: str) -> str | None:
    p = Path(path)
    if p.is_file():
        return str(p)
    return str(p / "**" / "*.parquet") if p.is_dir() and any(p.rglob("*.parquet")) else None


def funnel(artifacts: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(steps, drops) from {artifact name: path}; steps missing from `artifacts` are left out."""
    con = duckdb.connect()
    steps: list[dict[str, Any]] = []
    for step, name, size in STEPS:
        glob = _glob(artifacts[name]) if name in artifacts else None
        if glob is None:
            continue
        n, b = con.execute(f"select count(*), coalesce({size}, 0) from read_parquet('{glob}')").fetchone()
        prev = steps[-1]["docs"] if steps else None
        steps.append({"step": step, "docs": int(n), "bytes": int(b), "kept_frac": round(n / prev, 4) if prev else 1.0})
    drops: list[dict[str, Any]] = []
    for name in EXCLUDED:
        glob = _glob(artifacts[name]) if name in artifacts else None
        if glob is None:
            continue
        rows = con.execute(
            f"select stage, reason, count(*) n, coalesce(sum(n_chars), 0) from read_parquet('{glob}') group by 1, 2 order by 3 desc"
        ).fetchall()
        drops += [{"stage": s, "reason": r, "docs": int(n), "chars": int(c)} for s, r, n, c in rows]
    return steps, drops


def render(steps: list[dict[str, Any]], drops: list[dict[str, Any]], top: int = 12) -> str:
    lines = ["data funnel:"]
    for s in steps:
        lines.append(f"  {s['step']:<8} {s['docs']:>8,d} docs  {s['bytes'] / 1e6:>8.2f} MB  ({100 * s['kept_frac']:.1f}% of previous)")
    if drops:
        lines.append("  dropped, by reason:")
        for d in drops[:top]:
            lines.append(f"    {d['stage']:<8} {d['reason']:<36} {d['docs']:>6,d}")
        if len(drops) > top:
            lines.append(f"    ... {len(drops) - top} more (family sql \"select stage, reason, count(*) from excluded group by 1, 2\")")
    return "\n".join(lines)

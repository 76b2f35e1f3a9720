"""Promotion gates: thresholds per member in the recipe's `evaluate.gates`, checked against the
figures of an evaluation. A rule is {figure: {min: T}} or {max: T}, T a number or another figure
("sft/acc_lo"); a member passes when every one of its rules holds, and the flow then sets the MLflow
alias `champion` on its registered version (flows/family.py)."""
from __future__ import annotations

from typing import Any


def check_gates(gates: dict[str, Any], members: Any) -> None:
    """Raise ValueError naming the first malformed rule (the recipe's line is named by the caller)."""
    for member, rules in gates.items():
        if member not in members:
            raise ValueError(f"gates.{member}: not a member (members: {', '.join(members)})")
        if not isinstance(rules, dict) or not rules:
            raise ValueError(f"gates.{member}: expected {{figure: {{min|max: threshold}}}}, got {rules!r}")
        for figure, rule in rules.items():
            if not isinstance(rule, dict) or not rule or set(rule) - {"min", "max"}:
                raise ValueError(f"gates.{member}.{figure}: expected {{min: T}} and/or {{max: T}}, got {rule!r}")
            for op, t in rule.items():
                number = isinstance(t, (int, float)) and not isinstance(t, bool)
                if not number and not (isinstance(t, str) and "/" in t):
                    raise ValueError(f"gates.{member}.{figure}.{op}: a number or a figure like 'sft/acc_lo', got {t!r}")


def evaluate_gates(gates: dict[str, dict[str, dict[str, Any]]], figures: dict[str, float],
                   present: set[str]) -> list[dict[str, Any]]:
    """One row per rule: the member's figure, the threshold (a number or another figure), pass or
    fail, and why a rule could not be checked (absent member, figure not measured)."""
    rows = []
    for member, rules in gates.items():
        for figure, rule in rules.items():
            for op, t in rule.items():
                key = f"{member}/{figure}"
                value = figures.get(key)
                threshold = figures.get(t) if isinstance(t, str) else float(t)
                note = ""
                if member not in present:
                    note = "member absent"
                elif value is None:
                    note = f"{key} not measured"
                elif threshold is None:
                    note = f"{t} not measured"
                passed = not note and (value >= threshold if op == "min" else value <= threshold)
                rows.append({"member": member, "figure": figure, "op": ">=" if op == "min" else "<=", "value": value,
                             "threshold": threshold, "against": t if isinstance(t, str) else "", "passed": bool(passed),
                             "note": note})
    return rows


def promoted(gate_rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Member -> whether every one of its rules passed."""
    out: dict[str, bool] = {}
    for r in gate_rows:
        out[r["member"]] = out.get(r["member"], True) and r["passed"]
    return out

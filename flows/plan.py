"""The plan: every stage's fingerprint, and whether it runs or is reused, and why.

Fingerprints are computed for the whole recipe before anything runs (an input's fingerprint is
that of the stage producing it), so `--dry-run` and `family status` know exactly what would rebuild.
The reason for a rebuild is found by comparing with the newest published artifact of the stage:
which config field changed, which module's code changed, which input changed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flows.recipe import Recipe, RecipeError
from storage.artifacts import ArtifactStore, Published
from storage.fingerprint import _module_digest, code_hash, code_modules, fingerprint
from storage.home import Home


@dataclass
class StagePlan:
    stage: str
    fingerprint: str
    action: str  # "run" | "skip" | "out"  (out: not selected by --only/--until)
    why: str
    state: str  # published | stale | missing | running | failed
    code: str
    code_digests: dict[str, str]
    inputs: dict[str, str]  # input name -> producing stage's fingerprint
    published: Published | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint_doc(self) -> dict[str, Any]:
        """What config.json records next to the artifact, for later explanations."""
        return {"code": self.code, "code_modules": self.code_digests, "inputs": self.inputs}


def _fmt(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def explain_change(stage: str, config: dict[str, Any], plan_doc: dict[str, Any], previous: Published) -> str:
    """Why the current fingerprint differs from a previously published one."""
    prev = previous.config
    prev_cfg = prev.get("config", {})
    reasons = []
    changed = [k for k in sorted(set(config) | set(prev_cfg)) if config.get(k) != prev_cfg.get(k)]
    for k in changed[:3]:
        reasons.append(f"config {stage}.{k}: {_fmt(prev_cfg.get(k))} -> {_fmt(config.get(k))}")
    if len(changed) > 3:
        reasons.append(f"{len(changed) - 3} more config fields")
    prev_inputs = prev.get("inputs", {})
    for name, fp in plan_doc["inputs"].items():
        if prev_inputs.get(name) != fp:
            reasons.append(f"input {name} changed")
    if prev.get("code") != plan_doc["code"]:
        old = prev.get("code_modules", {})
        mods = [m for m, d in plan_doc["code_modules"].items() if old.get(m) != d]
        reasons.append("code changed" + (f" ({', '.join(mods)})" if mods else ""))
    return "; ".join(reasons) or "fingerprint changed"


def make_plan(
    recipe: Recipe,
    home: Home,
    force_from: str | None = None,
    only: str | None = None,
    until: str | None = None,
) -> list[StagePlan]:
    for flag, value in (("--from", force_from), ("--only", only), ("--until", until)):
        if value is not None and value not in recipe.stages:
            raise RecipeError(f"{flag} {value}: recipe {recipe.name} has no such stage (stages: {', '.join(recipe.stages)})")
    store = ArtifactStore(home)
    forced = set(recipe.downstream(force_from)) if force_from else set()
    selected = set(recipe.stages)
    if only:
        selected = {only}
    if until:
        selected &= set(recipe.ancestors(until))

    plans: dict[str, StagePlan] = {}
    for name, spec in recipe.stages.items():
        code = code_hash(spec.module_name)
        digests = {m: _module_digest(m)[0][:12] for m in code_modules(spec.module_name)}
        inputs = {i: plans[recipe.producers[i]].fingerprint for i in spec.inputs}
        config = spec.config_json
        fp = fingerprint(name, code, config, inputs)
        published = store.published(name, fp)
        doc = {"code": code, "code_modules": digests, "inputs": inputs}
        history = store.history(name)
        work = home.work_dir(name, fp)
        if store.is_leased(name, fp):
            state = "running"
        elif published is not None:
            state = "published"
        elif (work / "failed.json").exists():
            state = "failed"
        elif history:
            state = "stale"
        else:
            state = "missing"

        if name not in selected:
            action, why = "out", "not selected" + (f" (--only {only})" if only else f" (--until {until})")
        elif name in forced:
            action = "run"
            why = f"forced by --from {force_from}" + (" (published, rebuilding)" if published else "")
        elif published is not None:
            action, why = "skip", "published, unchanged"
        else:
            action = "run"
            if state == "failed":
                err = json.loads((work / "failed.json").read_text()).get("error", "")
                why = f"last attempt failed: {err[:80]}"
            elif history:
                why = explain_change(name, config, doc, history[0])
            else:
                why = "never built"
            if (work / "ckpt").is_dir() and any((work / "ckpt").iterdir()):
                why += "; resumes from checkpoint"
        plans[name] = StagePlan(name, fp, action, why, state, code, digests, inputs, published)

    # a stage that is not selected but whose output a selected stage needs must already exist
    for name, p in plans.items():
        if p.action != "run":
            continue
        for inp in recipe.stages[name].inputs:
            up = plans[recipe.producers[inp]]
            if up.action == "out" and up.published is None:
                raise RecipeError(
                    f"stage {name} needs {inp!r} from stage {up.stage}, which is not built and not selected; "
                    f"run `family run --until {name}` first"
                )
    return list(plans.values())

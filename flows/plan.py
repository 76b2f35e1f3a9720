"""The plan: every stage's fingerprint, and whether it runs or is reused, and why.

A stage's fingerprint hashes its code, its config and the content hashes of its inputs, so it is
known before the stage runs whenever its upstream is already published: `--dry-run` and
`family status` say exactly what would rebuild. Downstream of a stage that will run, the
fingerprint is pending until that stage has published; the flow plans again after every stage.
The reason for a rebuild is found by comparing with the newest published artifact of the stage:
which config field changed, which module's code changed, which input changed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flows.recipe import Recipe, RecipeError
from storage.artifacts import ArtifactStore, Published
from storage.fingerprint import (
    _module_digest, code_hash, code_modules, files_hash, fingerprint, save_digest_cache, use_digest_cache,
)
from storage.home import Home


@dataclass
class StagePlan:
    stage: str
    fingerprint: str  # "" while an input is pending (its producer runs first)
    action: str  # "run" | "skip" | "out"  (out: not selected by --only/--until)
    why: str
    state: str  # published | stale | missing | running | failed | damaged (files changed since publishing)
    code: str
    code_digests: dict[str, str]
    inputs: dict[str, str]  # input name -> content hash of that upstream output ("" while pending)
    published: Published | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint_doc(self) -> dict[str, Any]:
        """What config.json records next to the artifact, for later explanations."""
        return {"code": self.code, "code_modules": self.code_digests, "inputs": self.inputs}


def _fmt(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def explain_change(stage: str, config: dict[str, Any], plan_doc: dict[str, Any], previous: Published, skip_inputs: bool = False) -> str:
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
        if prev_inputs.get(name) != fp and (not skip_inputs or name.startswith("files:")):
            reasons.append(f"content of {name[6:]} changed" if name.startswith("files:") else f"input {name} changed")
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
    refresh: tuple[str, ...] | list[str] = (),
    done: set[str] | frozenset[str] = frozenset(),
) -> list[StagePlan]:
    """Decide, per stage, run or reuse and why.

    A stage's inputs are keyed by the content hash of the upstream output. When an upstream stage
    is going to run, that hash is not known yet: the stage's fingerprint is pending ("") and it is
    planned to run; the flow plans again after each stage, and a rebuilt upstream whose output is
    byte-identical leaves the stage reused (early cutoff). `refresh` reruns a stage even though it
    is published (the nightly crawl); `force_from` reruns a stage and everything downstream.
    `done` lists stages this flow run already handled, which are never forced twice.
    """
    for flag, value in (("--from", force_from), ("--only", only), ("--until", until), *(("--refresh", r) for r in refresh)):
        if value is not None and value not in recipe.stages:
            raise RecipeError(f"{flag} {value}: recipe {recipe.name} has no such stage (stages: {', '.join(recipe.stages)})")
    store = ArtifactStore(home)
    use_digest_cache(home.state / "code_digests.json")
    forced = (set(recipe.downstream(force_from)) if force_from else set()) | set(refresh)
    forced -= set(done)
    selected = set(recipe.stages)
    if only:
        selected = {only}
    if until:
        selected &= set(recipe.ancestors(until))

    plans: dict[str, StagePlan] = {}
    outputs: dict[str, str] = {}  # artifact name -> content hash, where known
    for name, spec in recipe.stages.items():
        code = code_hash(spec.module_name)
        digests = {m: _module_digest(m)[0][:12] for m in code_modules(spec.module_name)}
        config = spec.config_json
        history = store.history(name)
        pending = [i for i in spec.inputs if i not in outputs]
        inputs = {i: outputs.get(i, "") for i in spec.inputs}
        for fld in getattr(spec.module, "INPUT_FILES", ()):  # user files: their content, not their name
            value = config.get(fld) or ()
            paths = [value] if isinstance(value, str) else list(value)
            if paths:
                inputs[f"files:{fld}"] = files_hash(paths)
        doc = {"code": code, "code_modules": digests, "inputs": inputs}
        fp = "" if pending else fingerprint(name, code, config, inputs)
        published = store.published(name, fp) if fp else None
        damage = published.problems() if published is not None else []
        if damage:  # files changed since publishing: the artifact no longer exists for anyone
            published = None
        work = home.work_dir(name, fp) if fp else None
        if fp and store.is_leased(name, fp):
            state = "running"
        elif damage:
            state = "damaged"
        elif published is not None:
            state = "published"
        elif work is not None and (work / "failed.json").exists():
            state = "failed"
        else:
            state = "stale" if history else "missing"

        if name not in selected:
            action, why = "out", "not selected" + (f" (--only {only})" if only else f" (--until {until})")
        elif name in forced:
            action = "run"
            why = (f"forced by --from {force_from}" if force_from and name in recipe.downstream(force_from) else "refresh requested")
            why += " (published, rebuilding)" if published else ""
        elif published is not None:
            action, why = "skip", "published, unchanged"
        elif pending:
            action = "run"
            ups = sorted({recipe.producers[i] for i in pending})
            why = f"after {', '.join(ups)} rebuilds (reused if its output is unchanged)"
            if history:
                changed = explain_change(name, config, doc, history[0], skip_inputs=True)
                why = f"{changed}; {why}" if changed != "fingerprint changed" else why
        else:
            action = "run"
            if damage:
                why = f"published artifact is damaged ({damage[0]}{f'; {len(damage) - 1} more' if len(damage) > 1 else ''}); rebuilding"
            elif state == "failed":
                err = json.loads((work / "failed.json").read_text()).get("error", "")
                why = f"last attempt failed: {err[:80]}"
            elif history:
                why = explain_change(name, config, doc, history[0])
            else:
                why = "never built"
        if action == "run" and work is not None and (work / "ckpt").is_dir() and any((work / "ckpt").iterdir()):
            why += "; resumes from checkpoint"
        plans[name] = StagePlan(name, fp, action, why, state, code, digests, inputs, published)
        if action in ("skip", "out") and published is not None:
            outputs.update({o: a.fingerprint for o, a in published.artifacts().items()})

    # a stage that is not selected but whose output a selected stage needs must already exist
    save_digest_cache()
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

"""The family flow: one Prefect task per stage, wired by the recipe's artifact names.

The flow body reads like the plan it executes: compute every fingerprint, open the MLflow parent
run, then for each stage in order either reuse its published artifact or run it as a task. A task
holds the stage's lease, opens an MLflow child run, feeds a Prefect progress artifact, runs the
stage (in process, or under torchrun in its own process group), publishes atomically, and leaves a
keyed markdown artifact and a link to its MLflow run. A failed stage blocks only what depends on it.
After the last stage, the evaluate stage's gates put the MLflow alias `champion` on the registered
version of every member that passed them (stages never talk to the registry).
Retries happen only for network I/O (stages that declare NETWORK); training stages resume from
their checkpoints instead.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from flows import dask_runner
from flows.plan import StagePlan, make_plan
from flows.processes import die_with_parent
from flows.recipe import Recipe, StageSpec, load_recipe
from stages.contract import StageContext, StageError, StageResult, TqdmProgress, check_result
from storage.artifacts import Artifact, ArtifactStore, write_json_atomic
from storage.home import Home
from storage.tracking import ENV_RUN, ENV_URI, Lineage, MlflowTracker, NullTracker, git_revision

MLFLOW_UI = os.environ.get("FAMILY_MLFLOW_UI", "http://127.0.0.1:5000")
PROGRESS_EVERY_S = 2.0


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class PrefectProgress:
    """ctx.progress under Prefect: a progress artifact (throttled) plus a bar on stderr."""

    def __init__(self, stage: str, flow_key: str):
        self.stage = stage
        self.bar = TqdmProgress(stage)
        self.last = 0.0
        self.id = create_progress_artifact(0.0, key=artifact_key(flow_key, stage, "progress"), description=f"{stage}: starting")

    def __call__(self, done: float, total: float, desc: str = "", **metrics: float) -> None:
        self.bar(done, total, desc, **metrics)
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and done < total:
            return
        self.last = now
        pct = 100.0 * min(1.0, done / total) if total else 0.0
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        try:
            update_progress_artifact(self.id, pct, description=f"{self.stage}: {desc} {done:g}/{total:g} {shown}".strip())
        except Exception:  # a progress update must never fail a stage
            pass


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def is_network_error(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, socket.gaierror, urllib.error.URLError))


def _retry_on_network(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - we only inspect the type
        return is_network_error(e)
    return False


# -- running one stage ---------------------------------------------------------------------------


@dataclass
class Launch:
    spec: StageSpec
    plan: StagePlan
    inputs: dict[str, Artifact]
    device: str
    seed: int


def run_torchrun(launch: Launch, ctx: StageContext, tracker_run: str | None, tracking_uri: str | None) -> StageResult:
    """Run the stage under torchrun in its own process group; forward SIGTERM/SIGINT to the group."""
    work = ctx.run_dir.parent
    cfg_file, inputs_file = work / "config.in.json", work / "inputs.in.json"
    cfg_file.write_text(json.dumps(launch.spec.config_json))
    inputs_file.write_text(json.dumps({k: a.to_json() for k, a in launch.inputs.items()}))
    progress_file = work / "progress.jsonl"
    progress_file.unlink(missing_ok=True)
    env = dict(os.environ, FAMILY_PROGRESS_FILE=str(progress_file), FAMILY_FINGERPRINT=launch.plan.fingerprint)
    if tracker_run and tracking_uri:
        env.update({ENV_URI: tracking_uri, ENV_RUN: tracker_run})
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={launch.spec.nproc}",
        "-m", launch.spec.module_name,
        "--config", str(cfg_file), "--inputs", str(inputs_file), "--run-dir", str(ctx.run_dir),
        "--checkpoint-dir", str(ctx.checkpoint_dir), "--state-dir", str(ctx.state_dir),
        "--device", launch.device, "--seed", str(launch.seed),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)

    def forward(signum, frame):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        finally:
            raise SystemExit(128 + signum)

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        seen = 0
        while proc.poll() is None:
            time.sleep(0.5)
            if progress_file.exists():
                lines = progress_file.read_text().splitlines()
                for line in lines[seen:]:
                    p = json.loads(line)
                    ctx.progress(p["done"], p["total"], p.get("desc", ""), **p.get("metrics", {}))
                seen = len(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        for s, h in old.items():
            signal.signal(s, h)
    if proc.returncode != 0:
        raise StageError(f"stage {launch.spec.name}: torchrun exited with code {proc.returncode}")
    return StageResult.from_json(json.loads((work / "result.json").read_text()))


def _summary_markdown(stage: str, plan: StagePlan, result: StageResult, published_dir: Path, seconds: float, mlflow_url: str | None) -> str:
    lines = [f"# {stage}", "", f"fingerprint `{plan.fingerprint}`, built in {seconds:.1f} s", ""]
    lines += [f"> **Warning:** {w}" for w in result.warnings] + ([""] if result.warnings else [])
    if result.summary:
        lines += [result.summary, ""]
    if result.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in result.metrics.items()]
        lines.append("")
    lines += ["| output | path |", "|---|---|"]
    lines += [f"| {name} | `{published_dir / name}` |" for name in result.outputs]
    if mlflow_url:
        lines += ["", f"[MLflow run]({mlflow_url})"]
    return "\n".join(lines)


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def stage_task(
    stage: str,
    recipe_path: str,
    overrides: list[str],
    home_dir: str,
    fingerprint: str,
    inputs: dict[str, dict[str, Any]],
    parent_run: str | None,
    force: bool,
    flow_key: str,
) -> dict[str, Any]:
    home = Home.resolve(home_dir)
    recipe = load_recipe(recipe_path, overrides)
    spec = recipe.stages[stage]
    plan = next(p for p in make_plan(recipe, home) if p.stage == stage)
    if plan.fingerprint != fingerprint:
        raise RuntimeError(f"stage {stage}: fingerprint {plan.fingerprint} differs from the flow's {fingerprint}")
    store = ArtifactStore(home)
    logger = get_run_logger()
    device = resolve_device(recipe.device)
    artifacts = {k: Artifact.from_json(v) for k, v in inputs.items()}

    with store.lease(stage, plan.fingerprint) as work:
        published = store.published(stage, plan.fingerprint)
        if published is not None and not force and not published.problems():  # another run finished it while we waited
            return {"stage": stage, "status": "reused", "outputs": {k: a.to_json() for k, a in published.artifacts().items()}, "metrics": published.result.get("metrics", {})}

        run_dir, ckpt_dir = work / "out", work / "ckpt"
        state_dir = home.state / stage
        for d in (run_dir, ckpt_dir, state_dir):
            d.mkdir(parents=True, exist_ok=True)
        (work / "failed.json").unlink(missing_ok=True)

        lineage, tracker, run_url = None, NullTracker(), None
        if parent_run:
            lineage = Lineage(home.mlflow_uri, home.mlflow_artifacts, recipe.experiment)
            ctxp = get_run_context()
            tracker = lineage.start_child(
                parent_run,
                stage,
                {
                    "fingerprint": plan.fingerprint,
                    "recipe": recipe.name,
                    "prefect.flow_run_id": str(getattr(ctxp.task_run, "flow_run_id", "")),
                    "prefect.task_run_id": str(ctxp.task_run.id),
                    "git": git_revision(Path(__file__).parent),
                    "resumed": str(any(ckpt_dir.iterdir())),
                },
            )
            tracker.log_params(spec.config_json)
            run_url = lineage.run_url(MLFLOW_UI, tracker.run_id)
            create_link_artifact(run_url, link_text=f"MLflow run of {stage}", key=artifact_key(flow_key, stage, "mlflow"))

        ctx = StageContext(
            stage=stage,
            run_dir=run_dir,
            checkpoint_dir=ckpt_dir,
            state_dir=state_dir,
            tracker=tracker,
            progress=PrefectProgress(stage, flow_key),
            device=device,
            seed=recipe.seed,
            fingerprint=plan.fingerprint,
            logger=logger,
            mapper=dask_runner.mapper(stage),  # the flow's Dask runner, when the recipe has one
        )
        t0 = time.perf_counter()
        try:
            if spec.nproc > 1:
                result = run_torchrun(
                    Launch(spec, plan, artifacts, device, recipe.seed), ctx,
                    tracker.run_id if isinstance(tracker, MlflowTracker) else None, home.mlflow_uri,
                )  # fmt: skip
            else:
                result = spec.module.run(spec.config, artifacts, ctx)
            check_result(spec.module, result, run_dir)
        except BaseException as e:
            if is_disk_full(e):  # the user's environment, not a bug: one line naming where
                e = StageError(f"{stage}: no space left on the device of {getattr(e, 'filename', None) or home.root} "
                               f"({e.strerror}); free some space and run the same command again: nothing half-written "
                               f"was published")
            try:
                write_json_atomic(work / "failed.json", {"error": f"{type(e).__name__}: {e}" if not isinstance(e, StageError) else str(e), "time": time.time()})
            except OSError:  # the disk that is full
                pass
            if lineage is not None:
                tracker.set_tags({"error": str(e)[:500]})
                lineage.end(tracker.run_id, "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
            if isinstance(e, StageError):
                raise e from None
            raise
        seconds = time.perf_counter() - t0
        result.metrics.setdefault("stage_seconds", seconds)

        config_doc = {"stage": stage, "module": spec.module_name, "config": spec.config_json, **plan.fingerprint_doc}
        pub = store.publish(
            stage,
            plan.fingerprint,
            run_dir,
            outputs=result.outputs,
            config=config_doc,
            result={**result.to_json(), "seconds": seconds, "mlflow_run_id": getattr(tracker, "run_id", None)},
            upstream=plan.inputs,
        )
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for f in ("config.in.json", "inputs.in.json", "progress.jsonl", "result.json"):
            (work / f).unlink(missing_ok=True)

        md = _summary_markdown(stage, plan, result, pub.dir, seconds, run_url)
        create_markdown_artifact(md, key=artifact_key(flow_key, stage), description=f"{stage} ({plan.fingerprint})")
        for name, rows in result.tables.items():
            if rows:
                create_table_artifact(rows, key=artifact_key(flow_key, stage, name), description=f"{stage}: {name}")
        if lineage is not None:
            tracker.log_metrics({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
            if result.warnings:
                tracker.set_tags({"warnings": " | ".join(result.warnings)[:500]})
            tracker.log_dict(pub.manifest, "manifest.json")
            for out, member in recipe.register.items():
                if out in result.outputs:
                    name = f"{recipe.name}-{member}"
                    try:
                        version = lineage.register(name, tracker.run_id, pub.dir / out, {"fingerprint": plan.fingerprint, "stage": stage})
                        logger.info("registered %s version %s (models:/%s/latest)", name, version, name)
                    except Exception as e:  # the artifact is published; a registry hiccup must not undo that
                        logger.warning("could not register %s in MLflow: %s", name, e)
            if result.summary:
                tracker.log_text(md, "summary.md")
            lineage.end(tracker.run_id)
        for w in result.warnings:
            logger.warning("%s: %s", stage, w)
        logger.info("%s published at %s in %.1f s", stage, pub.dir, seconds)
        return {"stage": stage, "status": "built", "seconds": seconds, "outputs": {k: a.to_json() for k, a in pub.artifacts().items()},
                "metrics": result.metrics, "warnings": result.warnings}


# -- the flow ------------------------------------------------------------------------------------


def _data_funnel(outputs: dict[str, dict[str, Any]], flow_key: str, lineage: Lineage | None, parent: str | None, report: dict[str, Any]) -> None:
    """pages -> docs -> deduped -> kept across the data stages: a Prefect table, MLflow metrics."""
    from flows.funnel import funnel

    steps, drops = funnel({name: art["path"] for name, art in outputs.items()})
    if len(steps) < 2:
        return
    report["funnel"] = {"steps": steps, "drops": drops}
    create_table_artifact(steps, key=artifact_key(flow_key, "funnel"), description="documents and bytes left after each data stage")
    if drops:
        create_table_artifact(drops, key=artifact_key(flow_key, "drops"), description="documents dropped, by stage and reason")
    if lineage is not None and parent:
        metrics = {f"funnel/{s['step']}_docs": s["docs"] for s in steps} | {f"funnel/{s['step']}_bytes": s["bytes"] for s in steps}
        metrics |= {f"dropped/{d['stage']}/{d['reason']}"[:250]: d["docs"] for d in drops}
        MlflowTracker(lineage.uri, parent).log_metrics(metrics)


def _promote(rcp: Recipe, report_art: dict[str, Any], fingerprints: dict[str, str], lineage: Lineage | None,
             parent: str | None, flow_key: str, report: dict[str, Any]) -> None:
    """The evaluate stage's gates -> the MLflow alias `champion` on the registered version of every
    member that passed all of its gates (the version registered from the stage artifact it judged,
    by fingerprint; a member that fails keeps its previous champion, if any), the report logged to
    the parent run, and a keyed markdown artifact with both."""
    report_dir = Path(report_art["path"])
    report["report"] = str(report_dir / "report.html")
    rows = []
    for out, passed in report_art.get("meta", {}).get("promote", {}).items():
        member, stage = rcp.register.get(out), rcp.producers.get(out)
        row = {"member": out, "gates": "pass" if passed else "fail", "champion": ""}
        if member is None:
            row["champion"] = "not registered (recipe register:)"
        elif not passed:
            row["champion"] = "unchanged"
        elif lineage is None:
            row["champion"] = "not set (--no-track)"
        else:
            name, fp = f"{rcp.name}-{member}", fingerprints.get(stage, "")
            version = lineage.set_alias(name, "champion", fp) if fp else None
            row["champion"] = f"models:/{name}@champion -> version {version}" if version else "no registered version of this build"
        rows.append(row)
    report["champions"] = rows
    summary = (report_dir / "summary.txt").read_text() if (report_dir / "summary.txt").exists() else ""
    md = [f"# family report: {rcp.name}", "", f"`{report_dir / 'report.html'}`", "", "```", summary.rstrip(), "```", ""]
    if rows:
        md += ["| member | gates | champion |", "|---|---|---|"] + [f"| {r['member']} | {r['gates']} | {r['champion']} |" for r in rows]
    create_markdown_artifact("\n".join(md), key=artifact_key(flow_key, "report"), description="the family report and its gates")
    if lineage is not None and parent and (report_dir / "report.html").exists():
        MlflowTracker(lineage.uri, parent).log_artifact(report_dir / "report.html")
        lineage.client.set_tag(parent, "champions", ", ".join(r["member"] for r in rows if r["champion"].startswith("models:/")))


class StagesFailed(StageError):
    """Stages of a run failed; each was reported on its own line as it failed."""

    def __init__(self, message: str, stages: list[str], blocked: int):
        super().__init__(message)
        self.stages, self.blocked = stages, blocked


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_traceback(home: Home, stage: str) -> Path:
    """The traceback of the exception being handled, in `<home>/logs/<stage>-<time>.log`; its path."""
    home.logs.mkdir(parents=True, exist_ok=True)
    path = home.logs / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(traceback.format_exc())
    return path


def quiet_run_loggers() -> None:
    """Flow-run and task-run log records go to the Prefect API (the UI shows them, tracebacks
    included) but not to the terminal, where the flow prints one line per stage and a user error is
    one line (Prefect's console handler would print each failure's traceback twice)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).propagate = False


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return f"{Path(flow_run.parameters.get('recipe', 'tiny')).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="family", flow_run_name=_flow_run_name, log_prints=False, validate_parameters=False)
def family_flow(
    recipe: str = "tiny",
    overrides: list[str] | None = None,
    home: str | None = None,
    force_from: str | None = None,
    only: str | None = None,
    until: str | None = None,
    refresh: list[str] | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) every stage of a recipe. Parameters mirror `family run`."""
    quiet_run_loggers()
    overrides, refresh = list(overrides or []), list(refresh or [])
    h = Home.resolve(home).ensure()
    rcp: Recipe = load_recipe(recipe, overrides)
    selection = dict(force_from=force_from, only=only, until=until, refresh=refresh)
    plans = make_plan(rcp, h, **selection)
    flow_key = artifact_key(rcp.name)

    lineage, parent = None, None
    if track:
        lineage = Lineage(h.mlflow_uri, h.mlflow_artifacts, rcp.experiment)
        fr = get_run_context().flow_run
        parent = lineage.start_parent(
            f"{rcp.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            {"recipe": rcp.name, "prefect.flow_run_id": str(fr.id), "git": git_revision(Path(__file__).parent),
             "overrides": " ".join(overrides), "planned": ",".join(p.stage for p in plans if p.action == "run")},
        )  # fmt: skip

    outputs: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"recipe": rcp.name, "home": str(h.root), "stages": {}}
    done: set[str] = set()
    blocked: set[str] = set()
    failures: list[str] = []
    t_flow = time.perf_counter()
    runner = dask_runner.open_runner(rcp.runner)
    try:
        if runner.__enter__() is not None:
            _echo(f"  data stages' shards on {rcp.runner.describe()}")
        for name, spec in rcp.stages.items():
            # plan again: upstream stages built in this run now have content hashes (early cutoff)
            p = next(x for x in make_plan(rcp, h, **selection, done=done) if x.stage == name)
            done.add(name)
            if any(rcp.producers[i] in blocked for i in spec.inputs):
                blocked.add(name)
                report["stages"][name] = {"status": "blocked"}
                _echo(f"  - {name:<10} blocked by a failed upstream stage")
                continue
            if p.action in ("skip", "out"):
                if p.published is not None:
                    outputs.update({k: a.to_json() for k, a in p.published.artifacts().items()})
                if p.action == "skip":
                    report["stages"][name] = {"status": "reused", "fingerprint": p.fingerprint}
                    _echo(f"  = {name:<10} reused {p.fingerprint}")
                continue
            if p.state == "damaged":
                _echo(f"  ! {name:<10} WARNING {p.why}")
            _echo(f"  > {name:<10} running ({p.why})")
            task_fn = stage_task.with_options(
                tags=["gpu"] if spec.gpu else [],
                retries=2 if spec.network else 0,
                retry_delay_seconds=[5, 30],
                retry_condition_fn=_retry_on_network if spec.network else None,
            )
            t_task = time.perf_counter()
            try:
                res = task_fn(
                    name, str(rcp.path), overrides, str(h.root), p.fingerprint,
                    {i: outputs[i] for i in spec.inputs}, parent, p.published is not None, flow_key,
                )  # fmt: skip
            except StageError as e:
                failures.append(str(e))
                blocked.add(name)
                report["stages"][name] = {"status": "failed", "error": str(e)}
                _echo(f"  x {name:<10} failed: {e}")
                continue
            except Exception as e:  # internal error: its traceback goes to a log file, the other branches go on
                if is_disk_full(e):  # while publishing: the user's environment, one line
                    msg = (f"{name}: no space left on the device of {e.filename or h.root} ({e.strerror}); free some "
                           f"space and run the same command again: nothing half-written was published")
                    failures.append(msg)
                    blocked.add(name)
                    report["stages"][name] = {"status": "failed", "error": msg}
                    _echo(f"  x {name:<10} failed: {msg}")
                    continue
                log_file = write_traceback(h, name)
                failures.append(f"stage {name}: internal error {type(e).__name__}: {e}; traceback in {log_file} (`family logs {name}`)")
                blocked.add(name)
                report["stages"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}", "log": str(log_file)}
                _echo(f"  x {name:<10} failed: internal error {type(e).__name__}: {e}; traceback in {log_file}")
                get_run_logger().error(traceback.format_exc())
                continue
            outputs.update(res["outputs"])
            report["stages"][name] = {
                "status": res["status"], "seconds": res.get("seconds"), "task_seconds": time.perf_counter() - t_task,
                "fingerprint": p.fingerprint,
            }  # fmt: skip
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(res["metrics"].items())[:6] if isinstance(v, (int, float)))
            _echo(f"  + {name:<10} built in {res.get('seconds', 0):.1f} s  {shown}")
            for w in res.get("warnings", []):
                _echo(f"  ! {name:<10} WARNING {w}")
    except BaseException:
        if lineage is not None:
            lineage.end(parent, "KILLED")
        raise
    finally:
        runner.__exit__(None, None, None)
    report["seconds"] = time.perf_counter() - t_flow
    _data_funnel(outputs, flow_key, lineage, parent, report)
    if "report" in outputs:  # the evaluate stage ran or was reused: its gates decide the champions
        try:
            fingerprints = {p.stage: p.fingerprint for p in make_plan(rcp, h, **selection, done=done)}
            _promote(rcp, outputs["report"], fingerprints, lineage, parent, flow_key, report)
        except Exception as e:  # the report is published; a registry hiccup must not fail the run
            _echo(f"  ! evaluate   WARNING could not set the champion aliases: {type(e).__name__}: {e}")
    if lineage is not None:
        lineage.client.log_metric(parent, "flow_seconds", report["seconds"])
        lineage.client.log_metric(parent, "stages_built", sum(1 for s in report["stages"].values() if s["status"] == "built"))
        lineage.end(parent, "FAILED" if failures else "FINISHED")
    write_json_atomic(h.state / "last_report.json", report)
    rows = [{"stage": s, **{k: v for k, v in r.items() if k != "error"}} for s, r in report["stages"].items()]
    if rows:
        create_table_artifact(rows, key=artifact_key(flow_key, "run"), description="stages of this run")
    if failures:
        failed = [s for s, r in report["stages"].items() if r["status"] == "failed"]
        raise StagesFailed(failures[0] if len(failures) == 1 else f"{len(failures)} stages failed; first: {failures[0]}",
                           failed, sum(r["status"] == "blocked" for r in report["stages"].values()))
    return report

"""`family`: build, inspect and serve a family of language models.

Examples:
  family run                                   build the tiny family from the embedded default corpus
  family run --until tokenizer                 only the data stages and the tokenizer
  family run --set pretrain.max_steps=300      change one field; only pretrain and what follows rebuild
  family run --set dpo.beta=0.2 --dry-run      show what would run and why, run nothing
  family run --from sft                        force sft and everything downstream to rebuild
  family run --refresh crawl                   re-crawl; later stages rebuild only if the pages changed
  family run --recipe small --home /data/fam   another recipe, another home
  family status --json                         every stage's state, fingerprint and headline metrics
  family show filter                           one stage's artifact: files, config, metrics
  family sql "select reason, count(*) from excluded group by 1"
  family generate --model base "The json module"   sample from the base model
  family chat                                  talk to the chat champion (else the newest of grpo, dpo, sft)
  family report                                the family report's path and its summary (test split, gates)
  family chat --image scene.png --prompt "What colour is the shape?"   ask the vision-language member
  family search "json dumps" --mode hybrid     search the corpus (bm25, dense, hybrid, reranked)
  family rag "How do I parse a URL query string?"   answer from the corpus, with cited passages
  family ui                                    Prefect UI and MLflow UI on 127.0.0.1 (Ctrl-C stops both)
  family serve --refresh crawl                 nightly: re-crawl, rebuild only what the new pages change

The home (default ./.family, or FAMILY_HOME, or --home) holds every artifact, the MLflow database
and the Prefect database. A crashed run resumes where it stopped: run the same command again.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from storage.home import Home

LAST_RUN = "last_run.json"


def _err(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _add_common(p: argparse.ArgumentParser, recipe_default: str | None = "tiny") -> None:
    p.add_argument("--home", help="family home (default: $FAMILY_HOME or ./.family)")
    p.add_argument("--recipe", default=recipe_default, help="recipe name (flows/recipes/NAME.yaml) or path; default: %(default)s")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE", help="override one config field (repeatable)")


def _recipe_args(args: argparse.Namespace, home: Home) -> tuple[str, list[str]]:
    """Recipe and overrides: as given, else those of the last `family run` in this home."""
    if args.recipe is None:
        last = home.state / LAST_RUN
        if last.exists():
            d = json.loads(last.read_text())
            return d["recipe"], (d.get("overrides", []) if not args.overrides else args.overrides)
        return "tiny", args.overrides
    return args.recipe, args.overrides


def _plan(args: argparse.Namespace, home: Home, **sel: Any):
    from flows.plan import make_plan
    from flows.recipe import load_recipe

    recipe_name, overrides = _recipe_args(args, home)
    recipe = load_recipe(recipe_name, overrides)
    return recipe, overrides, make_plan(recipe, home, **sel)


def _print_plan(plans, recipe) -> None:
    width = max(len(p.stage) for p in plans)
    print(f"recipe {recipe.name} ({recipe.path.name}), {sum(p.action == 'run' for p in plans)} of {len(plans)} stages to run", file=sys.stderr)
    for p in plans:
        print(f"  {p.action:<4}  {p.stage:<{width}}  {p.fingerprint or 'pending':<16}  {p.why}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from stages.contract import ConfigError

    home = Home.resolve(args.home)
    try:
        recipe, overrides, plans = _plan(args, home, force_from=args.from_, only=args.only, until=args.until, refresh=args.refresh)
    except ConfigError as e:
        return _err(str(e))
    _print_plan(plans, recipe)
    if args.dry_run:
        return 0
    home.ensure()
    (home.state / LAST_RUN).write_text(json.dumps({"recipe": str(recipe.path), "overrides": overrides, "time": time.time()}))

    from flows.prefect_env import api_server, configure

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."
    configure(home)
    if not args.no_track:  # import MLflow while the Prefect API server starts (saves ~2 s)
        import threading

        threading.Thread(target=lambda: __import__("mlflow.tracking"), daemon=True).start()
    from stages.contract import StageError

    t0 = time.perf_counter()
    try:
        with api_server(home):  # before importing prefect: its settings are read once, at import
            from flows.family import family_flow

            report = family_flow(
                recipe=str(recipe.path), overrides=overrides, home=str(home.root),
                force_from=args.from_, only=args.only, until=args.until, refresh=args.refresh, track=not args.no_track,
            )  # fmt: skip
    except StageError as e:
        from flows.family import StagesFailed

        if isinstance(e, StagesFailed):  # each failure already has its line: say only what it means
            blocked = f", {e.blocked} after it not built" if e.blocked else ""
            print(f"failed: {', '.join(e.stages)}{blocked}; the rest is published. Fix it and run the same command "
                  f"again: finished stages are reused", file=sys.stderr)
            return 1
        return _err(str(e), 1)
    except KeyboardInterrupt:
        return _err("interrupted; run the same command again to resume", 130)
    if report.get("funnel"):
        from flows.funnel import render

        print(render(report["funnel"]["steps"], report["funnel"]["drops"]), file=sys.stderr)
    built = [s for s, r in report["stages"].items() if r["status"] == "built"]
    print(f"done in {time.perf_counter() - t0:.1f} s: {len(built)} built, {len(report['stages']) - len(built)} reused; home {home.root}", file=sys.stderr)
    if report.get("report"):
        champions = [r["member"] for r in report.get("champions", []) if r["champion"].startswith("models:/")]
        print(f"family report: {report['report']} (`family report`); champion: {', '.join(champions) or 'none'}", file=sys.stderr)
    print("next: `family status`, `family ui`, `family sql \"select * from docs_clean limit 5\"`", file=sys.stderr)
    return 0


def status_doc(args: argparse.Namespace) -> dict[str, Any]:
    home = Home.resolve(args.home)
    recipe, _, plans = _plan(args, home)
    stages = []
    for p in plans:
        pub = p.published
        stages.append(
            {
                "stage": p.stage,
                "state": p.state,
                "fingerprint": p.fingerprint,
                "why": p.why if p.action == "run" else "published, unchanged",
                "path": str(pub.dir) if pub else None,
                "metrics": {k: v for k, v in pub.result.get("metrics", {}).items()} if pub else {},
                "warnings": list(pub.result.get("warnings", [])) if pub else [],
            }
        )
    doc = {"recipe": recipe.name, "home": str(home.root), "stages": stages}
    evaluation = published_evaluation(recipe, plans)
    if evaluation is not None:  # the evaluate stage's figures are the headline: test split, interval, baseline
        path, evaluation = evaluation
        doc |= {"evaluation": str(path), "headline": evaluation["headline"], "gates": evaluation["gates"]}
    return doc


def published_evaluation(recipe, plans) -> tuple[Path, dict[str, Any]] | None:
    """(path, content) of evaluation.json of the recipe's evaluate stage (the producer of `report`)
    when it is published."""
    stage = recipe.producers.get("report")
    pub = next((p.published for p in plans if p.stage == stage), None)
    path = pub.dir / "report" / "evaluation.json" if pub is not None else None
    return (path, json.loads(path.read_text())) if path is not None and path.exists() else None


def cmd_status(args: argparse.Namespace) -> int:
    from stages.contract import ConfigError

    try:
        doc = status_doc(args)
    except ConfigError as e:
        return _err(str(e))
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(f"recipe {doc['recipe']}  home {doc['home']}")
    if doc.get("headline"):
        print("stages (each stage's own figures; a trainer's are on val, the split its settings are tuned on):")
    width = max(len(s["stage"]) for s in doc["stages"])
    for s in doc["stages"]:
        m = s["metrics"]
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(m.items())[:5] if isinstance(v, (int, float)) and k != "stage_seconds")
        if s["path"] and Path(s["path"], "report", "evaluation.json") == Path(doc.get("evaluation", "")):
            gates = doc.get("gates", [])  # the evaluate stage: its gates, then the test headline
            shown = f"gates {sum(g['passed'] for g in gates)}/{len(gates)} pass; " + ", ".join(
                f"{h['member']} {h['figure']} {h['value']:.3f}" for h in doc["headline"][:4])
        tail = shown if s["state"] == "published" else s["why"]
        print(f"  {s['state']:<9}  {s['stage']:<{width}}  {s['fingerprint'] or 'pending':<16}  {tail}")
        for w in s["warnings"]:
            print(f"  {'':<9}  {'':<{width}}  WARNING {w}")
    if doc.get("headline"):
        print("headline (the test split, scored by evaluate; 95% intervals; `family report` for the rest):")
        name_w = max(len(h["member"]) for h in doc["headline"])
        for h in doc["headline"]:
            print(f"  {h['member']:<{name_w}}  {h['figure']:<8} {h['value']:.3f} [{h['lo']:.3f}, {h['hi']:.3f}]  "
                  f"{h['baseline_name']} {h['baseline']:.3f}  (n={h['n']})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the path of the family report (report.html) and its text summary: every member on the
    test split with its interval and baseline, the paired deltas, the gates."""
    from stages.contract import ConfigError
    from storage.artifacts import ArtifactStore

    home = Home.resolve(args.home)
    try:
        recipe, _, plans = _plan(args, home)
    except ConfigError as e:
        return _err(str(e))
    stage = recipe.producers.get("report")
    if stage is None:
        return _err(f"recipe {recipe.name} has no evaluate stage (add `evaluate: {{}}` to its stages)")
    plan = next(p for p in plans if p.stage == stage)
    pub = plan.published
    if pub is None:
        history = ArtifactStore(home).history(stage)
        if not history:
            return _err(f"no family report in {home.root} yet; `family run` ends with {stage}, which writes it", 1)
        pub = history[0]
        print(f"note: this report is from an earlier build ({pub.fingerprint}); {stage} would rebuild: {plan.why}", file=sys.stderr)
    report = pub.dir / "report"
    if args.markdown:  # the README's table, regenerated from the report of this home's run
        from stages.report.html import markdown_summary

        print(markdown_summary(json.loads((report / "evaluation.json").read_text())))
        return 0
    print(report / "report.html")
    summary = report / "summary.txt"
    if summary.exists():
        print(summary.read_text(), end="")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from storage.artifacts import ArtifactStore

    home = Home.resolve(args.home)
    store = ArtifactStore(home)
    history = store.history(args.stage)
    if not history:
        known = ", ".join(store.stages()) or "none yet"
        return _err(f"no published artifact for stage {args.stage!r} in {home.root} (published stages: {known})")
    pub = next((p for p in history if p.fingerprint == args.fingerprint), None) if args.fingerprint else history[0]
    if pub is None:
        return _err(f"stage {args.stage} has no artifact {args.fingerprint}")
    res = pub.result
    if args.json:
        print(json.dumps({"dir": str(pub.dir), "config": pub.config, "result": res, "manifest": pub.manifest}, indent=2, default=str))
        return 0
    print(f"{args.stage} {pub.fingerprint}  {pub.dir}")
    for problem in pub.problems():
        print(f"WARNING damaged: {problem}; `family run` rebuilds it")
    print(f"built {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(pub.manifest['published_at']))} in {res.get('seconds', 0):.1f} s")
    print("config:")
    for k, v in pub.config.get("config", {}).items():
        print(f"  {k} = {v}")
    if res.get("metrics"):
        print("metrics:")
        for k, v in res["metrics"].items():
            print(f"  {k} = {v:.6g}" if isinstance(v, (int, float)) else f"  {k} = {v}")
    print("outputs:")
    for name, art in pub.artifacts().items():
        print(f"  {name}: {art.path}")
        for f in sorted(Path(art.path).glob("*.gguf")) if Path(art.path).is_dir() else ():
            print(f"    {f}")  # the GGUF files llama.cpp and Ollama load
    total = sum(f["bytes"] for f in pub.manifest["files"])
    print(f"files: {len(pub.manifest['files'])} ({total / 1e6:.2f} MB)")
    if res.get("summary"):
        print("\n" + res["summary"])
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every file of the recipe's published artifacts (or of one stage) against its manifest:
    existence, size and sha256 of every byte."""
    from stages.contract import ConfigError

    home = Home.resolve(args.home)
    try:
        recipe, _, plans = _plan(args, home)
    except ConfigError as e:
        return _err(str(e))
    if args.stage and args.stage not in recipe.stages:
        return _err(f"recipe {recipe.name} has no stage {args.stage!r} (stages: {', '.join(recipe.stages)})")
    from storage.artifacts import ArtifactStore

    store, bad, checked = ArtifactStore(home), 0, 0
    for p in plans:
        if args.stage and p.stage != args.stage:
            continue
        pub = store.published(p.stage, p.fingerprint) if p.fingerprint else None
        if pub is None:
            print(f"  -  {p.stage:<10} not published ({p.state})")
            continue
        checked += 1
        damage = pub.problems(deep=True)
        if damage:
            bad += 1
            print(f"  x  {p.stage:<10} {p.fingerprint} DAMAGED: " + "; ".join(damage))
        else:
            size = sum(f["bytes"] for f in pub.manifest.get("files", []))
            print(f"  ok {p.stage:<10} {p.fingerprint} {len(pub.manifest.get('files', []))} files, {size / 1e6:.2f} MB")
    print(f"{checked} artifacts checked, {bad} damaged" + ("; `family run` rebuilds them" if bad else ""))
    return 1 if bad else 0


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the traceback of a stage's last internal error (written to <home>/logs/ by `family run`)."""
    home = Home.resolve(args.home)
    found = sorted(home.logs.glob(f"{args.stage}-*.log"), key=lambda p: p.stat().st_mtime) if home.logs.is_dir() else []
    if not found:
        return _err(f"no internal-error log of stage {args.stage!r} in {home.logs} (a user error is the one line `family run` printed)", 1)
    print(f"# {found[-1]}")
    print(found[-1].read_text(), end="")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from storage.catalog import connect, datasets

    home = Home.resolve(args.home)
    con = connect(home)
    if not args.query:
        for name, glob in datasets(home).items():
            if "__" not in name:
                print(f"{name:<16} {glob}")
        return 0
    try:
        rel = con.sql(args.query)
    except duckdb.Error as e:
        views = ", ".join(v for v in datasets(home) if "__" not in v) or "none (run `family run` first)"
        return _err(f"{str(e).splitlines()[0]} (views: {views})")
    if rel is None:
        return 0
    if args.format == "json":
        cols = rel.columns
        for row in rel.fetchall():
            print(json.dumps(dict(zip(cols, row)), default=str))
    elif args.format == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(rel.columns)
        w.writerows(rel.fetchall())
    else:
        rel.show(max_width=int(os.environ.get("COLUMNS", "160")), max_rows=args.limit)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import urllib.request

    from flows.processes import die_with_parent, free_port

    home = Home.resolve(args.home).ensure()
    prefect_port = free_port(args.prefect_port)
    mlflow_port = free_port(args.mlflow_port)
    # the UI's own API address: without it the UI calls the default port (4200) and shows "Can't connect
    # to Server API" whenever the server listens elsewhere (tests/flows/test_dashboards.py)
    env = dict(os.environ, PREFECT_HOME=str(home.prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=f"http://127.0.0.1:{prefect_port}/api")
    env.pop("PREFECT_API_URL", None)
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env=env, preexec_fn=die_with_parent, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", home.mlflow_uri,
             "--default-artifact-root", home.mlflow_artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(mlflow_port)],
            env=env, preexec_fn=die_with_parent, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        ),
    ]  # fmt: skip
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    info = home.prefect_home / "server.json"

    def stop(*_: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan the servers
        info.unlink(missing_ok=True)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print("starting Prefect server and MLflow UI on 127.0.0.1 ...", file=sys.stderr)
    try:
        deadline = time.monotonic() + args.timeout
        ready: set[str] = set()
        while len(ready) < 2:
            for name, url in (("prefect", f"{prefect_url}/api/health"), ("mlflow", f"{mlflow_url}/health")):
                if name in ready:
                    continue
                try:
                    with urllib.request.urlopen(url, timeout=1) as r:
                        if r.status == 200:
                            ready.add(name)
                except OSError:
                    pass
            for p in procs:
                if p.poll() is not None:
                    stop()
                    return _err(f"{Path(p.args[0]).name} exited with code {p.returncode} while starting", 1)
            if time.monotonic() > deadline:
                stop()
                return _err(f"servers not healthy after {args.timeout} s", 1)
            time.sleep(0.5)
        info.write_text(json.dumps({"api_url": f"{prefect_url}/api", "mlflow_url": mlflow_url, "pid": os.getpid()}))
        print(f"Prefect UI  {prefect_url}", flush=True)
        print(f"MLflow UI   {mlflow_url}", flush=True)
        for what, link in deep_links(home, prefect_url, mlflow_url).items():
            print(f"  {what:<22} {link}", flush=True)
        print("`family run` in another shell now reports to these servers. Ctrl-C stops both.", file=sys.stderr, flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return _err("a server stopped unexpectedly", 1)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr)
        return 0
    finally:
        stop()


def deep_links(home: Home, prefect_url: str, mlflow_url: str) -> dict[str, str]:
    """Where a user looks first: the newest flow run in the Prefect UI, the family's runs in MLflow's
    model-training view (MLflow 3 opens on its GenAI view otherwise), the registered models, and
    the family report when there is one. A link that cannot be found is left out."""
    import urllib.request

    links: dict[str, str] = {}
    try:
        req = urllib.request.Request(f"{prefect_url}/api/flow_runs/filter", data=json.dumps({"sort": "START_TIME_DESC", "limit": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.loads(r.read())
        if runs:
            links["latest flow run"] = f"{prefect_url}/runs/flow-run/{runs[0]['id']}"
    except (OSError, ValueError, KeyError):
        pass
    if home.mlflow_db.exists():
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(home.mlflow_uri)
            exps = [e for e in client.search_experiments() if e.name != "Default"]
            last = json.loads((home.state / LAST_RUN).read_text()).get("recipe", "") if (home.state / LAST_RUN).exists() else ""
            exps.sort(key=lambda e: (Path(last).stem and e.name == f"family-{Path(last).stem}", e.last_update_time or 0), reverse=True)
            if exps:
                links["MLflow runs"] = f"{mlflow_url}/#/experiments/{exps[0].experiment_id}/runs?workflowType=machine_learning"
            if client.search_registered_models(max_results=1):
                links["registered models"] = f"{mlflow_url}/#/models"
        except Exception:  # a link must never stop the dashboards
            pass
    for report in sorted(home.artifacts.glob("evaluate/*/report/report.html")) if home.artifacts.is_dir() else []:
        links["family report"] = report.as_uri()
    return links


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the family flow on a schedule from this process (no work pool needed)."""
    from flows.recipe import resolve_path
    from stages.contract import ConfigError

    home = Home.resolve(args.home)
    try:
        recipe = resolve_path(args.recipe)
    except ConfigError as e:
        return _err(str(e))
    from flows.prefect_env import api_server, configure

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."
    home.ensure()
    configure(home)
    refresh = args.refresh or ["crawl"]
    params = {"recipe": str(recipe), "home": str(home.root), "refresh": refresh, "overrides": args.overrides}
    when = {"interval": args.interval} if args.interval else {"cron": args.cron}
    info = home.prefect_home / "serve.json"
    # a server with its services: its scheduler creates the deployment's runs, this process executes them
    with api_server(home, services=True) as url:
        info.write_text(json.dumps({"api_url": url, "deployment": f"family/{args.name}", "pid": os.getpid(), **when}))
        print(f"serving deployment family/{args.name} ({', '.join(f'{k} {v}' for k, v in when.items())}; refresh "
              f"{', '.join(refresh)}) on {url}; Ctrl-C stops", file=sys.stderr, flush=True)
        from flows.family import family_flow

        try:
            family_flow.serve(name=args.name, parameters=params, limit=1, pause_on_shutdown=False, print_starting_message=False,
                              **when)
        except KeyboardInterrupt:
            pass
        finally:
            info.unlink(missing_ok=True)
    return 0


CHAT_MODELS = ("grpo", "dpo", "sft")  # newest stage of the chat line first


def registered_model(home: Home, uri: str) -> Path:
    """The local directory of `models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@ALIAS` in
    the home's registry (resolved with an explicit client: mlflow's module-level helpers would look in
    the default registry of the working directory)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    ref = uri.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    name, _, version = name.partition("/") if not sep else (name, "", "")
    client = MlflowClient(home.mlflow_uri, registry_uri=home.mlflow_uri)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version in ("", "latest"):
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MlflowException(f"no versions of {name!r}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise FileNotFoundError(f"{uri}: not in the registry of {home.root} ({str(e).splitlines()[0]}; registered: {known})") from None
    local = Path(client.download_artifacts(mv.run_id, "model")) if not mv.source.startswith("file:") else Path(mv.source.removeprefix("file://"))
    if not (local / "config.json").exists():
        raise FileNotFoundError(f"{uri}: the registered files at {local} are not a model directory")
    return local


def resolve_model(home: Home, name: str) -> Path:
    """A model directory from a path, an output name (base, sft, dpo, grpo, small, chat_int8 or
    chat-int8, ...), `chat` (the newest stage of the chat line that is published) or a registry URI
    (`models:/tiny-chat/latest`, `models:/tiny-chat/3`), resolved in the home's MLflow registry."""
    from storage.artifacts import ArtifactStore

    p = Path(name)
    if p.is_dir() and (p / "config.json").exists():
        return p
    if name.startswith("models:/"):
        return registered_model(home, name)
    store = ArtifactStore(home)
    wanted = CHAT_MODELS if name == "chat" else (name.replace("-", "_"),)  # member names say chat-int4
    for out in wanted:
        for stage in store.stages():
            for pub in store.history(stage):
                art = pub.artifacts().get(out)
                if art is not None:
                    damage = pub.problems()
                    if damage:
                        raise FileNotFoundError(f"model {out!r} of stage {stage} is damaged ({damage[0]}); "
                                                f"`family run` rebuilds it")
                    return Path(art.path)
    known = sorted({o for s in store.stages() for pub in store.history(s)[:1] for o in pub.artifacts() if (Path(pub.dir) / o / "config.json").exists()})
    raise FileNotFoundError(f"no model {name!r} in {home.root} (models: {', '.join(known) or 'none yet; run `family run`'})")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from models.generate import generate
    from models.quant import load_model
    from models.tokenizer import Tokenizer

    try:
        model_dir = resolve_model(Home.resolve(args.home), "vl" if args.image and args.model == "base" else args.model)
    except FileNotFoundError as e:
        return _err(str(e))
    if args.image:
        from flows.chat import vl_generate_main

        return vl_generate_main(model_dir, args.image, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    torch.manual_seed(args.seed)
    model = load_model(model_dir).eval()  # plain or quantized (QuantLinear)
    tok = Tokenizer.load(model_dir)
    prompts = [tok.encode(p) for p in args.prompt]
    gen = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        outs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=(tok.eot_id,), pad_id=tok.eot_id, generator=gen)
    for prompt, out in zip(args.prompt, outs):
        print(prompt + tok.decode(out))
        if len(args.prompt) > 1:
            print("-" * 40)
    return 0


def chat_champion(home: Home) -> Path | None:
    """The model directory of the chat champion, `models:/<recipe>-chat@champion`: the chat member
    (what the recipe registers grpo, dpo or sft as) of the recipe last run in this home, else the
    newest `*-chat` model with that alias; None when no gate promoted one (or nothing is tracked)."""
    if not home.mlflow_db.exists():
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from flows.recipe import RecipeError, read_raw

    wanted = None
    try:
        raw = read_raw(Path(json.loads((home.state / LAST_RUN).read_text())["recipe"]))
        register = raw.get("register") or {}
        member = next((register[o] for o in CHAT_MODELS if o in register), None)
        wanted = f"{raw.get('name') or 'tiny'}-{member}" if member else None
    except (RecipeError, OSError, ValueError, KeyError):
        pass
    try:
        models = [m for m in MlflowClient(home.mlflow_uri, registry_uri=home.mlflow_uri).search_registered_models()
                  if "champion" in (m.aliases or {})]
    except MlflowException:
        return None
    pick = next((m for m in models if m.name == wanted), None) or max(
        (m for m in models if m.name.endswith("-chat")), key=lambda m: m.last_updated_timestamp or 0, default=None)
    try:
        return registered_model(home, f"models:/{pick.name}@champion") if pick else None
    except FileNotFoundError:
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    from flows.chat import chat_main

    home = Home.resolve(args.home)
    try:
        model_dir = chat_champion(home) if args.model == "chat" and not args.image else None
        model_dir = model_dir or resolve_model(home, "vl" if args.image and args.model == "chat" else args.model)
    except FileNotFoundError as e:
        return _err(str(e))
    if args.image:
        from flows.chat import vl_chat_main

        return vl_chat_main(model_dir, args.image, args.prompt, args.max_new_tokens, args.temperature, args.system)
    return chat_main(model_dir, args.prompt, args.max_new_tokens, args.temperature, args.system)


def _retrieval_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The passages, embedder, reranker and chat model of the home (names, paths or registry URIs)."""
    home = Home.resolve(args.home)
    names = {"passages": "passages", "embedder": args.embedder, "reranker": args.reranker,
             "chat": getattr(args, "model", "chat")}
    return {k: resolve_model(home, v) for k, v in names.items() if k != "chat" or args.command == "rag"}


def cmd_search(args: argparse.Namespace) -> int:
    from flows.rag import search_main

    try:
        paths = _retrieval_paths(args)
    except FileNotFoundError as e:
        return _err(str(e))
    return search_main(paths, args.query, args.mode, args.k)


def cmd_rag(args: argparse.Namespace) -> int:
    from flows.rag import rag_main

    try:
        paths = _retrieval_paths(args)
    except FileNotFoundError as e:
        return _err(str(e))
    return rag_main(paths, args.question, args.k, args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="family", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="build the family (reusing every published stage)", description=cmd_run.__doc__ or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--from", dest="from_", metavar="STAGE", help="force STAGE and everything downstream to rebuild")
    p.add_argument("--only", metavar="STAGE", help="run only STAGE (its inputs must be built)")
    p.add_argument("--until", metavar="STAGE", help="run STAGE and what it depends on, nothing after it")
    p.add_argument("--refresh", action="append", default=[], metavar="STAGE", help="rerun STAGE although published (e.g. crawl for new pages); what follows rebuilds only if its output changed")
    p.add_argument("--dry-run", action="store_true", help="print what would run or be reused, and why; run nothing")
    p.add_argument("--no-track", action="store_true", help="do not record MLflow runs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="each stage's state, fingerprint and headline metrics")
    _add_common(p, recipe_default=None)
    p.add_argument("--json", action="store_true", help="one JSON object: {recipe, home, stages: [...]}")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="the family report: its path (report.html) and a text summary",
                       description=cmd_report.__doc__)
    _add_common(p, recipe_default=None)
    p.add_argument("--markdown", action="store_true", help="print the headline and gates as the README's markdown table")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("show", help="one stage's published artifact")
    p.add_argument("stage")
    p.add_argument("--fingerprint", help="an older artifact of the stage (default: newest)")
    p.add_argument("--home")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("verify", help="check every byte of the published artifacts against their manifests",
                       description="Check the published artifacts of the recipe's stages (or of STAGE) against their manifests: "
                       "every file's existence, size and sha256. `family run` also checks sizes (and the sha256 of "
                       "small files) before it reuses an artifact, and rebuilds a damaged one. Exit code 1 when one is damaged.")
    p.add_argument("stage", nargs="?", help="only this stage")
    _add_common(p, recipe_default=None)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("logs", help="the traceback of a stage's last internal error")
    p.add_argument("stage")
    p.add_argument("--home")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("sql", help="query every published dataset with DuckDB", epilog='example: family sql "select reason, count(*) n from excluded group by 1 order by n desc"')
    p.add_argument("query", nargs="?", help="SQL; with no query, list the views")
    p.add_argument("--home")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--limit", type=int, default=40, help="rows shown in table format")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("generate", help="sample text from a model of the family", epilog='example: family generate --model base "The json module"')
    p.add_argument("prompt", nargs="+", help="one or more prompts (batched)")
    p.add_argument("--model", default="base", help="base, sft, dpo, grpo, chat, small, chat-int8, chat-int4, a registry URI (models:/tiny-base/latest), or a model directory (default: base)")
    p.add_argument("--home")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", action="append", help="an image (PNG/JPEG, any size) for the vision-language model (then --model defaults to vl)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model of the family (interactive, or one-shot with --prompt)", epilog='example: family chat --prompt "What is 12 + 30?"')
    p.add_argument("--model", default="chat", help="chat (the chat champion: models:/<recipe>-chat@champion, the newest chat model that passed its gates; else the newest of grpo, dpo, sft), sft, dpo, grpo, small (distilled), chat-int8, chat-int4, small-int4 (quantized), a registry URI (models:/tiny-chat/latest), or a model directory")
    p.add_argument("--prompt", help="one-shot: answer this and exit")
    p.add_argument("--system", help="a system message")
    p.add_argument("--home")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--image", action="append", help="ask about an image (PNG/JPEG, any size; resized with a note) with the vision-language model (--model defaults to vl)")
    p.set_defaults(func=cmd_chat)

    for name, helptext in (("search", "search the corpus: BM25, dense, hybrid or reranked"),
                           ("rag", "answer a question from the corpus, citing the passages used, or say it is not "
                                   "found there (and why)")):
        p = sub.add_parser(name, help=helptext, epilog=f'example: family {name} "How do I parse a URL query string?"')
        p.add_argument("query" if name == "search" else "question")
        p.add_argument("--k", type=int, default=5 if name == "search" else 2, help="passages shown (rag: put in the context)")
        p.add_argument("--embedder", default="embedder", help="embedder: an output name, a model directory or a registry URI")
        p.add_argument("--reranker", default="reranker", help="reranker: an output name, a model directory or a registry URI")
        p.add_argument("--home")
        if name == "search":
            p.add_argument("--mode", choices=["bm25", "dense", "hybrid", "reranked"], default="reranked")
            p.set_defaults(func=cmd_search)
        else:
            p.add_argument("--model", default="chat", help="the chat model that answers (default: the newest of grpo, dpo, sft)")
            p.add_argument("--max-new-tokens", type=int, default=64)
            p.set_defaults(func=cmd_rag)

    p = sub.add_parser("serve", help="run the family flow on a schedule (e.g. a nightly re-crawl)", epilog="example: family serve --cron '0 3 * * *' --refresh crawl")
    _add_common(p)
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", default="0 3 * * *", help="schedule (default: every night at 03:00)")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS instead of on a cron schedule")
    p.add_argument("--refresh", action="append", default=[], metavar="STAGE", help="stages rerun on every scheduled run (default: crawl)")
    p.add_argument("--name", default="nightly", help="deployment name")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="Prefect UI and MLflow UI for this home on 127.0.0.1")
    p.add_argument("--home")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the servers to be healthy")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.getcwd() not in sys.path:  # a recipe's `modules:` resolve from the current directory, like `python -m`
        sys.path.insert(0, os.getcwd())
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

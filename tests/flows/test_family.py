"""The family flow on toy stages: reuse, resume, --from, --dry-run, MLflow lineage, failures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main as cli
from flows.plan import make_plan
from flows.recipe import load_recipe
from storage.artifacts import ArtifactStore
from storage.home import Home

TOY = str(Path(__file__).parent / "toy" / "toy.yaml")


@pytest.fixture
def calls(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("TOY_CALLS_LOG", str(log))

    def read() -> list[str]:
        out = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return out

    return read


def run_flow(home: Path, *overrides: str, **kw):
    from flows.family import family_flow

    return family_flow(recipe=TOY, overrides=list(overrides), home=str(home), **kw)


def test_run_reuse_and_rebuild_only_downstream(tmp_path, calls, prefect_server):
    home = tmp_path / "home"
    report = run_flow(home)
    assert calls() == ["source", "square", "total"]
    assert {s: r["status"] for s, r in report["stages"].items()} == {"source": "built", "square": "built", "total": "built"}

    report = run_flow(home)
    assert calls() == [] and all(r["status"] == "reused" for r in report["stages"].values())

    run_flow(home, "square.power=3")  # one field: that stage and what depends on it
    assert calls() == ["square", "total"]
    total = json.loads(Path(ArtifactStore(Home(home)).history("total")[0].artifacts()["total"].path).read_text())
    assert total["total"] == sum(x**3 for x in range(10))

    run_flow(home, force_from="square")  # --from: forced even though published
    assert calls() == ["square", "total"]
    run_flow(home, only="total", force_from="total")
    assert calls() == ["total"]


def test_dry_run_explains_why(tmp_path, calls, prefect_server, capsys):
    home = tmp_path / "home"
    run_flow(home)
    calls()
    capsys.readouterr()
    assert cli(["run", "--recipe", TOY, "--home", str(home), "--set", "square.power=4", "--dry-run"]) == 0
    err = capsys.readouterr().err
    lines = {ln.split()[1]: ln for ln in err.splitlines() if ln.split()[:1] in (["run"], ["skip"])}
    assert lines["source"].split()[0] == "skip"
    assert lines["square"].split()[0] == "run" and "config square.power: 2 -> 4" in lines["square"]
    assert lines["total"].split()[0] == "run" and "after square rebuilds" in lines["total"]
    assert calls() == [], "a dry run runs nothing"

    assert cli(["status", "--json", "--recipe", TOY, "--home", str(home)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["state"] for s in doc["stages"]] == ["published"] * 3
    assert doc["stages"][2]["metrics"]["total"] == 285.0


def test_failed_stage_publishes_nothing_and_blocks_downstream(tmp_path, calls, prefect_server):
    from stages.contract import StageError

    home = tmp_path / "home"
    with pytest.raises(StageError, match=r"source: asked to fail \(source.fail=true\)"):
        run_flow(home, "source.fail=true")
    store = ArtifactStore(Home(home))
    assert store.history("source") == [] and store.history("square") == []
    plan = {p.stage: p for p in make_plan(load_recipe(TOY, ["source.fail=true"]), Home(home))}
    assert plan["source"].state == "failed" and "asked to fail" in plan["source"].why
    run_flow(home)  # fixed config: runs cleanly
    assert calls() == ["source", "square", "total"]


def test_mlflow_parent_and_child_runs(tmp_path, calls, prefect_server):
    from mlflow.tracking import MlflowClient

    home = Home(tmp_path / "home")
    run_flow(home.root, "square.steps=3")
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name("family-toy")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and set(children) == {"source", "square", "total"}
    sq = children["square"]
    assert sq.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert sq.data.params["power"] == "2" and sq.data.metrics["sum"] == 285.0
    assert {m.step for m in client.get_metric_history(sq.info.run_id, "acc")} >= {0, 1, 2}  # the curve
    assert sq.data.tags["fingerprint"] and sq.data.tags["prefect.flow_run_id"]
    assert sq.info.status == "FINISHED"
    assert Path(exp.artifact_location.removeprefix("file://")).is_absolute()
    versions = client.search_model_versions("name = 'toy-total'")  # the recipe's `register:`
    assert [v.run_id for v in versions] == [children["total"].info.run_id]


def test_catalog_and_sql(tmp_path, calls, prefect_server, capsys):
    home = tmp_path / "home"
    run_flow(home)
    assert cli(["sql", "select sum(x) as s from numbers", "--home", str(home), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out.strip()) == {"s": 45}
    assert cli(["sql", "select * from nope", "--home", str(home)]) == 2
    assert "views: numbers" in capsys.readouterr().err


def test_refresh_with_unchanged_output_rebuilds_nothing_downstream(tmp_path, calls, prefect_server, capsys):
    """Early cutoff: inputs are keyed by content, so a refreshed stage writing the same bytes
    (a nightly crawl that found nothing new) leaves everything after it reused."""
    home = tmp_path / "home"
    run_flow(home)
    calls()
    report = run_flow(home, refresh=["source"])
    assert calls() == ["source"]
    assert report["stages"]["square"]["status"] == "reused" and report["stages"]["total"]["status"] == "reused"

    capsys.readouterr()
    assert cli(["run", "--recipe", TOY, "--home", str(home), "--set", "source.n=11", "--dry-run"]) == 0
    err = capsys.readouterr().err
    lines = {ln.split()[1]: ln for ln in err.splitlines() if ln.split()[:1] in (["run"], ["skip"])}
    assert "config source.n: 10 -> 11" in lines["source"]
    assert "after source rebuilds" in lines["square"] and "after square rebuilds" in lines["total"]
    run_flow(home, "source.n=11")
    assert calls() == ["source", "square", "total"]


@pytest.mark.slow
def test_stage_launched_under_torchrun(tmp_path, calls, prefect_server, monkeypatch):
    """`launch: {square: {nproc: 2}}` runs the stage as `python -m <module>` under torchrun, in its
    own process group; rank 0 reports the result, metrics reach the MLflow child run."""
    from mlflow.tracking import MlflowClient

    recipe = tmp_path / "toy2.yaml"
    recipe.write_text(Path(TOY).read_text() + "launch:\n  square: {nproc: 2}\n")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    from flows.family import family_flow

    home = Home(tmp_path / "home")
    report = family_flow(recipe=str(recipe), home=str(home.root))
    assert report["stages"]["square"]["status"] == "built"
    assert calls().count("square") == 2, "both ranks ran the stage body"
    square = ArtifactStore(home).history("square")[0]
    assert square.result["metrics"]["sum"] == 285.0
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name("family-toy")
    child = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "square"][0]
    assert {m.step for m in client.get_metric_history(child.info.run_id, "acc")} >= {0, 4}


def test_user_file_content_is_part_of_the_fingerprint(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("v1")
    home = Home(tmp_path / "home")
    plan = {p.stage: p for p in make_plan(load_recipe(TOY, [f"source.notes_file={notes}"]), home)}
    fp1 = plan["source"].fingerprint
    notes.write_text("v2")
    fp2 = {p.stage: p for p in make_plan(load_recipe(TOY, [f"source.notes_file={notes}"]), home)}["source"].fingerprint
    assert fp1 != fp2
    notes.write_text("v1")
    assert {p.stage: p for p in make_plan(load_recipe(TOY, [f"source.notes_file={notes}"]), home)}["source"].fingerprint == fp1


def test_stage_cli_keeps_checkpoints_next_to_each_run_dir(tmp_path, calls):
    """`python -m stages.X --run-dir DIR` without --checkpoint-dir: DIR.ckpt, so two runs in one
    folder (a square run, then another square run elsewhere in that folder) never resume each other."""
    from stages.contract import main
    from tests.flows.toy import source, square

    assert main(source, ["--run-dir", str(tmp_path / "src")]) == 0
    numbers = tmp_path / "src" / "numbers"
    (tmp_path / "i.json").write_text(json.dumps({"numbers": str(numbers)}))
    (tmp_path / "c.json").write_text(json.dumps({"steps": 3}))
    assert main(square, ["--run-dir", str(tmp_path / "a"), "--inputs", str(tmp_path / "i.json"), "--config", str(tmp_path / "c.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "a.ckpt").iterdir())[-1] == "step-00000003"
    assert main(square, ["--run-dir", str(tmp_path / "b"), "--inputs", str(tmp_path / "i.json")]) == 0
    result = json.loads((tmp_path / "result.json").read_text()) if (tmp_path / "result.json").exists() else None
    assert (tmp_path / "b.ckpt").is_dir() and result is not None and result["metrics"]["resumed_from"] == 0.0


def test_a_stage_warning_is_loud_in_the_run_status_and_mlflow(tmp_path, calls, prefect_server, capsys):
    """A trainer whose time cap fired returns `stopped_by: max_minutes: ...`: the run prints it, `family
    status` shows it under the stage (and in --json), and the stage's MLflow run carries it as a tag."""
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    warning = "stopped_by: max_minutes: square stopped at step 3 of 5 after the 1-minute safety cap"
    capsys.readouterr()
    run_flow(home, f"square.warn={warning}")
    assert f"! square     WARNING {warning}" in capsys.readouterr().err
    args = ["--recipe", TOY, "--home", str(home), "--set", f"square.warn={warning}"]
    assert cli(["status", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(lines) if " square " in line)
    assert lines[i + 1].strip() == f"WARNING {warning}"
    assert cli(["status", "--json", *args]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {s["stage"]: s["warnings"] for s in doc["stages"]} == {"source": [], "square": [warning], "total": []}
    runs = MlflowClient(Home(home).mlflow_uri).search_runs(
        [e.experiment_id for e in MlflowClient(Home(home).mlflow_uri).search_experiments()], "tags.stage = 'square'")
    assert runs and runs[0].data.tags["warnings"] == warning


@pytest.mark.parametrize("damage", ["truncate", "delete", "same_size"])
def test_a_damaged_artifact_is_rebuilt_with_one_warning(tmp_path, calls, prefect_server, capsys, damage):
    """Files of a published artifact changed after publishing (a truncated model file, a deleted shard,
    bytes flipped in place): `family run` says so in one line naming the file, treats the artifact as
    unpublished and rebuilds it; what depends on it is reused when the rebuilt bytes are the same."""
    home = tmp_path / "home"
    run_flow(home)
    calls()
    pub = ArtifactStore(Home(home)).history("square")[0]
    f = pub.dir / "squares" / "squares.json"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:3])
    elif damage == "delete":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes().replace(b"1", b"7"))

    assert cli(["verify", "--recipe", TOY, "--home", str(home)]) == 1
    out = capsys.readouterr().out
    assert "x  square" in out and str(f) in out and "1 damaged" in out
    assert cli(["status", "--recipe", TOY, "--home", str(home)]) == 0
    assert "damaged" in capsys.readouterr().out

    report = run_flow(home)
    assert calls() == ["square"]  # rebuilt; total's input has the same content again: reused
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "square" in warnings[0] and str(f) in warnings[0] and "Traceback" not in err
    assert report["stages"]["square"]["status"] == "built" and report["stages"]["total"]["status"] == "reused"
    assert cli(["verify", "--recipe", TOY, "--home", str(home)]) == 0
    assert "0 damaged" in capsys.readouterr().out


def test_a_user_error_is_one_line_on_the_terminal(tmp_path):
    """As a user runs it: a StageError reaches the terminal as one line naming what and where, with no
    Python traceback (Prefect's task and flow engines would print one each) and no `Error logging to
    API` after the run's API server stops."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--recipe", TOY, "--home", str(tmp_path / "home"),
                           "--set", "source.fail=true"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    err = proc.stderr
    assert err.count("source: asked to fail (source.fail=true)") == 1, err
    assert "Traceback" not in err and "Error logging to API" not in err and "All connection attempts failed" not in err, err
    assert "  x source     failed: source: asked to fail (source.fail=true)" in err.splitlines()
    assert err.splitlines()[-1].startswith("failed: source, 2 after it not built")


def test_an_internal_error_keeps_its_traceback_in_a_log_file(tmp_path, calls, prefect_server, capsys):
    from stages.contract import StageError

    home = tmp_path / "home"
    capsys.readouterr()
    with pytest.raises(StageError, match=r"stage total: internal error KeyError: 'no such key'; traceback in .*total-"):
        run_flow(home, "total.crash=true")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("  x total")]
    log_file = Path(line.rsplit("traceback in ", 1)[1])
    assert log_file.parent == Home(home).logs and "Traceback" in log_file.read_text()
    assert cli(["logs", "total", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {log_file}") and 'KeyError: \'no such key\'' in out and "toy/total.py" in out
    assert cli(["logs", "square", "--home", str(home)]) == 1

"""End to end: the whole family DAG on the `micro` recipe (real pydoc crawl, every stage, real
Prefect and MLflow), then the promises a user relies on: a second run reuses everything, status
shows every stage published with its headline metrics, the chat model answers, it is registered."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.cli import main as cli
from flows.recipe import load_recipe
from storage.home import Home

pytestmark = pytest.mark.slow


def test_micro_family_end_to_end(tmp_path, prefect_server, capsys):
    from mlflow.tracking import MlflowClient

    from flows.family import family_flow

    home = Home(tmp_path / "home")
    recipe = load_recipe("micro")
    report = family_flow(recipe="micro", home=str(home.root))
    assert {s: r["status"] for s, r in report["stages"].items()} == {s: "built" for s in recipe.stages}

    again = family_flow(recipe="micro", home=str(home.root))
    assert {r["status"] for r in again["stages"].values()} == {"reused"}

    capsys.readouterr()
    assert cli(["status", "--json", "--recipe", "micro", "--home", str(home.root)]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_stage = {s["stage"]: s for s in doc["stages"]}
    assert {s["state"] for s in doc["stages"]} == {"published"}
    assert by_stage["crawl"]["metrics"]["pages_fetched"] >= 12  # the modules named, plus pydoc's topic pages
    assert by_stage["filter"]["metrics"]["docs_kept"] > 0
    pre = by_stage["pretrain"]["metrics"]
    assert pre["val_bpb"] < pre["unigram_bpb"], "150 tiny steps already beat the unigram baseline"
    assert any(k.startswith("acc/") for k in by_stage["sft"]["metrics"])
    assert "val_pair_acc" in by_stage["reward"]["metrics"] and "val_pref_acc" in by_stage["dpo"]["metrics"]
    assert any(k.startswith("sft_acc/") for k in by_stage["grpo"]["metrics"])

    # the chat model answers from a separate process, as a user types it: the newest chat model of
    # the home, and the registered one by its registry URI (the same weights: the same greedy answer)
    answers = []
    for model in ("chat", "models:/micro-chat/latest"):
        out = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--home", str(home.root), "--model", model,
                              "--prompt", "What is 12 + 30?", "--max-new-tokens", "4", "--temperature", "0"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        answers.append(out.stdout)
    assert answers[0] == answers[1] and answers[0].endswith("\n")

    client = MlflowClient(home.mlflow_uri)
    versions = client.search_model_versions("name = 'micro-chat'")
    assert len(versions) == 1 and client.get_run(versions[0].run_id).data.tags["stage"] == "grpo"

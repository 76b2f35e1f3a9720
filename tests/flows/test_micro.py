"""End to end: the whole family DAG on the `micro` recipe (real pydoc crawl, every stage, real
Prefect and MLflow), then the promises a user relies on: a second run reuses everything, status
shows every stage published with its headline metrics, the chat model answers, `family search` and
`family rag` answer from the corpus, the members are registered, and the evaluate stage reports every
member on the test split, writes the family report and sets `champion` on the members that pass."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert by_stage["retrieval"]["metrics"]["passages"] > 0 and by_stage["retrieval"]["metrics"]["test_queries"] > 0
    for key in ("ndcg@10", "mrr@10", "recall@10", "recall@50", "bm25_ndcg@10", "hybrid_ndcg@10"):
        assert key in by_stage["embed"]["metrics"], key
    assert {"ndcg@10", "first_stage_ndcg@10"} <= set(by_stage["rerank"]["metrics"])
    assert {"docqa_closed_acc", "docqa_open_acc"} <= set(by_stage["rag"]["metrics"])
    for key in ("teacher_params", "params", "kl_to_teacher", "top1_agreement", "ce_only_steps"):
        assert key in by_stage["distill"]["metrics"], key
    assert any(k.startswith("ce_only_acc/") for k in by_stage["distill"]["metrics"])
    for key in ("int8/loss_increase", "int4_rtn/loss_increase", "int4_gptq/loss_increase", "q4_0/size_ratio",
                "small/int4_gptq/loss_increase"):
        assert key in by_stage["quantize"]["metrics"], key
    assert cli(["show", "quantize", "--home", str(home.root)]) == 0
    assert "chat-q4_0.gguf" in capsys.readouterr().out  # the GGUF paths, for llama.cpp and Ollama

    # search and rag over the corpus, as a user types them: passages with their URL, citations or "not found"
    for argv in (["search", "json dumps", "--mode", "bm25"], ["search", "json dumps", "--k", "3"],
                 ["rag", "How do I serialize an object to JSON?", "--max-new-tokens", "4"]):
        out = subprocess.run([sys.executable, "-m", "flows.cli", *argv, "--home", str(home.root)],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert "http://" in out.stdout and ("[1]" in out.stdout or "Not found in the corpus" in out.stdout), out.stdout
    out = subprocess.run([sys.executable, "-m", "bench.retrieval", "--home", str(home.root), "--queries", "3"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert {"bm25_ms_median", "dense_ms_median", "rerank20_ms_median"} <= set(json.loads(out.stdout.splitlines()[-1]))

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
    for model in ("small", "chat-int4", "models:/micro-chat-int8/latest"):  # the compressed members answer too
        out = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--home", str(home.root), "--model", model,
                              "--prompt", "What is 12 + 30?", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.endswith("\n"), out.stderr

    # the vision-language member: its headline metrics, and `family chat --image` on a PNG that is not in the data
    vl = by_stage["vl"]["metrics"]
    assert by_stage["images"]["metrics"]["rows"] > 0
    for key in ("acc/colour", "blind_acc/colour", "majority_acc/colour", "swap_acc/colour", "text_acc/arith",
                "chat_text_acc/arith"):
        assert key in vl, key
    from PIL import Image, ImageDraw

    png = tmp_path / "scene.png"
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 40, 40), fill=(220, 40, 40))
    img.save(png)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--home", str(home.root), "--image", str(png),
                          "--prompt", "What colour is the shape?", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.endswith("\n"), out.stderr
    assert "resized from 64x64" in out.stderr
    out = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--home", str(home.root), "--image", str(tmp_path / "none.png"),
                          "--prompt", "?"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "none.png: no such image file" in out.stderr

    # the evaluate stage: every member on the test split, the report, the gates -> champion
    ev = by_stage["evaluate"]["metrics"]
    for key in ("grpo/acc", "grpo/acc_lo", "grpo/acc_hi", "grpo/baseline", "base/rank_acc", "rank_chance",
                "sft_vs_base/acc_delta", "grpo_vs_dpo/acc_mcnemar_p", "grpo/pass@1", "grpo/pass@4", "grpo_vs_dpo/pass@1_delta",
                "chat_int4/loss_increase", "chat_int4_vs_grpo/acc_delta", "small_vs_grpo/acc_delta", "embedder/ndcg@10",
                "reranker_vs_hybrid/ndcg@10_delta", "vl/acc", "vl_vs_blind/acc_delta", "reward_model/pair_acc",
                "reward_model_vs_prior/pair_acc_delta", "dpo/pair_acc", "dpo_vs_chance/pair_acc_delta"):
        assert key in ev, key
    # a third-party evaluator agrees: lm-eval's greedy answers are ours, its rolling log-likelihood our bpb
    assert ev["lm_eval/agreement"] == 1.0 and ev["lm_eval/bpb_rel_diff"] < 0.01
    assert {h["split"] for h in doc["headline"]} == {"test"} and all("lo" in h and "baseline" in h for h in doc["headline"])
    assert {h["member"] for h in doc["headline"]} >= {"base", "sft", "dpo", "grpo", "small", "chat_int8", "reward_model",
                                                      "embedder", "vl"}
    assert {(g["member"], g["passed"]) for g in doc["gates"]} == {("chat_int8", True), ("grpo", True), ("embedder", False)}
    assert cli(["status", "--recipe", "micro", "--home", str(home.root)]) == 0  # the terminal: the test headline last
    shown = capsys.readouterr().out.split("headline (the test split")[1].splitlines()[1:]
    assert [line.split()[0] for line in shown] == [h["member"] for h in doc["headline"]] and "most common answer" in shown[1]
    assert cli(["report", "--home", str(home.root)]) == 0
    out = capsys.readouterr().out
    html = Path(out.splitlines()[0])
    assert html.name == "report.html" and "<img " in html.read_text() and "PASS grpo/acc" in out
    assert cli(["report", "--markdown", "--home", str(home.root)]) == 0  # the README's table, from the report
    table = capsys.readouterr().out
    assert "| member | figure | value [95%] | baseline |" in table and "| grpo | acc |" in table

    client = MlflowClient(home.mlflow_uri)
    aliases = {m.name: dict(m.aliases) for m in client.search_registered_models()}
    assert "champion" in aliases["micro-chat"] and "champion" in aliases["micro-chat-int8"]
    assert "champion" not in aliases["micro-embed"]  # its gate failed
    runs = client.search_runs([client.get_experiment_by_name("family-micro").experiment_id], "tags.stage = 'evaluate'")
    assert "report.html" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    # `family chat` defaults to the chat champion: the registered grpo version, the same greedy answer as its URI
    from flows.cli import chat_champion, registered_model

    assert chat_champion(home) == registered_model(home, "models:/micro-chat@champion")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--home", str(home.root), "--model",
                          "models:/micro-chat@champion", "--prompt", "What is 12 + 30?", "--max-new-tokens", "4",
                          "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == answers[0], out.stderr

    versions = client.search_model_versions("name = 'micro-chat'")
    assert len(versions) == 1 and client.get_run(versions[0].run_id).data.tags["stage"] == "grpo"
    for member, stage in (("micro-embed", "embed"), ("micro-rerank", "rerank"), ("micro-small", "distill"),
                          ("micro-chat-int8", "quantize"), ("micro-chat-int4", "quantize"), ("micro-vl", "vl")):
        versions = client.search_model_versions(f"name = '{member}'")
        assert len(versions) == 1 and client.get_run(versions[0].run_id).data.tags["stage"] == stage

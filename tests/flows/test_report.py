"""The family report as a user opens it: the evaluate stage run on a small home laid out as `family
run` publishes one (a toy chat line with int8/int4 builds, and retrieval, vl and data stages whose
result.json hold their recorded figures), then report.html opened in headless Chromium with every
image decoded (naturalWidth > 0) and nothing loaded from anywhere else."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from models.gpt import GPT
from models.hf_export import copy_tokenizer_files
from models.quant import quantized_model, save_quantized, weight_names
from stages import evaluate
from stages.contract import build_config
from stages.quantize import quantize_rtn
from tests.conftest import artifact, make_ctx
from tests.stages.test_evaluate_stage import write_world

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
TASKS = ("colour", "shape")


def publish(home: Path, stage: str, output: str, metrics: dict, tables: dict | None = None, src: Path | None = None) -> Path:
    """<home>/artifacts/<stage>/<fp>/<output> with the stage's result.json and config.json beside it."""
    d = home / "artifacts" / stage / f"{stage}0000000000"[:16]
    out = d / output
    if src is not None:
        shutil.copytree(src, out)
    else:
        out.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"metrics": metrics, "tables": tables or {}, "seconds": 1.0}))
    (d / "config.json").write_text(json.dumps({"stage": stage, "config": {"max_steps": 10, "lr": 1e-3}, "inputs": {}}))
    return out


def quantized(src: Path, out: Path, bits: int) -> Path:
    model = GPT.from_pretrained(src)
    names = weight_names(model.cfg)
    state = dict(model.named_parameters())
    codes = {n: quantize_rtn(state[n].detach(), bits, 32 if state[n].shape[1] % 32 == 0 else state[n].shape[1]) for n in names}
    save_quantized(quantized_model(model, codes, {n: bits for n in names}), out, {"scheme": f"int{bits} rtn", "method": "rtn"})
    copy_tokenizer_files(src, out)
    return out


def small_home(root: Path) -> dict:
    from tests.stages.alignment_toy import make_model_dir

    home = root / "home"
    model = make_model_dir(root / "m", steps=20)
    prompts, chat = write_world(root)
    inputs = {"prompts": artifact("prompts", prompts), "chat": artifact("chat", chat)}
    curve = {"eval_curve": [{"step": s, "train_loss": 3.0 / (s + 1), "val_loss": 3.2 / (s + 1)} for s in range(0, 50, 10)],
             "train_curve": [{"step": s, "loss": 2.0 - s / 50, "lr": 1e-3} for s in range(0, 50, 10)]}
    for stage, out in (("pretrain", "base"), ("sft", "sft"), ("dpo", "dpo"), ("grpo", "grpo")):
        inputs[out] = artifact(out, publish(home, stage, out, {"steps": 10.0}, curve, src=model))
    qdir = home / "artifacts" / "quantize" / "quantize00000000"
    qdir.mkdir(parents=True)
    for bits in (8, 4):
        inputs[f"chat_int{bits}"] = artifact(f"chat_int{bits}", quantized(model, qdir / f"chat_int{bits}", bits))
    (qdir / "result.json").write_text(json.dumps({"metrics": {"int4/loss_increase": 0.01}, "tables": {}}))
    ir = {f"{p}{m}{t}": v for p, v in (("bm25_", 0.8), ("", 0.5), ("hybrid_", 0.7)) for m in ("ndcg@10", "mrr@10", "recall@10")
          for t, v in (("", v), ("_lo", v - 0.05), ("_hi", v + 0.05))}
    ir |= {"delta_dense_bm25_ndcg@10": -0.3, "delta_dense_bm25_ndcg@10_lo": -0.35, "delta_dense_bm25_ndcg@10_hi": -0.25,
           "test_queries": 300.0}
    inputs["embedder"] = artifact("embedder", publish(home, "embed", "embedder", ir, {"train_curve": curve["train_curve"]}))
    rr = {"ndcg@10": 0.6, "ndcg@10_lo": 0.55, "ndcg@10_hi": 0.65, "first_stage_ndcg@10": 0.7, "test_queries": 300.0,
          "delta_rerank_first_stage_ndcg@10": -0.1, "delta_rerank_first_stage_ndcg@10_lo": -0.15,
          "delta_rerank_first_stage_ndcg@10_hi": -0.05}
    inputs["reranker"] = artifact("reranker", publish(home, "rerank", "reranker", rr))
    vl_rows = [{"task": t, "test_rows": 100, "acc": 0.9, "blind_acc": 0.3, "swap_acc": 0.05, "majority_acc": 0.25} for t in TASKS]
    vl = {f"{f}_ci95/{t}": 0.05 for f in ("acc", "blind_acc", "swap_acc") for t in TASKS}
    text = [{"task": "arith", "text_acc": 0.9, "chat_text_acc": 0.92, "text_delta": -0.02, "text_delta_ci95": 0.05}]
    inputs["vl"] = artifact("vl", publish(home, "vl", "vl", vl, {"eval": vl_rows, "text_eval": text}))
    for stage, out, m in (("crawl", "pages", {"pages_fetched": 40, "bytes": 4e6}), ("extract", "docs", {"docs": 40}),
                          ("dedupe", "docs_dedup", {"docs_out": 38, "near_dups": 2}),
                          ("filter", "docs_clean", {"docs_kept": 30, "bytes_kept": 3e6, "dropped/gopher:min_words": 8}),
                          ("tokenizer", "tokens", {"train_tokens": 900000})):
        inputs[out] = artifact(out, publish(home, stage, out, m))
    return inputs


def image_widths(report: Path, tmp: Path) -> list[list]:
    """[alt, naturalWidth, complete] of every <img>, as Chromium decoded them after the page loaded."""
    probe = tmp / "probe.html"
    script = ("<script>window.addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'probe';"
              "p.textContent = JSON.stringify([...document.images].map(i => [i.alt, i.naturalWidth, i.complete]));"
              "document.body.appendChild(p); });</script>")
    probe.write_text(report.read_text().replace("</body>", script + "</body>"))
    proc = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert m, f"the probe did not run: {proc.stderr[-1500:]}"
    return json.loads(html.unescape(m.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)")
def test_report_opens_in_chromium_with_every_plot_rendered(tmp_path):
    inputs = small_home(tmp_path)
    cfg = build_config(evaluate.Config, {"max_new_tokens": 4, "samples": 2, "pass_k": 2, "sample_per_task": 4,
                                         "quant_per_task": 4, "gates": {"grpo": {"acc": {"min": "sft/acc_lo"}},
                                                                        "chat_int4": {"loss_increase": {"max": 0.05}}}},
                       "evaluate")
    ctx = make_ctx(tmp_path / "run", "evaluate")
    evaluate.run(cfg, inputs, ctx)
    report = ctx.output("report") / "report.html"
    text = report.read_text()
    assert not re.search(r"<script|<link|src=\"(?!data:)|url\(", text), "the report must not load anything"
    for section in ("Promotion gates", "Paired deltas", "Quantization", "Retrieval", "Vision-language", "Training curves",
                    "Data funnel", "Model cards"):
        assert section in text, section
    # per-task accuracy, ranking, sampling, quantization, retrieval, vl, the funnel, one curve per training stage
    expected = {"per-task accuracy", "ranking", "sampling", "quantization", "retrieval", "vl vs blind", "data funnel",
                "pretrain curves", "sft curves", "dpo curves", "grpo curves", "embed curves"}
    widths = image_widths(report, tmp_path)
    assert {alt for alt, _, _ in widths} == expected
    assert all(w > 0 and done for _, w, done in widths), widths

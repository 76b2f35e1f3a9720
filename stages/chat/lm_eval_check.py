"""A third-party check of our chat evaluator and our bits per byte: EleutherAI's lm-evaluation-harness.

lm-eval (a test-only dependency, `lm-eval[hf]==0.4.13`) runs our HF export (models/hf_export.py,
the `hf/` folder of a model artifact) through its own HF backend (`HFLM`, transformers'
Qwen3ForCausalLM, its generate and its tokenizer) on CPU, on tasks defined here, from local files:

- `agreement`: a `generate_until` task over `prompts` rows. Each row's conversation is rendered in
  ChatML with the generation prompt, the string our evaluator tokenizes (stages/chat/evaluate.py,
  `prompt_ids`), and lm-eval decodes it greedily until <|im_end|> for at most max_new_tokens tokens,
  grading with our verifier (stages/chat/verifiers.py) in the task's process_results. Agreement is
  the share of prompts where lm-eval's answer, stripped as ours is, equals ours.
- `rolling_bpb`: a `loglikelihood_rolling` task over documents, lm-eval's perplexity protocol
  (its `wikitext` task): each document is scored in disjoint windows of the model's context, the
  first conditioned on a prefix token, the later ones on the context before them. Its
  `bits_per_byte` metric is -sum(loglik) / (ln 2 * sum(UTF-8 bytes)). Ours is computed with our
  GPT (models/gpt.py, read from the same export) over the same windows, with our tokenizer.

What has to line up for the numbers to be comparable, and is pinned here:
- tokens: lm-eval tokenizes the rendered string with the export's HF tokenizer; our tokenizer has no
  BOS and adds no special tokens (tokenizer_config: bos_token null, add_bos_token false), so
  HF and `tokenizers` give the same ids. Both functions count prompts and documents whose ids
  differ (`token_mismatches`); 0 is expected.
- prefix: lm-eval's default prefix is the tokenizer's BOS, else its EOS, which for a chat export is
  <|im_end|>; we pass <|endoftext|>, what every pretraining document follows (stages/tokenizer.py).
- context: the HF model's max length is config.json's max_position_embeddings, our max_seq_len; for
  generation, lm-eval cuts a prompt to max_length - max_new_tokens tokens from the left and our
  evaluator never cuts, so max_length is raised to fit the longest prompt.

Deviation from pretrain's val_bpb: that number packs documents across <|endoftext|> and also scores
the <|endoftext|> after each document; lm-eval's protocol scores each document alone, without it.
So `rolling_bpb` compares the two implementations on one protocol; it does not reproduce val_bpb.

    from stages.chat.evaluate import pick_heldout
    from stages.chat.lm_eval_check import agreement, heldout_docs, lm_eval_metrics, rolling_bpb
    agreement(hf_dir, rows, generate_answers(model, tok, [r["prompt"] for r in rows], 96), 96)
    rolling_bpb(hf_dir, docs)
    lm_eval_metrics(model_dir, pick_heldout(prompts, 20, split="test"), heldout_docs(tokens_dir, tok), 96)
      # -> {"lm_eval/agreement", "lm_eval/bpb_rel_diff", ...}: both checks from a stage's model directory
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.gpt import GPT
from models.hf_export import load_hf
from models.tokenizer import EOT, IM_END, Tokenizer
from stages.chat.evaluate import generate_answers
from stages.chat.verifiers import verify
from stages.contract import StageError

LM_EVAL_PIN = "lm-eval[hf]==0.4.13"
PROMPTS_TASK, DOCS_TASK = "family_prompts", "family_docs"

# process_results of the prompts task: lm-eval grades its own answers with our verifier
VERIFY_PY = '''\
from stages.chat.evaluate import generate_answers
from stages.chat.verifiers import verify


def process_results(doc, results):
    return {"acc": float(verify(doc["verifier"], results[0].strip(), doc["answer"]))}
'''


def import_lm_eval() -> Any:
    """The lm_eval modules this file uses, or a one-line StageError saying how to install them."""
    # every path here is local; offline mode (read when huggingface_hub is first imported) keeps it so
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise StageError(f"lm_eval_check: EleutherAI's lm-evaluation-harness is not importable ({e}); "
                         f"install the test extra (pip install -e '.[test]') or pip install '{LM_EVAL_PIN}'") from None
    return lm_eval, HFLM, TaskManager


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _task_yaml(task: str, data: Path, body: str) -> str:
    """A task over one local JSON-lines file; `datasets` keeps its Arrow cache next to it (not in ~/.cache)."""
    q = lambda p: json.dumps(str(p))  # a quoted path is a valid YAML scalar
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {q(data)}\n"
            f"  cache_dir: {q(data.parent / 'datasets_cache')}\ntest_split: test\n{body}")


def _hflm(HFLM: Any, hf_dir: Path, batch_size: int, prefix_id: int, max_length: int | None = None) -> Any:
    return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=batch_size, dtype="float32",
                prefix_token_id=prefix_id, max_length=max_length)


def _run_task(lm: Any, task_dir: Path, task: str, lm_eval: Any, TaskManager: Any) -> tuple[dict, list[dict]]:
    """(the task's metrics, its samples in document order) from lm_eval.simple_evaluate."""
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(task_dir),
                                  include_defaults=False), log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


def agreement(hf_dir: str | Path, rows: list[dict[str, Any]], our_completions: list[str], max_new_tokens: int,
              batch_size: int = 32) -> dict[str, Any]:
    """lm-eval's greedy answers to `prompts` rows (prompt, answer, verifier) next to ours.

    our_completions: our evaluator's answers to the same rows (stages/chat/evaluate.py
    `generate_answers` with the same max_new_tokens). Returns {"agreement": share of rows where
    lm-eval's answer (stripped) equals ours, "lm_eval_acc": lm-eval's accuracy under our verifier,
    "our_acc": ours, "answers": lm-eval's answers, "disagreements": [{id, lm_eval, ours}],
    "token_mismatches": prompts that lm-eval tokenizes differently from us, "n", "seconds"}.
    """
    if len(rows) != len(our_completions) or not rows:
        raise ValueError(f"agreement needs one completion per row and at least one row, got {len(rows)} rows "
                         f"and {len(our_completions)} completions")
    lm_eval, HFLM, TaskManager = import_lm_eval()
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    tok = Tokenizer.load(hf_dir)
    texts = [tok.apply_chat_template(list(r["prompt"]), add_generation_prompt=True) for r in rows]
    ours_ids = [tok.encode(t) for t in texts]
    config = json.loads((hf_dir / "config.json").read_text())
    # lm-eval keeps the last max_length - max_new_tokens prompt tokens; ours keeps all of them
    max_length = max(config["max_position_embeddings"], max(map(len, ours_ids)) + max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="lm_eval_prompts_") as tmp:
        d = Path(tmp)
        _write_jsonl(d / "prompts.jsonl", [{"id": r["id"], "text": t, "answer": r["answer"], "verifier": r["verifier"]}
                                           for r, t in zip(rows, texts)])
        (d / "family_verify.py").write_text(VERIFY_PY)
        gen = {"until": [IM_END], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_new_tokens}
        (d / f"{PROMPTS_TASK}.yaml").write_text(_task_yaml(PROMPTS_TASK, d / "prompts.jsonl", (
            "output_type: generate_until\ndoc_to_text: text\ndoc_to_target: answer\n"
            f"generation_kwargs: {json.dumps(gen)}\n"
            "process_results: !function family_verify.process_results\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
        lm = _hflm(HFLM, hf_dir, batch_size, tok.eot_id, max_length)
        metrics, samples = _run_task(lm, d, PROMPTS_TASK, lm_eval, TaskManager)
    if [s["doc"]["id"] for s in samples] != [r["id"] for r in rows]:
        raise RuntimeError("lm-eval returned its samples for other prompts than it was given")
    if [s["arguments"][0][0] for s in samples] != texts:  # what lm-eval fed the model, exactly
        raise RuntimeError("lm-eval changed the rendered prompts before tokenizing them")
    # generate_until encodes its prompts with tok_batch_encode (one at a time here: no padding)
    token_mismatches = sum(lm.tok_batch_encode([t])[0][0].tolist() != ids for t, ids in zip(texts, ours_ids))
    answers = [s["filtered_resps"][0].strip() for s in samples]
    ours = [c.strip() for c in our_completions]
    same = [a == o for a, o in zip(answers, ours)]
    return {
        "agreement": sum(same) / len(rows),
        "lm_eval_acc": float(metrics["acc,none"]),
        "our_acc": sum(verify(r["verifier"], o, r["answer"]) for r, o in zip(rows, ours)) / len(rows),
        "answers": answers,
        "disagreements": [{"id": r["id"], "lm_eval": a, "ours": o} for r, a, o, s in zip(rows, answers, ours, same)
                          if not s],
        "token_mismatches": token_mismatches,
        "n": len(rows),
        "seconds": time.perf_counter() - t0,
    }


def rolling_windows(n_tokens: int, max_len: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling log-likelihood windows over a document of n_tokens tokens, as (start, end,
    n_scored) slices of [prefix] + tokens: the model reads seq[start:end] and the last n_scored
    positions predict tokens[end - n_scored:end]. Every token is scored once; a later window
    reads the max_len tokens before its last target (lm_eval.utils.get_rolling_token_windows with
    context_len=1, made disjoint)."""
    windows, done = [], 0
    while done < n_tokens:
        n = min(n_tokens - done, max_len)
        end = done + n  # seq[end] is tokens[end - 1]: the window's last input is the token before its last target
        windows.append((max(0, end - max_len), end, n))
        done = end
    return windows


@torch.no_grad()
def our_loglik(model: GPT, ids: list[int], prefix_id: int, max_len: int) -> float:
    """Sum of log p(token | what comes before it) over the document's tokens, in the windows of
    `rolling_windows`, with our model."""
    seq = torch.tensor([prefix_id] + ids)
    total = 0.0
    for start, end, n in rolling_windows(len(ids), max_len):
        logits = model(seq[start:end][None])[0][0, -n:]  # (n, V): the positions that predict the targets
        logp = torch.log_softmax(logits.float(), dim=-1)
        total += logp.gather(-1, seq[end - n + 1:end + 1, None]).double().sum().item()
    return total


def rolling_bpb(hf_dir: str | Path, docs: list[str], batch_size: int = 8, model: GPT | None = None) -> dict[str, Any]:
    """Bits per byte of `docs` by lm-eval's loglikelihood_rolling and by our model, same windows.

    model: our GPT to compare with (default: the export read back with models.hf_export.load_hf);
    batch_size: lm-eval's windows per forward pass. Empty documents are skipped (nothing to score).
    Returns {"lm_eval_bpb": lm-eval's bits_per_byte metric, "lm_eval_bpb_from_logliks": the same
    from its per-document log-likelihoods, "our_bpb", "bpb_rel_diff": |lm_eval - ours| / ours,
    "max_doc_loglik_diff": the largest per-document |difference| (nats), "token_mismatches",
    "tokens", "bytes", "docs", "seconds"}.
    """
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError("rolling_bpb needs at least one non-empty document")
    lm_eval, HFLM, TaskManager = import_lm_eval()
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    tok = Tokenizer.load(hf_dir)
    prefix_id = tok.special_ids[EOT]
    with tempfile.TemporaryDirectory(prefix="lm_eval_docs_") as tmp:
        d = Path(tmp)
        _write_jsonl(d / "docs.jsonl", [{"text": t} for t in docs])
        (d / f"{DOCS_TASK}.yaml").write_text(_task_yaml(DOCS_TASK, d / "docs.jsonl", (
            "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
            "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")))
        lm = _hflm(HFLM, hf_dir, batch_size, prefix_id)
        metrics, samples = _run_task(lm, d, DOCS_TASK, lm_eval, TaskManager)
    theirs = [float(s["resps"][0][0]) for s in samples]  # one summed log-likelihood per document
    ids = [tok.encode(t) for t in docs]
    token_mismatches = sum(lm.tok_encode(t) != i for t, i in zip(docs, ids))
    max_len = lm.max_length
    if model is None:
        model = load_hf(hf_dir)
    was_training = model.training
    model.eval()
    ours = [our_loglik(model, i, prefix_id, max_len) for i in ids]
    model.train(was_training)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    lm_eval_bpb = float(metrics["bits_per_byte,none"])
    our_bpb = -sum(ours) / (math.log(2) * n_bytes)
    return {
        "lm_eval_bpb": lm_eval_bpb,
        "lm_eval_bpb_from_logliks": -sum(theirs) / (math.log(2) * n_bytes),
        "our_bpb": our_bpb,
        "bpb_rel_diff": abs(lm_eval_bpb - our_bpb) / our_bpb,
        "max_doc_loglik_diff": max(abs(a - b) for a, b in zip(theirs, ours)),
        "max_len": max_len,
        "token_mismatches": token_mismatches,
        "tokens": sum(map(len, ids)),
        "bytes": n_bytes,
        "docs": len(docs),
        "seconds": time.perf_counter() - t0,
    }


def heldout_docs(tokens_dir: str | Path, tok: Tokenizer) -> list[str]:
    """The tokenizer stage's val documents as text: val.bin cut at every <|endoftext|> and decoded
    (byte-level BPE decodes exactly, so encoding a document again gives the ids stored)."""
    meta = json.loads((Path(tokens_dir) / "meta.json").read_text())
    val = np.fromfile(Path(tokens_dir) / "val.bin", dtype=np.dtype(meta["dtype"])).astype(np.int64)
    cuts = np.flatnonzero(val == meta["eot_id"])  # every document ends with one
    return [tok.decode(val[lo:hi].tolist()) for lo, hi in zip(np.r_[0, cuts[:-1] + 1], cuts)]


def lm_eval_metrics(model_dir: str | Path, rows: list[dict[str, Any]], docs: list[str], max_new_tokens: int,
                    batch_size: int = 32) -> dict[str, float]:
    """Both checks for a stage's model directory (our weights, tokenizer and the HF export in hf/):
    our evaluator's greedy answers, then lm-eval's on the export, and the bits per byte of `docs`.
    {"lm_eval/agreement", "lm_eval/acc", "lm_eval/our_acc", "lm_eval/bpb", "lm_eval/our_bpb",
    "lm_eval/bpb_rel_diff", "lm_eval/token_mismatches", "lm_eval/seconds"}."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    model, tok = GPT.from_pretrained(model_dir).eval(), Tokenizer.load(model_dir)
    ours = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    gen = agreement(model_dir / "hf", rows, ours, max_new_tokens, batch_size)
    bpb = rolling_bpb(model_dir / "hf", docs, model=model)
    return {
        "lm_eval/agreement": gen["agreement"],
        "lm_eval/acc": gen["lm_eval_acc"],
        "lm_eval/our_acc": gen["our_acc"],
        "lm_eval/bpb": bpb["lm_eval_bpb"],
        "lm_eval/our_bpb": bpb["our_bpb"],
        "lm_eval/bpb_rel_diff": bpb["bpb_rel_diff"],
        "lm_eval/token_mismatches": float(gen["token_mismatches"] + bpb["token_mismatches"]),
        "lm_eval/seconds": time.perf_counter() - t0,
    }

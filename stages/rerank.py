"""Rerank: a cross-encoder from the family's own base that reorders the first stage's candidates.

What: reads `base`, the retrieval data (`passages`, `pairs`, `qrels`) and `embedder` (its passage index
makes the first stage) and writes `reranker`: the model directory (model.safetensors + config.json,
tokenizer files, reranker.json with the prompt, label tokens, first-stage depth and the "not found"
threshold, meta.json) and `hf/`, a sentence-transformers CrossEncoder folder
(`CrossEncoder(dir/hf).predict([(q, p)])` gives our scores) with `hf/seq-cls/` for older readers.

Model (Qwen3-Reranker, Zhang et al. 2025): query and passage in one ChatML prompt with an
instruction; the score is logit("yes") - logit("no") of the next token (stages/search/encode.py).

Loss, over groups of one positive and K negatives per query, scores s (B, 1 + K):

    L = CE(softmax(s), 0)  +  bce_weight * mean BCE(sigmoid(s), [1, 0, ..., 0])

the listwise term (ListNet / CE-MNRL with the positive first) orders the candidates, the pointwise
term (Qwen3-Reranker's yes/no likelihood) keeps sigmoid(s) a probability, which the "not found"
threshold of `family rag` reads. The negatives are what the first stage confuses: BM25-mined ones
from `pairs` and the embedder's top train passages that are not relevant (train passages only),
found for a query when it is first drawn. Curriculum (`easy_steps`, off in the recipes): the first
steps draw the negatives at random among the train passages instead, which the base can tell apart
by shared words once it has learned to match them; measured on the tiny family (val nDCG@10 of the
hybrid's top 20, 50 queries; the hybrid 0.870): 30 steps of first-stage confusions 0.285 (chance),
300 steps 0.342, 600 easy + 300 hard steps 0.473 (220 s of training; README, "Retrieval"), and with
`passage_first` (the prompt reads the passage, then the query, so the query's words sit next to the
scored position and look back at the passage) 0.611: still below the hybrid.

Why it stays at chance in the tiny budget: the base does not use its context. `base_copy_gain`
(copy_gain, on the base before training) is the drop in next-token NLL from a passage's first 32
tokens to the same 32 tokens repeated 64 tokens later: 0.19 nats on the tiny base (5.09 -> 4.90); a
model that copies from its context predicts the repeat almost exactly.

Evaluation: every test query's first stage is the hybrid (RRF k = 60 of BM25 and the embedder over
ALL passages); the reranker reorders its top `depth` (20); nDCG@10 etc. of the reranked list against
the first stage's (first_stage_ndcg@10), with the paired difference and its 95% interval.
Threshold: the 10th percentile of the best reranked score over val queries (so about 10% of
answerable val questions would be refused); `abstain_offtopic` is the share of OFFTOPIC questions
(none answerable from the corpus) refused at that threshold. Gate: `reorders` says whether the
reranked order beat the first stage's on val (nDCG@10); where it did not, `family search` and
`family rag` keep the first stage's order (what a user sees is never the order that lost on val),
and no question is refused by its score (the reranker lost on val, so its threshold is not trusted
either): `family rag` refuses by coverage instead (stages/search/pipeline.Retriever.not_found), the
largest idf-weighted share of the question's terms in one of the hybrid's top `coverage_depth` (5)
passages (stages/search/bm25.coverage), with its threshold chosen the same way (the 10th
percentile over the val questions; coverage_threshold, coverage_abstain_val,
coverage_abstain_offtopic). `served_ndcg@10` is the test nDCG@10 of the order they serve. Scoring runs the prompts' shared system turn once (stages/search/encode.py).

Run:
    python -m stages.rerank --config c.json --inputs i.json --run-dir DIR
    with i.json = {"base": DIR, "passages": DIR, "pairs": DIR, "qrels": DIR, "embedder": DIR}
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.hf_export import save_model_dir
from stages.chat.preference import BatchOrder
from stages.contract import StageContext, StageError, StageResult, main
from stages.search.bm25 import BM25Index
from stages.search.corpus import OFFTOPIC
from stages.search.encode import RERANK_INSTRUCTION, RerankPrompt, embed_texts, rerank_logits, rerank_scores
from stages.search.evaluate import bm25_rankings, dense_rankings, hybrid_rankings, load_data, markdown, report
from stages.search.export import export_reranker
from stages.training import (
    Clock, TrainConfig, adamw, budget_warnings, checkpoint, clip_gradients, open_model_input, resume, set_lr,
    setup_runtime, stopped_by, write_run_meta,
)
from storage.artifacts import Artifact

INPUTS = ("base", "passages", "pairs", "qrels", "embedder")
OUTPUTS = ("reranker",)
GPU = True


@dataclass(frozen=True)
class Config(TrainConfig):
    instruction: str = RERANK_INSTRUCTION
    passage_first: bool = False  # the prompt reads the passage, then the query (module docstring)
    negatives: int = 3  # per query and step: K of the group (1 + K)
    easy_steps: int = 0  # the first steps draw the negatives at random among train passages (module docstring)
    bce_weight: float = 1.0
    batch_size: int = 8  # queries per step: 8 x (1 + 3) prompts
    max_len: int = 0  # tokens per prompt; 0 = the model's max_seq_len
    depth: int = 20  # first-stage candidates reranked
    first_stage_depth: int = 100  # passages each first-stage system ranks before fusion
    abstain_quantile: float = 0.1  # of the val queries' best scores (and coverages): the "not found" thresholds
    coverage_depth: int = 5  # the hybrid's top passages whose best coverage of a question is measured
    val_queries: int = 100  # val queries reranked to choose the threshold (the first by id)
    eval_batch_size: int = 32
    # the policy's knobs (stages/training.TrainConfig), with this stage's defaults
    lr: float = 3e-4
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    max_steps: int = 100
    ckpt_every: int = 50

    def validate(self) -> None:
        TrainConfig.validate(self)
        for name in ("negatives", "batch_size", "depth", "first_stage_depth", "eval_batch_size", "val_queries",
                     "coverage_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bce_weight < 0 or self.max_len < 0 or self.easy_steps < 0 or not 0 <= self.abstain_quantile < 1:
            raise ValueError("bce_weight, max_len and easy_steps must be >= 0 and abstain_quantile in [0, 1)")
        if self.depth > self.first_stage_depth:
            raise ValueError(f"depth ({self.depth}) must be <= first_stage_depth ({self.first_stage_depth})")


def rerank_loss(scores: torch.Tensor, bce_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """scores (B, 1 + K), the positive in column 0: listwise CE + bce_weight * pointwise BCE (module
    docstring). Returns the loss and {"listwise", "pointwise", "acc": share of groups ranked right}."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    listwise = F.cross_entropy(scores, target)
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    pointwise = F.binary_cross_entropy_with_logits(scores, labels)
    acc = (scores.argmax(1) == 0).float().mean().item()
    return listwise + bce_weight * pointwise, {"listwise": listwise.item(), "pointwise": pointwise.item(), "acc": acc}


def easy_negatives(row: dict[str, Any], qrels: dict[str, dict[str, int]], train_ids: list[str], k: int,
                   rng: random.Random) -> list[str]:
    """The curriculum's easy phase: k passages drawn at random (with replacement) among the train
    passages that are neither the query's positive nor relevant to it; [] when there are none."""
    rel = qrels.get(row["id"], {})
    easy = [d for d in train_ids if d != row["positive"] and not rel.get(d, 0)]
    return [easy[rng.randrange(len(easy))] for _ in range(k)] if easy else []


def copy_gain(logits_of, texts_ids: list[list[int]], span: int = 32, gap: int = 64, n: int = 32) -> float:
    """Can the model use its context? Each row is a text's first `span` tokens A, `gap` tokens B of the
    next text, and A again; the figure is the mean next-token NLL (nats) over A's first occurrence minus
    over its second (Olsson et al. 2022's repeated-tokens test of induction heads). A model that looks
    back and copies gains most of the first occurrence's NLL; one that reads only its last few tokens
    gains about 0, and a cross-encoder from it must learn to match the query against the passage from nothing.
    logits_of: (B, T) ids -> (B, T, V) logits. texts_ids: token ids of the texts, in a fixed order."""
    long = [t for t in texts_ids if len(t) >= max(span, gap)]
    rows = [long[i][:span] + long[i + 1][:gap] + long[i][:span] for i in range(min(n, len(long) - 1))]
    if not rows:
        return float("nan")
    ids = torch.tensor(rows)
    with torch.no_grad():
        logp = F.log_softmax(logits_of(ids).float(), dim=-1)
    ids = ids.to(logp.device)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1): position t predicts t + 1
    first, second = nll[:, :span - 1], nll[:, span + gap:]  # the targets A[1:] in each occurrence
    return float(first.mean() - second.mean())


def open_embedder(inputs: dict[str, Artifact], ids: list[str], device: torch.device):
    """The embedder's model, tokenizer, settings and passage embeddings (N, d), which must be of `ids`."""
    emb_dir, tok, model = open_model_input(inputs, "embedder", "rerank", device)
    try:
        settings = json.loads((emb_dir / "embedder.json").read_text())
        index_ids = json.loads((emb_dir / "index" / "passage_ids.json").read_text())
        p_emb = load_file(str(emb_dir / "index" / "embeddings.safetensors"))["embeddings"]
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"rerank: input 'embedder' at {emb_dir} has no passage index ({e}); rebuild the embed stage") from None
    if index_ids != ids:
        raise StageError(f"rerank: the embedder at {emb_dir} indexed other passages than {inputs['passages'].path}; "
                         f"rebuild the embed stage")
    return model.eval(), tok, settings, p_emb


def first_stage(rows, data, bm25, emb_model, emb_tok, settings, p_emb, depth: int) -> list[list[str]]:
    queries = [r["query"] for r in rows]
    q = embed_texts(emb_model, emb_tok, queries, settings["instruction"], settings["max_len"])
    return hybrid_rankings(bm25_rankings(bm25, data.ids, queries, depth), dense_rankings(q, p_emb, data.ids, depth),
                           depth=depth)


def rerank_lists(model, prompt: RerankPrompt, queries: list[str], candidates: list[list[str]], text_of: dict[str, str],
                 depth: int, max_len: int, batch_size: int) -> tuple[list[list[str]], list[float]]:
    """Each query's top `depth` candidates reordered by the reranker (the rest kept after them), and
    each query's best reranker score."""
    flat = [(qi, d) for qi, cands in enumerate(candidates) for d in cands[:depth]]
    scores = rerank_scores(model, prompt, [queries[qi] for qi, _ in flat], [text_of[d] for _, d in flat], max_len,
                           batch_size).tolist()
    by_query: list[list[tuple[float, str]]] = [[] for _ in queries]
    for (qi, d), s in zip(flat, scores):
        by_query[qi].append((s, d))
    out, best = [], []
    for qi, cands in enumerate(candidates):
        ranked = sorted(by_query[qi], key=lambda x: -x[0])  # stable: ties keep the first stage's order
        out.append([d for _, d in ranked] + cands[depth:])
        best.append(ranked[0][0] if ranked else float("-inf"))
    return out, best


def summarize(cfg: Config, derived: dict[str, Any], step: int, stop: str, test: dict[str, float], table: list[dict[str, Any]],
              threshold: float, abstain: dict[str, float], curve: list[dict[str, Any]]) -> StageResult:
    metrics = {**test, "threshold": threshold, **abstain, "steps": float(step),
               "test_queries": float(derived["test_queries"])}

    def fmt(prefix: str) -> str:
        k = f"{prefix}ndcg@10"
        return f"{test[k]:.3f} [{test[k + '_lo']:.3f}, {test[k + '_hi']:.3f}]"

    d = "delta_rerank_first_stage_ndcg@10"
    lines = [f"Rerank: {step} of {cfg.max_steps} steps ({stop}); the hybrid's top {cfg.depth} of {derived['test_queries']} "
             f"test queries reranked.", "",
             f"nDCG@10 (95% interval): reranked {fmt('')}, first stage (hybrid) {fmt('first_stage_')}; "
             f"difference {test[d]:+.3f} [{test[d + '_lo']:+.3f}, {test[d + '_hi']:+.3f}].", "",
             f"Not found below score {threshold:.3f}: refuses {abstain['abstain_val']:.0%} of val questions and "
             f"{abstain['abstain_offtopic']:.0%} of {len(OFFTOPIC)} off-topic ones. Not found below coverage "
             f"{abstain['coverage_threshold']:.2f} (the question's idf-weighted share in one of the hybrid's top "
             f"{cfg.coverage_depth}): refuses {abstain['coverage_abstain_val']:.0%} of val questions and "
             f"{abstain['coverage_abstain_offtopic']:.0%} of the off-topic ones.", "", "nDCG@10 per query kind (test):", "",
             markdown(table)]
    return StageResult(outputs={"reranker": {"ndcg@10": test["ndcg@10"], "threshold": threshold, "steps": step}},
                       metrics=metrics, summary="\n".join(lines), tables={"by_kind": table, "train_curve": curve},
                       warnings=budget_warnings("rerank", stop, step, cfg.max_steps, cfg.max_minutes))


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup, the base model, the data, the first stage
    rt = setup_runtime(ctx)
    device = rt.device
    base_dir, tok, model = open_model_input(inputs, "base", "rerank", device)
    max_len = cfg.max_len or model.cfg.max_seq_len
    try:
        prompt = RerankPrompt(tok, cfg.instruction, cfg.passage_first)
    except ValueError as e:
        raise StageError(f"rerank: {base_dir / 'tokenizer.json'}: {e}") from None
    data = load_data(inputs, "rerank")
    emb_model, emb_tok, settings, p_emb = open_embedder(inputs, data.ids, device)
    model.eval()
    base_copy_gain = copy_gain(lambda x: model(x.to(device))[0], tok.encode_batch(data.texts[:200]))
    text_of = dict(zip(data.ids, data.texts))
    train_ids = [p["id"] for p in data.passages if p["split"] == "train"]
    train_rows = [r for r in data.pairs["train"] if r["positive"] in text_of]
    if len(train_rows) < cfg.batch_size:
        raise StageError(f"rerank: {len(train_rows)} train queries, fewer than one batch of {cfg.batch_size}")
    # the embedder's confusions among train passages, beside the BM25-mined negatives of `pairs`: found
    # when a query is first drawn (a run visits max_steps * batch_size of the train queries, not all),
    # one query at a time, so a resumed run finds the same ones
    row = {pid: i for i, pid in enumerate(data.ids)}
    train_emb = p_emb[torch.tensor([row[i] for i in train_ids])]
    pools: dict[int, list[str]] = {}

    def pool_of(i: int) -> list[str]:
        if i not in pools:
            r = train_rows[i]
            q = embed_texts(emb_model, emb_tok, [r["query"]], settings["instruction"], settings["max_len"])
            ranks = dense_rankings(q, train_emb, train_ids, cfg.negatives * 4 + 10)[0]
            pools[i] = list(dict.fromkeys(list(r["negatives"]) + [d for d in ranks if data.qrels.get(r["id"], {}).get(d, 0) == 0]))
        return pools[i]

    order = BatchOrder(len(train_rows), cfg.batch_size, ctx.seed)
    derived = {"max_len": max_len, "train_queries": len(train_rows), "test_queries": len(data.pairs["test"]),
               "val_queries": len(data.pairs["val"]),
               "mean_bm25_negatives": float(np.mean([len(r["negatives"]) for r in train_rows])),
               "prompt_overhead_tokens": prompt.overhead}
    ctx.logger.info("rerank: %s", json.dumps(derived))
    ctx.tracker.log_params({"derived": derived})

    # optimizer and resume
    model.train()
    optimizer = adamw(model, cfg, device)
    ck = resume(ctx, model, optimizer, device, order=order)
    step, curve = ck.get("step", 0), ck.get("curve", [])

    # the loop: groups of (positive, K negatives) per query
    clock = Clock(ck.get("elapsed_s", 0.0))
    sums: dict[str, float] = dict(ck.get("log_sums", {}))  # since the last log; kept in checkpoints
    n_log = ck.get("log_n", 0)
    while step < cfg.max_steps and not clock.over(cfg.max_minutes):
        lr = set_lr(optimizer, cfg, step, cfg.max_steps)
        rng = random.Random(f"{ctx.seed}:{step}")
        idx = order.next()
        groups = []
        for i in idx:
            r = train_rows[i]
            negs = easy_negatives(r, data.qrels, train_ids, cfg.negatives, rng) if step < cfg.easy_steps else []
            if not negs:
                pool = pool_of(i) or [d for d in rng.sample(train_ids, cfg.negatives + 1) if d != r["positive"]]
                negs = [pool[rng.randrange(len(pool))] for _ in range(cfg.negatives)]
            groups.append([r["positive"], *negs])
        queries = [train_rows[i]["query"] for i, g in zip(idx, groups) for _ in g]
        seqs = prompt.batch(queries, [text_of[d] for g in groups for d in g], max_len)
        with rt.autocast:
            scores = rerank_logits(model, seqs, prompt).view(len(idx), cfg.negatives + 1)  # (B, 1 + K)
        loss, stats = rerank_loss(scores, cfg.bce_weight)
        loss.backward()
        grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        for k, v in {"loss": loss.item(), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v
        n_log += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = {f"train/{k}": v / n_log for k, v in sums.items()} | {
                "train/lr": lr, "train/grad_norm": grad_norm.item(), "train/samples_per_s": clock.lap(n_log * len(seqs))}
            ctx.tracker.log_metrics(metrics, step=step)
            curve.append({"step": step, **{k.removeprefix("train/"): v for k, v in metrics.items()}})
            ctx.progress(step, cfg.max_steps, "rerank", loss=metrics["train/loss"])
            sums, n_log = {}, 0
        checkpoint(ctx, step, model, optimizer, cfg, clock, order=order, curve=curve, log_sums=sums, log_n=n_log)

    # a final checkpoint; then rerank the first stage of val (threshold) and test (report)
    checkpoint(ctx, step, model, optimizer, cfg, clock, final=True, order=order, curve=curve, log_sums=sums, log_n=n_log)
    model.eval()
    bm25 = BM25Index.build(data.texts)
    lists: dict[str, tuple[list[list[str]], list[list[str]], list[float]]] = {}
    val_rows = sorted(data.pairs["val"], key=lambda r: r["id"])[:cfg.val_queries]
    with rt.autocast:
        for split in ("val", "test"):
            rows = data.pairs[split] if split == "test" else val_rows
            ctx.progress(0, 1, f"reranking {split}")
            first = first_stage(rows, data, bm25, emb_model, emb_tok, settings, p_emb, cfg.first_stage_depth)
            reranked, best = rerank_lists(model, prompt, [r["query"] for r in rows], first, text_of, cfg.depth, max_len,
                                          cfg.eval_batch_size)
            lists[split] = (first, reranked, best)
        # off-topic questions: the same pipeline, to see how often the threshold refuses them
        rows = [{"query": q} for q in OFFTOPIC]
        off_first = first_stage(rows, data, bm25, emb_model, emb_tok, settings, p_emb, cfg.first_stage_depth)
        _, off_best = rerank_lists(model, prompt, OFFTOPIC, off_first, text_of, cfg.depth, max_len, cfg.eval_batch_size)
    from_split = "val" if lists["val"][2] else "test"  # a corpus too small for val pages falls back to test (said in derived)
    derived["threshold_from"] = from_split
    val_best = lists[from_split][2]
    threshold = float(np.quantile(val_best, cfg.abstain_quantile))
    # the coverage rule (stages/search/bm25.coverage), which `family rag` uses where this reranker lost on val
    val_queries = [r["query"] for r in (val_rows if from_split == "val" else data.pairs["test"])]

    def coverages(queries: list[str], first: list[list[str]]) -> list[float]:
        return [bm25.coverage(q, [row[d] for d in f[:cfg.coverage_depth]]) for q, f in zip(queries, first)]

    val_cov, off_cov = coverages(val_queries, lists[from_split][0]), coverages(list(OFFTOPIC), off_first)
    coverage_threshold = float(np.quantile(val_cov, cfg.abstain_quantile))
    abstain = {"abstain_val": float(np.mean([b < threshold for b in val_best])),
               "abstain_offtopic": float(np.mean([b < threshold for b in off_best])),
               "coverage_threshold": coverage_threshold,
               "coverage_abstain_val": float(np.mean([c < coverage_threshold for c in val_cov])),
               "coverage_abstain_offtopic": float(np.mean([c < coverage_threshold for c in off_cov]))}
    test, table = report({"rerank": lists["test"][1], "first_stage": lists["test"][0]}, data.pairs["test"], data.qrels,
                         {"rerank": "", "first_stage": "first_stage_"}, deltas=(("rerank", "first_stage"),))
    # the gate: the search pipeline uses the reranker's order only where it beat the first stage on val
    val = report({"rerank": lists["val"][1], "first_stage": lists["val"][0]}, val_rows, data.qrels,
                 {"rerank": "val_", "first_stage": "val_first_stage_"})[0] if val_rows else {}
    reorders = not val or val["val_ndcg@10"] > val["val_first_stage_ndcg@10"]
    stop = stopped_by(step, cfg.max_steps)
    result = summarize(cfg, derived, step, stop, test, table, threshold, abstain, curve)
    result.metrics |= {k: v for k, v in val.items() if k in ("val_ndcg@10", "val_first_stage_ndcg@10")}
    result.metrics["reorders"] = float(reorders)
    result.metrics["base_copy_gain"] = base_copy_gain
    result.summary += (f"\n\nThe base's copy gain (stages/rerank.copy_gain): {base_copy_gain:.2f} nats per token on a "
                       "passage's second occurrence (a model that copies from its context gains most of the first's NLL).")
    # what `family search` / `family rag` serve on test: the reranked order where it won on val, else the first stage's
    served = "" if reorders else "first_stage_"
    result.metrics |= {f"served_ndcg@10{e}": test[f"{served}ndcg@10{e}"] for e in ("", "_lo", "_hi")}
    result.summary += ("\n\nOn val the reranked order " + ("beats" if reorders else "does not beat") + " the first stage's: "
                       + ("search and rag use it." if reorders else "search and rag keep the hybrid's order and do not refuse "
                          "by its score: `family rag` refuses by coverage instead."))
    result.metrics["samples_per_s"] = clock.rate(step * cfg.batch_size * (cfg.negatives + 1))  # prompts per training second
    ctx.tracker.log_metrics(result.metrics, step=step)

    # save: the model directory with its settings, and the sentence-transformers export
    out = save_model_dir(model, base_dir, ctx.output("reranker"), hf=False)
    (out / "reranker.json").write_text(json.dumps({
        "instruction": cfg.instruction, "passage_first": cfg.passage_first, "max_len": max_len,
        "yes_id": prompt.yes_id, "no_id": prompt.no_id,
        "depth": cfg.depth, "first_stage_depth": cfg.first_stage_depth, "threshold": threshold, "reorders": reorders,
        "coverage_threshold": abstain["coverage_threshold"], "coverage_depth": cfg.coverage_depth},
        indent=2))
    export_reranker(model, out, out / "hf", prompt, max_len)
    write_run_meta(out, "rerank", step, cfg.max_steps, stop, result.metrics, derived, cfg, curve,
                   base=inputs["base"].fingerprint)
    ctx.tracker.log_text(result.summary, "rerank_summary.md")
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

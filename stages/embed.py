"""Embed: an embedding model trained from the family's own base, scored against BM25 and a hybrid.

What: reads `base` (model directory) and the retrieval data (`passages`, `pairs`, `qrels`) and writes
`embedder`: the model directory (model.safetensors + config.json, tokenizer files, embedder.json with
the query instruction and length, meta.json), `index/` (every passage's embedding, for `family search`,
the rerank and rag stages) and `hf/`, an HF Qwen3 checkpoint that is also a sentence-transformers folder
(`SentenceTransformer(dir/hf).encode_query(...)`; stages/search/export.py).

Model (Qwen3-Embedding, Zhang et al. 2025, "Qwen3 Embedding", sec. 2): the causal decoder reads the
text and an appended <|endoftext|>; the embedding is the final hidden state there, L2-normalised;
queries get an instruction prefix, passages none (stages/search/encode.py).

Loss: InfoNCE over the batch with Qwen3-Embedding's extended partition function. For query i with
positive d+_i, hard negatives d-_ik (BM25-mined among train passages by the retrieval stage, skipping
its top ranks) and the other queries and positives of the batch, s = cosine, tau = temperature:

    Z_i = e^{s(q_i,d+_i)/tau} + sum_k m e^{s(q_i,d-_ik)/tau} + sum_{j!=i} m e^{s(q_i,d_j)/tau}
          + sum_{j!=i} m e^{s(q_i,q_j)/tau} + sum_{j!=i} m e^{s(d+_i,d+_j)/tau}
    L   = -1/B sum_i log( e^{s(q_i,d+_i)/tau} / Z_i )

with the false-negative mask m = 0 for a candidate scoring above s(q_i, d+_i) + margin or being the
very passage d+_i (a duplicate positive in the batch), as Qwen3-Embedding does (margin 0.1).

Temperature: 0.02, chosen on val (val_ndcg@10, tiny recipe, 200 steps, one run each): 0.05 (the
sentence-transformers MultipleNegativesRankingLoss default, scale 20) 0.563, 0.02 0.631, 0.01 0.621.
With cosines in [-1, 1] a low temperature is what lets the softmax separate a positive from near
candidates; the tiny model's cosines start close together, and 0.05 left it a soft, slow target.
Re-measure: `family run --only embed --set embed.temperature=T` and read `val_ndcg@10`.

Evaluation: every val and test query ranks ALL passages; test is reported (val only guides choices):
the embedder's nDCG@10, MRR@10, Recall@10/50 with 95% bootstrap intervals, BM25 (bm25s over the same
passages) and the hybrid, reciprocal rank fusion of BM25 and the embedder (k = 60), with the paired
differences to BM25 and nDCG@10 per query kind.

Run:
    python -m stages.embed --config c.json --inputs i.json --run-dir DIR
    with i.json = {"base": "BASE_DIR", "passages": "DIR", "pairs": "DIR", "qrels": "DIR"}
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.hf_export import save_model_dir
from stages.chat.preference import BatchOrder
from stages.contract import StageContext, StageError, StageResult, main
from stages.search.bm25 import BM25Index
from stages.search.encode import QUERY_INSTRUCTION, embed, embed_ids, embed_texts
from stages.search.evaluate import (
    bm25_rankings, dense_rankings, hybrid_rankings, load_data, markdown, report,
)
from stages.search.export import export_embedder
from stages.training import (
    Clock, TrainConfig, adamw, budget_warnings, checkpoint, clip_gradients, open_model_input, resume, set_lr,
    setup_runtime, stopped_by, write_run_meta,
)
from storage.artifacts import Artifact

INPUTS = ("base", "passages", "pairs", "qrels")
OUTPUTS = ("embedder",)
GPU = True


@dataclass(frozen=True)
class Config(TrainConfig):
    instruction: str = QUERY_INSTRUCTION  # prefixed to queries only
    temperature: float = 0.02  # chosen on val: see the module docstring
    fn_margin: float = 0.1  # false-negative mask: a candidate above s(q, d+) + margin is left out of Z
    hard_negatives: int = 1  # per query, drawn from its mined negatives
    batch_size: int = 32  # queries per step (and as many positives, plus their hard negatives)
    max_len: int = 0  # tokens per text, EOS included; 0 = the model's max_seq_len
    eval_depth: int = 100  # passages ranked per query by each first-stage system
    eval_batch_size: int = 64
    # the policy's knobs (stages/training.TrainConfig), with this stage's defaults
    lr: float = 3e-4
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    max_steps: int = 100
    ckpt_every: int = 50

    def validate(self) -> None:
        TrainConfig.validate(self)
        if self.temperature <= 0 or self.fn_margin < 0:
            raise ValueError(f"temperature must be > 0 and fn_margin >= 0, got {self.temperature}, {self.fn_margin}")
        for name in ("batch_size", "eval_depth", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hard_negatives < 0 or self.max_len < 0:
            raise ValueError("hard_negatives and max_len must be >= 0")


def info_nce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, pos_ids: torch.Tensor, neg_ids: torch.Tensor,
             temperature: float, margin: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Qwen3-Embedding's InfoNCE (module docstring) and its statistics.

    q, p (B, D) and n (N, D): L2-normalised queries, their positives and all hard negatives of the
    batch; pos_ids (B,) and neg_ids (N,) the passage ids (integers) of p and n. Candidates of query i:
    q_i . every passage of the batch (the positive d+_i at column i), q_i . q_j and d+_i . d+_j (j != i).
    Returns the mean loss and {"masked": share of candidates masked, "acc": share of queries whose
    positive scores above every unmasked candidate}.
    """
    B = q.shape[0]
    docs = torch.cat([p, n])  # (M, D)
    doc_ids = torch.cat([pos_ids, neg_ids])  # (M,)
    s_qd, s_qq, s_pp = q @ docs.T, q @ q.T, p @ p.T  # (B, M), (B, B), (B, B)
    pos = s_qd[:, :B].diagonal()  # (B,)
    with torch.no_grad():
        over = pos[:, None] + margin
        eye = torch.eye(B, dtype=torch.bool, device=q.device)
        same = doc_ids[None, :] == pos_ids[:, None]  # (B, M): d_j is d+_i (column i itself included)
        mask_qd = (s_qd > over) | same
        mask_qd[:, :B] &= ~eye  # the positive itself stays
        mask_qq = (s_qq > over) | eye
        mask_pp = (s_pp > over) | (pos_ids[None, :] == pos_ids[:, None])  # the diagonal included
        mask = torch.cat([mask_qd, mask_qq, mask_pp], dim=1)  # (B, M + 2B)
    logits = torch.cat([s_qd, s_qq, s_pp], dim=1).masked_fill(mask, float("-inf")) / temperature
    target = torch.arange(B, device=q.device)
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        acc = (logits.argmax(1) == target).float().mean().item()
        # candidates a query could have: M passages + (B - 1) queries + (B - 1) positives, minus its positive
        masked = (mask.sum().item() - 2 * B) / max(1, B * (docs.shape[0] - 1 + 2 * (B - 1)))
    return loss, {"masked": masked, "acc": acc}


def evaluate(model, tok, cfg: Config, data, bm25: BM25Index, max_len: int, split: str,
             p_emb: torch.Tensor) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, list[list[str]]]]:
    """Metrics of dense, BM25 and hybrid on the queries of `split` over every passage."""
    rows = data.pairs[split]
    if not rows:
        return {}, [], {}
    queries = [r["query"] for r in rows]
    q_emb = embed_texts(model, tok, queries, cfg.instruction, max_len, cfg.eval_batch_size)
    dense = dense_rankings(q_emb, p_emb, data.ids, cfg.eval_depth)
    lexical = bm25_rankings(bm25, data.ids, queries, cfg.eval_depth)
    systems = {"dense": dense, "bm25": lexical, "hybrid": hybrid_rankings(lexical, dense, depth=cfg.eval_depth)}
    metrics, table = report(systems, rows, data.qrels, {"dense": "", "bm25": "bm25_", "hybrid": "hybrid_"},
                            deltas=(("dense", "bm25"), ("hybrid", "bm25")))
    return metrics, table, systems


def summarize(cfg: Config, derived: dict[str, Any], step: int, stop: str, test: dict[str, float],
              val: dict[str, float], table: list[dict[str, Any]], curve: list[dict[str, Any]]) -> StageResult:
    """Headline metrics (test; val ones prefixed val_), the per-kind table and the summary."""
    metrics = {**test, **{f"val_{k}": v for k, v in val.items() if not k.endswith(("_lo", "_hi"))},
               "steps": float(step), "train_queries": float(derived["train_queries"]),
               "test_queries": float(derived["test_queries"]), "passages": float(derived["passages"])}

    def fmt(prefix: str) -> str:
        k = f"{prefix}ndcg@10"
        return f"{test[k]:.3f} [{test[k + '_lo']:.3f}, {test[k + '_hi']:.3f}]" if k in test else "n/a"

    lines = [f"Embed: {step} of {cfg.max_steps} steps ({stop}), tau {cfg.temperature}, {derived['train_queries']} train "
             f"queries; {derived['test_queries']} test queries over all {derived['passages']} passages.", "",
             f"nDCG@10 (95% interval): embedder {fmt('')}, BM25 {fmt('bm25_')}, hybrid RRF {fmt('hybrid_')}; "
             f"embedder - BM25 {test.get('delta_dense_bm25_ndcg@10', float('nan')):+.3f}, hybrid - BM25 "
             f"{test.get('delta_hybrid_bm25_ndcg@10', float('nan')):+.3f}.", "", "nDCG@10 per query kind (test):", "",
             markdown(table)]
    return StageResult(outputs={"embedder": {"ndcg@10": test.get("ndcg@10"), "steps": step}}, metrics=metrics,
                       summary="\n".join(lines), tables={"by_kind": table, "train_curve": curve},
                       warnings=budget_warnings("embed", stop, step, cfg.max_steps, cfg.max_minutes))


def run(cfg: Config, inputs: dict[str, Artifact], ctx: StageContext) -> StageResult:
    # setup, the base model, the data (every passage tokenized once)
    rt = setup_runtime(ctx)
    device = rt.device
    base_dir, tok, model = open_model_input(inputs, "base", "embed", device)
    max_len = cfg.max_len or model.cfg.max_seq_len
    data = load_data(inputs, "embed")
    code = {pid: i for i, pid in enumerate(data.ids)}  # passage id -> row (the false-negative mask compares rows)
    train = [r for r in data.pairs["train"] if r["positive"] in code]
    if len(train) < cfg.batch_size:
        raise StageError(f"embed: {len(train)} train queries, fewer than one batch of {cfg.batch_size}; "
                         f"lower embed.batch_size or give the retrieval stage more pages")
    p_seqs = dict(zip(data.ids, embed_ids(tok, data.texts, "", max_len)))
    q_seqs = embed_ids(tok, [r["query"] for r in train], cfg.instruction, max_len)
    order = BatchOrder(len(train), cfg.batch_size, ctx.seed)
    derived = {"max_len": max_len, "train_queries": len(train), "val_queries": len(data.pairs["val"]),
               "test_queries": len(data.pairs["test"]), "passages": len(data.ids),
               "passages_cut": sum(len(s) == max_len for s in p_seqs.values()),
               "epochs_planned": cfg.max_steps * cfg.batch_size / len(train)}
    ctx.logger.info("embed: %s", json.dumps(derived))
    ctx.tracker.log_params({"derived": derived})

    # optimizer and resume
    model.train()
    optimizer = adamw(model, cfg, device)
    ck = resume(ctx, model, optimizer, device, order=order)
    step, curve = ck.get("step", 0), ck.get("curve", [])

    # the loop
    clock = Clock(ck.get("elapsed_s", 0.0))
    sums: dict[str, float] = dict(ck.get("log_sums", {}))  # since the last log; kept in checkpoints
    n_log = ck.get("log_n", 0)
    while step < cfg.max_steps and not clock.over(cfg.max_minutes):
        lr = set_lr(optimizer, cfg, step, cfg.max_steps)
        rng = random.Random(f"{ctx.seed}:{step}")  # the hard negatives of a step, the same after a resume
        idx = order.next()
        batch = [train[i] for i in idx]
        negs = [n for r in batch for n in rng.sample(list(r["negatives"]), min(cfg.hard_negatives, len(r["negatives"])))]
        with rt.autocast:
            q = embed(model, [q_seqs[i] for i in idx], tok.pad_id)  # (B, D)
            d = embed(model, [p_seqs[r["positive"]] for r in batch] + [p_seqs[n] for n in negs], tok.pad_id)  # (B + N, D)
        pos_ids = torch.tensor([code[r["positive"]] for r in batch], device=device)
        neg_ids = torch.tensor([code[n] for n in negs], dtype=torch.long, device=device)
        loss, stats = info_nce(q, d[:len(batch)], d[len(batch):], pos_ids, neg_ids, cfg.temperature, cfg.fn_margin)
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
                "train/lr": lr, "train/grad_norm": grad_norm.item(), "train/samples_per_s": clock.lap(n_log * cfg.batch_size)}
            ctx.tracker.log_metrics(metrics, step=step)
            curve.append({"step": step, **{k.removeprefix("train/"): v for k, v in metrics.items()}})
            ctx.progress(step, cfg.max_steps, "embed", loss=metrics["train/loss"])
            sums, n_log = {}, 0
        checkpoint(ctx, step, model, optimizer, cfg, clock, order=order, curve=curve, log_sums=sums, log_n=n_log)

    # a final checkpoint, then every passage embedded and the held-out evaluation
    checkpoint(ctx, step, model, optimizer, cfg, clock, final=True, order=order, curve=curve, log_sums=sums, log_n=n_log)
    model.eval()
    ctx.progress(0, 1, "embedding every passage")
    with rt.autocast:
        p_emb = embed_texts(model, tok, data.texts, "", max_len, cfg.eval_batch_size)
        ctx.progress(1, 1, "embedding every passage")
        bm25 = BM25Index.build(data.texts)
        val, _, _ = evaluate(model, tok, cfg, data, bm25, max_len, "val", p_emb)
        test, table, _ = evaluate(model, tok, cfg, data, bm25, max_len, "test", p_emb)
    stop = stopped_by(step, cfg.max_steps)
    result = summarize(cfg, derived, step, stop, test, val, table, curve)
    result.metrics["samples_per_s"] = clock.rate(step * cfg.batch_size)  # training time only (a resume counts its own)
    ctx.tracker.log_metrics(result.metrics, step=step)

    # save: the model directory, its passage index and the HF / sentence-transformers export
    out = save_model_dir(model, base_dir, ctx.output("embedder"), hf=False)
    (out / "index").mkdir()
    save_file({"embeddings": p_emb.contiguous()}, str(out / "index" / "embeddings.safetensors"))
    (out / "index" / "passage_ids.json").write_text(json.dumps(data.ids))
    (out / "embedder.json").write_text(json.dumps({"instruction": cfg.instruction, "max_len": max_len,
                                                   "temperature": cfg.temperature}, indent=2))
    export_embedder(model, out, out / "hf", cfg.instruction, max_len)
    write_run_meta(out, "embed", step, cfg.max_steps, stop, result.metrics, derived, cfg, curve,
                   base=inputs["base"].fingerprint)
    ctx.tracker.log_text(result.summary, "embed_summary.md")
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.modules[__name__]))

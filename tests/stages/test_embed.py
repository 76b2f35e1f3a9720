"""Embed stage: the InfoNCE loss against hand-computed cases, the stage on a toy corpus, the
sentence-transformers load, bad input."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from stages import embed
from stages.contract import StageError
from stages.search.encode import embed_texts
from storage.parquet import write_table
from tests.conftest import artifact, make_ctx
from tests.stages.retrieval_toy import built


def t(*rows):
    return torch.tensor(rows, dtype=torch.float)


def test_info_nce_by_hand_without_masking():
    q, p = t([1, 0], [0, 1]), t([1, 0], [0.6, 0.8])
    loss, stats = embed.info_nce(q, p, torch.empty(0, 2), torch.tensor([0, 1]), torch.empty(0, dtype=torch.long), 1.0, 10.0)
    e = math.exp
    # query 1: positive 1; candidates q1.p2 = .6, q1.q2 = 0, p1.p2 = .6
    l1 = -math.log(e(1) / (e(1) + e(0.6) + e(0) + e(0.6)))
    # query 2: positive .8; candidates q2.p1 = 0, q2.q1 = 0, p2.p1 = .6
    l2 = -math.log(e(0.8) / (e(0.8) + e(0) + e(0) + e(0.6)))
    assert math.isclose(loss.item(), (l1 + l2) / 2, rel_tol=1e-6)
    assert stats["masked"] == 0 and stats["acc"] == 1.0


def test_info_nce_masks_candidates_above_the_positive_plus_margin_and_duplicates():
    q, p = t([1, 0], [0, 1]), t([1, 0], [0.8, 0.6])
    n = t([0, 1])  # a hard negative; every query sees every passage of the batch: q2 . n = 1 > 0.6 + 0.1, masked
    loss, _ = embed.info_nce(q, p, n, torch.tensor([0, 1]), torch.tensor([2]), 1.0, 0.1)
    e = math.exp
    # query 1 (positive 1): q1.p2 = .8, q1.n = 0, q1.q2 = 0, p1.p2 = .8; none above 1.1
    l1 = -math.log(e(1) / (e(1) + e(0.8) + e(0) + e(0) + e(0.8)))
    # query 2 (positive .6): q2.p1 = 0, q2.n = 1 (masked), q2.q1 = 0, p2.p1 = .8 (masked: > .7)
    l2 = -math.log(e(0.6) / (e(0.6) + e(0) + e(0)))
    assert math.isclose(loss.item(), (l1 + l2) / 2, rel_tol=1e-6)
    # the same passage as both positives: neither is the other's negative
    loss_dup, stats = embed.info_nce(t([1, 0], [0, 1]), t([1, 0], [1, 0]), torch.empty(0, 2), torch.tensor([7, 7]),
                                     torch.empty(0, dtype=torch.long), 1.0, 10.0)
    l1 = -math.log(e(1) / (e(1) + e(0)))  # q1.p2 (same passage) and p1.p2 masked; q1.q2 = 0 stays
    l2 = -math.log(e(0) / (e(0) + e(0)))
    assert math.isclose(loss_dup.item(), (l1 + l2) / 2, rel_tol=1e-6) and stats["masked"] > 0


def test_stage_writes_the_embedder_index_and_reports_against_bm25():
    paths = built()
    out = paths["embedder"]
    for f in ("model.safetensors", "embedder.json", "index/embeddings.safetensors", "index/passage_ids.json",
              "hf/modules.json", "hf/1_Pooling/config.json", "hf/config_sentence_transformers.json", "meta.json"):
        assert (out / f).is_file(), f
    result = json.loads((out / "meta.json").read_text())["metrics"]
    for k in ("ndcg@10", "mrr@10", "recall@10", "recall@50", "bm25_ndcg@10", "hybrid_ndcg@10", "ndcg@10_lo",
              "bm25_ndcg@10_hi", "delta_hybrid_bm25_ndcg@10"):
        assert k in result, k
    assert result["bm25_ndcg@10"] > 0.5  # the baseline works on this corpus
    st_prompt = json.loads((out / "hf" / "config_sentence_transformers.json").read_text())["prompts"]
    assert st_prompt == {"query": "Query:", "document": ""}


def test_sentence_transformers_loads_the_embedder_with_our_embeddings():
    st = pytest.importorskip("sentence_transformers")
    from models.gpt import GPT
    from models.tokenizer import Tokenizer

    out = built()["embedder"]
    model, tok = GPT.from_pretrained(out).eval(), Tokenizer.load(out)
    settings = json.loads((out / "embedder.json").read_text())
    texts = ["json.dumps(obj) Serialize obj to a JSON formatted str.", "Return the cube root of x.", "heap"]
    ours_q = embed_texts(model, tok, texts, settings["instruction"], settings["max_len"])
    ours_d = embed_texts(model, tok, texts, "", settings["max_len"])
    m = st.SentenceTransformer(str(out / "hf"), device="cpu", local_files_only=True)
    theirs_q = m.encode_query(texts, convert_to_tensor=True)
    theirs_d = m.encode_document(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours_q, theirs_q).min() >= 0.9999
    assert torch.nn.functional.cosine_similarity(ours_d, theirs_d).min() >= 0.9999


def test_stage_bad_input_passages_of_another_schema(tmp_path):
    paths = built()
    bad = tmp_path / "passages"
    write_table([{"query_id": "q", "doc_id": "d", "relevance": 1}], bad / "part-00000.parquet", "qrels")
    inputs = {k: artifact(k, paths[k]) for k in embed.INPUTS} | {"passages": artifact("passages", bad)}
    ctx = make_ctx(tmp_path / "s")
    with pytest.raises(StageError, match=r"input 'passages'.*missing column 'id'.*rebuild the retrieval stage"):
        embed.run(embed.Config(max_steps=1, batch_size=4), inputs, ctx)
    assert not any(ctx.run_dir.iterdir())


def test_stage_bad_input_a_base_that_is_not_a_model(tmp_path):
    paths = built()
    base = tmp_path / "base"
    shutil.copytree(paths["base"], base)
    (base / "model.safetensors").write_bytes(b"truncated")
    inputs = {k: artifact(k, paths[k]) for k in embed.INPUTS} | {"base": artifact("base", base)}
    with pytest.raises(StageError, match="does not load as a model"):
        embed.run(embed.Config(max_steps=1), inputs, make_ctx(tmp_path / "s"))

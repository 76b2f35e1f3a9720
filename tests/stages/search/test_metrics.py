"""Ranking metrics, fusion and BM25 terms against hand-computed cases."""
from __future__ import annotations

import math

import numpy as np

from stages.search.bm25 import BM25Index, terms
from stages.search.metrics import bootstrap_ci, mrr_at, ndcg_at, recall_at, rrf


def test_ndcg_mrr_recall_by_hand():
    ranking, rel = ["a", "b", "c"], {"b": 2, "d": 1}
    dcg = 3 / math.log2(3)
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    assert math.isclose(ndcg_at(ranking, rel, 10), dcg / idcg)
    assert mrr_at(ranking, rel, 10) == 0.5 and mrr_at(ranking, rel, 1) == 0.0
    assert recall_at(ranking, rel, 10) == 0.5 and recall_at(["d", "b"], rel, 10) == 1.0
    assert ndcg_at(["b", "d"], rel, 10) == 1.0


def test_rrf_by_hand():
    # a: 1/61; b: 1/62 + 1/61; c: 1/62
    assert rrf([["a", "b"], ["b", "c"]], k=60) == ["b", "a", "c"]
    assert rrf([["a", "b"], ["b", "c"]], k=60, depth=1) == ["b"]


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(50), rng.random(5000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 5


def test_bm25_terms_keep_dotted_names_and_their_parts():
    t = terms("Use os.path.join; parsing query strings")
    assert {"os.path.join", "os", "path", "join"} <= set(t) and "pars" in t and "queri" in t


def test_bm25_ranks_the_matching_passage_first_and_survives_unknown_words(tmp_path):
    index = BM25Index.build(["heapq.heappush(heap, item) Push item onto heap.", "json.dumps Serialize obj to JSON."])
    rows, scores = index.search(["push onto a heap", "zzzz"], 2)
    assert rows[0, 0] == 0 and scores[0, 0] > 0 and (scores[1] == 0).all()
    index.save(tmp_path / "bm25")
    assert BM25Index.load(tmp_path / "bm25").search(["json"], 1)[0][0, 0] == 1


def test_coverage_is_the_best_idf_weighted_share_of_the_query_terms_in_one_passage():
    texts = ["heapq pushes an item onto the heap", "json encodes an item", "heapq pops the smallest item"]
    index = BM25Index.build(texts)
    n = 3

    def idf(df):
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    # query terms (stemmed): heapq (df 2), item (df 3), australia (df 0)
    total = idf(2) + idf(3) + idf(0)
    assert math.isclose(index.coverage("heapq item Australia", [0, 1, 2]), (idf(2) + idf(3)) / total)
    assert math.isclose(index.coverage("heapq item Australia", [1]), idf(3) / total)  # only the rows given count
    assert index.coverage("heapq item", [0]) == 1.0
    assert index.coverage("the of and", [0, 1, 2]) == 0.0  # stopwords only: no terms
    assert index.coverage("heapq", []) == 0.0


def test_coverage_is_the_same_number_under_any_hash_seed():
    import subprocess
    import sys

    code = ("from stages.search.bm25 import BM25Index; i = BM25Index.build(['alpha beta gamma delta epsilon zeta', 'x']); "
            "print(repr(i.coverage('alpha beta gamma delta epsilon zeta eta theta iota kappa', [0, 1])))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert len(outs) == 1, outs  # the artifact holding a threshold must hash the same in every run

"""BM25 (bm25s) index, reciprocal rank fusion and hybrid dense + BM25 search."""
from __future__ import annotations

import gin
import numpy as np
import pytest

from atlas_jax.index.base import SearchResult, exact_search
from atlas_jax.index.hybrid import (BM25Index, HybridConfig, hybrid_search,
                                    reciprocal_rank_fusion)

WORDS = ["grocery", "rent", "salary", "coffee", "market", "transfer", "checking", "savings",
         "utility", "electric", "payment", "refund", "deposit", "restaurant", "fuel"]
TARGET = 37


def make_corpus(num_passages: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, 8)) for _ in range(num_passages)]
    texts[TARGET] = "Landlord payment invoice INV-88213 for Expenses:Housing:Rent on 2023-04-01"
    return texts


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def bm25(corpus):
    return BM25Index(corpus)


def dense_setup(num_passages: int, dim: int = 16, seed: int = 1):
    """Embeddings where the query points away from the target passage."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(num_passages, dim)).astype(np.float32)
    query = rng.normal(size=(1, dim)).astype(np.float32)
    embeddings[TARGET] = -3.0 * query[0]
    return embeddings, query


def test_reciprocal_rank_fusion_arithmetic():
    a = SearchResult(np.array([[3, 1, 2]]), np.zeros((1, 3), np.float32))
    b = SearchResult(np.array([[1, 4, -1]]), np.zeros((1, 3), np.float32))
    fused = reciprocal_rank_fusion([a, b], [1.0, 2.0], k=6, rrf_k=60)
    expected = {1: 1 / 62 + 2 / 61, 4: 2 / 62, 3: 1 / 61, 2: 1 / 63}
    assert fused.ids.dtype == np.int64 and fused.scores.dtype == np.float32
    assert fused.ids[0].tolist() == [1, 4, 3, 2, -1, -1]
    np.testing.assert_allclose(fused.scores[0, :4], [expected[i] for i in (1, 4, 3, 2)],
                               rtol=1e-6)
    assert np.isneginf(fused.scores[0, 4:]).all()
    assert reciprocal_rank_fusion([a, b], [1.0, 2.0], k=2).ids[0].tolist() == [1, 4]


def test_reciprocal_rank_fusion_ties_weights_and_queries():
    a = SearchResult(np.array([[5, 2], [7, -1]]), np.zeros((2, 2), np.float32))
    b = SearchResult(np.array([[2, 5], [-1, -1]]), np.zeros((2, 2), np.float32))
    fused = reciprocal_rank_fusion([a, b], [1.0, 1.0], k=2, rrf_k=0)
    assert fused.ids.tolist() == [[2, 5], [7, -1]]            # tie -> lower id first
    np.testing.assert_allclose(fused.scores[0], [1 / 1 + 1 / 2] * 2)
    np.testing.assert_allclose(fused.scores[1, 0], 1.0)
    only_a = reciprocal_rank_fusion([a, b], [1.0, 0.0], k=2, rrf_k=60)
    assert only_a.ids.tolist() == [[5, 2], [7, -1]]
    with pytest.raises(ValueError, match="one weight per result list"):
        reciprocal_rank_fusion([a, b], [1.0], k=2)
    with pytest.raises(ValueError, match="different numbers of queries"):
        reciprocal_rank_fusion([a, SearchResult(b.ids[:1], b.scores[:1])], [1.0, 1.0], k=2)


def test_token_pattern_keeps_structured_tokens(bm25):
    tokens = bm25.tokenize("Paid INV-88213 on 2023-04-01 to Expenses:Food:Groceries, a $5 tip.")
    for token in ("inv-88213", "88213", "2023-04-01", "2023", "expenses:food:groceries",
                  "groceries", "paid", "tip"):
        assert token in tokens
    assert "a" not in tokens and "on" not in tokens and "5" not in tokens


def test_bm25_finds_exact_rare_tokens(bm25):
    for query in ("INV-88213", "inv-88213", "Expenses:Housing:Rent", "2023-04-01", "landlord"):
        result = bm25.search([query], k=3)
        assert result.ids[0, 0] == TARGET, query
        assert result.ids.dtype == np.int64 and result.scores.dtype == np.float32
    assert bm25.search(["zzzunknownzzz"], k=3).ids.tolist() == [[-1, -1, -1]]


def test_bm25_scores_are_sorted_and_only_matching(bm25, corpus):
    result = bm25.search(["grocery coffee", "the of"], k=len(corpus))
    hits = result.ids[0][result.ids[0] >= 0]
    assert len(hits) == sum(("grocery" in t or "coffee" in t) for t in corpus)
    scores = result.scores[0][:len(hits)]
    assert (np.diff(scores) <= 0).all() and (scores > 0).all()
    assert (result.ids[1] == -1).all()                      # stopwords only


def test_stopwords_are_configurable():
    texts = ["the cat", "a dog"]
    assert BM25Index(texts).search(["the"], k=2).ids[0].tolist() == [-1, -1]
    assert BM25Index(texts, stopwords=None).search(["the"], k=2).ids[0, 0] == 0


def test_hybrid_finds_rare_token_the_dense_side_misses(corpus, bm25):
    embeddings, query = dense_setup(len(corpus))
    k = 5

    def dense_search_fn(query_embeddings, depth, filters):
        return exact_search(embeddings, query_embeddings, depth, filters)

    dense_only = exact_search(embeddings, query, len(corpus))
    assert TARGET not in dense_only.ids[0, :k]
    assert dense_only.ids[0, -1] == TARGET                   # the very last by dense score
    fused = hybrid_search(dense_search_fn, bm25, query, ["invoice INV-88213"], k,
                          config=HybridConfig(candidates=len(corpus)))
    assert TARGET in fused.ids[0, :k]
    assert len(set(fused.ids[0].tolist())) == k


def test_hybrid_respects_filters(corpus, bm25):
    embeddings, query = dense_setup(len(corpus))
    rng = np.random.default_rng(3)
    mask = rng.random(len(corpus)) < 0.5
    mask[TARGET] = True

    def dense_search_fn(query_embeddings, depth, filters):
        return exact_search(embeddings, query_embeddings, depth, filters)

    fused = hybrid_search(dense_search_fn, bm25, query, ["INV-88213 grocery"], 10, filters=mask)
    hits = fused.ids[0][fused.ids[0] >= 0]
    assert len(hits) == 10 and mask[hits].all() and TARGET in hits
    blocked = mask.copy()
    blocked[TARGET] = False
    fused = hybrid_search(dense_search_fn, bm25, query, ["INV-88213 grocery"], 10,
                          filters=blocked)
    assert TARGET not in fused.ids[0] and blocked[fused.ids[0][fused.ids[0] >= 0]].all()
    per_query = np.stack([mask, ~mask])
    two = bm25.search(["grocery", "grocery"], 50, filters=per_query)
    for row in range(2):
        hits = two.ids[row][two.ids[row] >= 0]
        assert len(hits) and per_query[row][hits].all()


def test_hybrid_search_depth_and_gin_config(corpus, bm25):
    calls = []

    def dense_search_fn(query_embeddings, depth, filters):
        calls.append(depth)
        return SearchResult(np.arange(depth)[None], np.zeros((1, depth), np.float32))

    hybrid_search(dense_search_fn, bm25, np.zeros((1, 4)), ["rent"], 3,
                  config=HybridConfig(candidates=7))
    hybrid_search(dense_search_fn, bm25, np.zeros((1, 4)), ["rent"], 9,
                  config=HybridConfig(candidates=7))
    assert calls == [7, 9]
    try:
        gin.parse_config("HybridConfig.bm25_weight = 0.0")
        only_dense = hybrid_search(dense_search_fn, bm25, np.zeros((1, 4)), ["INV-88213"], 3)
    finally:
        gin.clear_config()
    assert only_dense.ids[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="weights must be >= 0"):
        HybridConfig(dense_weight=-1.0)


def test_save_load_gives_identical_results(tmp_path, corpus, bm25):
    bm25.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    queries = ["INV-88213", "grocery rent coffee", "2023-04-01 payment", "nothing here"]
    mask = np.arange(len(corpus)) % 3 != 0
    for filters in (None, mask):
        before, after = bm25.search(queries, 10, filters), loaded.search(queries, 10, filters)
        np.testing.assert_array_equal(before.ids, after.ids)
        np.testing.assert_array_equal(before.scores, after.scores)
    assert loaded.size == bm25.size
    with pytest.raises(ValueError, match="bm25.json"):
        BM25Index.load(tmp_path / "missing")


def test_add_makes_new_passages_findable(tmp_path, corpus):
    index = BM25Index(corpus[:40])
    assert index.search(["zorblax"], 3).ids[0, 0] == -1
    index.add(["a receipt for zorblax widgets", "grocery run"])
    assert index.size == 42
    assert index.search(["zorblax"], 3).ids[0].tolist() == [40, -1, -1]
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    loaded.add(corpus[40:])                                  # dense ids 42..61
    fresh = BM25Index(corpus[:40] + ["a receipt for zorblax widgets", "grocery run"]
                      + corpus[40:])
    np.testing.assert_array_equal(loaded.search(["INV-88213 grocery"], 10).ids,
                                  fresh.search(["INV-88213 grocery"], 10).ids)
    assert loaded.search(["INV-88213"], 1).ids[0, 0] == TARGET   # old ids unchanged
    loaded.add(["quuxolate"])
    assert loaded.search(["QUUXOLATE", "zorblax"], 1).ids.tolist() == [[len(corpus) + 2], [40]]


def test_building_an_index_prints_no_bm25s_debug_lines(capfd):
    """bm25s sets its own logger to DEBUG; once the root logger has a handler (absl, seqio),
    every build printed `DEBUG:bm25s:Building index ...` (in `atlas-jax ask` too)."""
    import logging
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        BM25Index(["2021-01-05 Kin Soy 40.88 USD", "2021-01-06 Verizon 55.00 USD"])
    finally:
        root.removeHandler(handler)
    assert "Building index" not in capfd.readouterr().err

"""`train_data.RetrievalBatcher`: strict / prefer metadata filters, source-passage exclusion,
live rerank, filters parsed from the question, cached query embeddings, hybrid candidates,
the batch layout, and the query-side `passage_embeddings` shortcut of `joint_loss`.

Every expected id list is an exhaustive numpy sort of q . p over the whole corpus with the
condition applied per passage in Python (metadata read directly, never through the index's
filter mask); the rerank order is a per-passage numpy re-scoring; the query-side loss and
gradients are those of re-encoding the passages with the frozen tower.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from atlas_jax.train import joint_loss, objectives
from atlas_jax.index import hybrid as hybrid_lib
from atlas_jax.index import passage_index, passages as passages_lib
from atlas_jax.models import fid, retriever, t5
from atlas_jax.train.data import EOS_ID, Examples, RetrievalBatcher, RetrievalSettings

N, D, K = 16, 8, 4                  # passages, embedding dim, retriever_n_context
LP, LR, LQ, L, T = 6, 5, 5, 16, 4   # retriever / reader passage tokens, query, reader, target
QUERIES = ["w3 w5 alpha", "w7 beta", "w11 w2 gamma", "w13 delta"]


def _metadata(i):
    return {"kind": "a" if i % 3 == 0 else "b", "n": i}


STORE_RECORDS = [{"id": f"p{i}", "title": f"title {i}",
                  "text": f"w{i} w{(i * 5) % N} common words", "metadata": _metadata(i)}
                 for i in range(N)]

# Each filter expression and the same condition written as a Python predicate on metadata.
PREDICATES = {"kind=a": lambda m: m["kind"] == "a", "kind=b": lambda m: m["kind"] == "b",
              "n>=13": lambda m: m["n"] >= 13, "n>=14": lambda m: m["n"] >= 14,
              "n<7": lambda m: m["n"] < 7}


def _satisfies(filters):
    """(N,) bool: the passages whose metadata satisfies every filter (all True if none)."""
    return np.array([all(PREDICATES[f](_metadata(i)) for f in filters) for i in range(N)])


def _reference(query, embeddings, k, filters=(), mode="strict", exclude_row=None):
    """Exhaustive numpy retrieval of one query: every passage scored (float64), sorted by
    score; strict keeps only those satisfying `filters`, prefer puts them first and the
    others after (each group in score order); `exclude_row` is never returned."""
    scores = np.asarray(embeddings, np.float64) @ np.asarray(query, np.float64)
    order = [int(i) for i in np.argsort(-scores, kind="stable") if i != exclude_row]
    ok = _satisfies(filters)
    if not filters:
        ranked = order
    elif mode == "strict":
        ranked = [i for i in order if ok[i]]
    else:
        ranked = [i for i in order if ok[i]] + [i for i in order if not ok[i]]
    return np.array((ranked + [-1] * k)[:k])


class FakeQueryTower:
    """Query text -> tokens [3 + its position in QUERIES, 4, ...]; embedding: a fixed table
    row per text. Records every call (the rows it embedded)."""

    def __init__(self, table):
        self.table = np.asarray(table, np.float32)
        self.calls = []

    def encode(self, texts):
        return [[3 + QUERIES.index(t)] + list(range(4, 4 + len(t.split()))) for t in texts]

    def embed(self, ids, mask):
        self.calls.append(ids[:, 0] - 3)
        return self.table[ids[:, 0] - 3]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    store = passages_lib.PassageStore.from_records(STORE_RECORDS)
    embeddings = rng.normal(size=(N, D)).astype(np.float32)
    lengths = rng.integers(3, LP + 1, N).astype(np.int32)
    token_ids = rng.integers(3, 50, (N, LP)).astype(np.int32)
    token_ids[np.arange(LP)[None] >= lengths[:, None]] = 0
    reader_lengths = rng.integers(2, LR + 1, N).astype(np.int32)
    reader_ids = rng.integers(2, 64, (N, LR)).astype(np.int32)
    reader_ids[np.arange(LR)[None] >= reader_lengths[:, None]] = 0
    return {"store": store, "embeddings": embeddings,
            "retriever_tokens": passages_lib.TokenArray(token_ids, lengths),
            "reader_tokens": passages_lib.TokenArray(reader_ids, reader_lengths),
            "queries": rng.normal(size=(len(QUERIES), D)).astype(np.float32),
            "index": passage_index.PassageIndex.from_embeddings(store, embeddings, "device")}


def _examples(filters=None, sources=None, seed=1):
    rng = np.random.default_rng(seed)
    n = len(QUERIES)
    targets = rng.integers(2, 64, (n, T)).astype(np.int32)
    targets[:, -1] = EOS_ID
    return Examples(prompts=[rng.integers(2, 64, 3 + i % 2).astype(np.int32) for i in range(n)],
                    targets=targets, queries=list(QUERIES), ids=[f"e{i}" for i in range(n)],
                    answers=[[] for _ in range(n)], gold_ids=[[] for _ in range(n)],
                    filters=[list(f) for f in filters] if filters else [[] for _ in range(n)],
                    source_passages=list(sources) if sources else [None] * n)


def _batcher(corpus, tower, query_filters=None, hybrid_config=None, **settings):
    settings = {"n_context": 2, "retriever_n_context": K, "query_length": LQ,
                "reader_length": L, **settings}
    return RetrievalBatcher(RetrievalSettings(**settings), tower.encode,
                            corpus["reader_tokens"], corpus["retriever_tokens"],
                            query_filters=query_filters, hybrid_config=hybrid_config)


ROWS = np.arange(len(QUERIES))
# Row 0: 6 passages satisfy; row 1: 3 (< K); row 2: no filter; row 3: two conditions, 3 pass.
FILTERS = [["kind=a"], ["n>=13"], [], ["kind=a", "n<7"]]


def test_strict_filters_return_only_satisfying_passages(corpus):
    tower = FakeQueryTower(corpus["queries"])
    batch, found = _batcher(corpus, tower).assemble(_examples(FILTERS), ROWS, corpus["index"],
                                                    tower.embed)
    expected = np.stack([_reference(corpus["queries"][b], corpus["embeddings"], K, FILTERS[b])
                         for b in ROWS])
    np.testing.assert_array_equal(found, expected)
    for b in ROWS:
        ok = _satisfies(FILTERS[b])
        assert all(ok[i] for i in found[b] if i >= 0)
        assert (found[b] >= 0).sum() == min(K, ok.sum())
    np.testing.assert_array_equal(batch["passage_valid"], expected >= 0)
    assert not batch["passage_valid"][1, 3] and not batch["passage_valid"][3, 3]
    assert batch["passage_valid"][2].all()
    # The filters changed the result (an unfiltered search would differ on rows 0, 1, 3).
    for b in (0, 1, 3):
        assert not np.array_equal(found[b], _reference(corpus["queries"][b],
                                                       corpus["embeddings"], K))
    # use_filters=False ignores them.
    _, unfiltered = _batcher(corpus, tower, use_filters=False).assemble(
        _examples(FILTERS), ROWS, corpus["index"], tower.embed)
    np.testing.assert_array_equal(unfiltered, np.stack([
        _reference(corpus["queries"][b], corpus["embeddings"], K) for b in ROWS]))


def test_prefer_filters_put_satisfying_passages_first_then_the_best_others(corpus):
    tower = FakeQueryTower(corpus["queries"])
    batch, found = _batcher(corpus, tower, filter_mode="prefer").assemble(
        _examples(FILTERS), ROWS, corpus["index"], tower.embed)
    expected = np.stack([_reference(corpus["queries"][b], corpus["embeddings"], K, FILTERS[b],
                                    mode="prefer") for b in ROWS])
    np.testing.assert_array_equal(found, expected)
    assert batch["passage_valid"].all()
    # Rows 1 and 3 have 3 satisfying passages: those three, then the best other one.
    for b in (1, 3):
        ok = _satisfies(FILTERS[b])
        assert ok[found[b, :3]].all() and not ok[found[b, 3]]
        scores = corpus["embeddings"].astype(np.float64) @ corpus["queries"][b]
        assert found[b, 3] == max(np.flatnonzero(~ok), key=lambda i: scores[i])


@pytest.mark.parametrize("filter_mode,filters", [("strict", None), ("strict", FILTERS),
                                                 ("prefer", FILTERS)])
def test_source_passage_excluded(corpus, filter_mode, filters):
    # Each query's own source passage is its best match: q = 3 p_source + 0.1 q.
    sources = [12, 13, None, 6]             # each also satisfies its row's filters
    queries = corpus["queries"].copy()
    for b, src in enumerate(sources):
        if src is not None:
            queries[b] = 3 * corpus["embeddings"][src] + 0.1 * queries[b]
    tower = FakeQueryTower(queries)
    examples = _examples(filters, [f"p{s}" if s is not None else None for s in sources])
    flt = filters or [[]] * len(QUERIES)
    for b, src in enumerate(sources):
        if src is not None:                 # precondition: the source is the top hit
            assert _reference(queries[b], corpus["embeddings"], 1, flt[b], filter_mode)[0] == src

    _, found = _batcher(corpus, tower, filter_mode=filter_mode).assemble(
        examples, ROWS, corpus["index"], tower.embed)
    expected = np.stack([_reference(queries[b], corpus["embeddings"], K, flt[b], filter_mode,
                                    exclude_row=sources[b]) for b in ROWS])
    np.testing.assert_array_equal(found, expected)
    for b, src in enumerate(sources):
        if src is not None:
            assert src not in found[b]

    _, kept = _batcher(corpus, tower, filter_mode=filter_mode, exclude_source=False).assemble(
        examples, ROWS, corpus["index"], tower.embed)
    np.testing.assert_array_equal(kept, np.stack([
        _reference(queries[b], corpus["embeddings"], K, flt[b], filter_mode) for b in ROWS]))
    for b, src in enumerate(sources):
        if src is not None:
            assert kept[b, 0] == src


def _numpy_passage_tower(table):
    """A passage tower in numpy: position-weighted masked sum of token vectors."""
    def embed(ids, mask):
        weights = mask[..., None] * (1.0 + 0.25 * np.arange(ids.shape[-1]))[:, None]
        return (table[ids] * weights).sum(axis=-2).astype(np.float32)
    return embed


def test_rerank_equals_exact_rescoring_with_the_passage_tower(corpus):
    rerank_n, k = 8, 3
    table = np.random.default_rng(5).normal(size=(50, D)).astype(np.float32)
    embed_passages = _numpy_passage_tower(table)
    tower = FakeQueryTower(corpus["queries"])
    filters = [[], ["n>=14"], [], ["kind=b"]]    # row 1: only 2 candidates (< k)
    sources = [None, None, "p5", None]
    examples = _examples(filters, sources)
    calls = []

    def counted(ids, mask):
        calls.append(ids.shape)
        return embed_passages(ids, mask)

    batch, found = _batcher(corpus, tower, retriever_n_context=k, rerank_n=rerank_n).assemble(
        examples, ROWS, corpus["index"], tower.embed, counted)
    tokens = corpus["retriever_tokens"]
    expected = []
    for b in ROWS:
        candidates = _reference(corpus["queries"][b], corpus["embeddings"], rerank_n,
                                filters[b], exclude_row=5 if b == 2 else None)
        candidates = candidates[candidates >= 0]
        fresh = {}
        for j in candidates:                   # each passage alone, its own tokens only
            ids = tokens.token_ids[j, :tokens.lengths[j]]
            weights = 1.0 + 0.25 * np.arange(len(ids))
            fresh[j] = (table[ids].astype(np.float64) * weights[:, None]).sum(axis=0)
        query = corpus["queries"][b].astype(np.float64)
        ranked = sorted(candidates, key=lambda j: -float(query @ fresh[j]))
        expected.append((ranked + [-1] * k)[:k])
    expected = np.array(expected)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_array_equal(batch["passage_valid"], expected >= 0)
    assert len(calls) == 1 and calls[0][0] == len(ROWS) * rerank_n
    # The rerank changed the result: a passage outside the index's top k was promoted.
    index_top = np.stack([_reference(corpus["queries"][b], corpus["embeddings"], k, filters[b],
                                     exclude_row=5 if b == 2 else None) for b in ROWS])
    assert any(set(found[b][found[b] >= 0]) - set(index_top[b]) for b in ROWS)
    # Without a passage tower there is no rerank: the index's own top k.
    _, plain = _batcher(corpus, tower, retriever_n_context=k, rerank_n=rerank_n).assemble(
        examples, ROWS, corpus["index"], tower.embed)
    np.testing.assert_array_equal(plain, index_top)


def test_query_filters_parsed_from_the_question(corpus):
    tower = FakeQueryTower(corpus["queries"])
    parsed = {QUERIES[0]: ["kind=a"], QUERIES[1]: ["n>=13"], QUERIES[2]: [],
              QUERIES[3]: ["kind=a", "n<7"]}
    calls = []

    def parser(texts, store):
        assert store is corpus["store"]
        calls.append(list(texts))
        return [parsed[t] for t in texts]

    # The examples' own filters contradict the parsed ones: the parser wins.
    examples = _examples([["kind=b"]] * len(QUERIES))
    batcher = _batcher(corpus, tower, query_filters=parser)
    _, found = batcher.assemble(examples, np.array([0, 1, 0, 1]), corpus["index"], tower.embed)
    _, found2 = batcher.assemble(examples, ROWS, corpus["index"], tower.embed)
    assert calls == [sorted(QUERIES[:2]), sorted(QUERIES[2:])]   # once per distinct text
    for rows, got in (([0, 1, 0, 1], found), (ROWS, found2)):
        expected = np.stack([_reference(corpus["queries"][r], corpus["embeddings"], K,
                                        parsed[QUERIES[r]]) for r in rows])
        np.testing.assert_array_equal(got, expected)


READER = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                     num_encoder_layers=1, num_decoder_layers=1,
                     mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                     scale_decoder_outputs=False, dropout_rate=0.0)
RETRIEVER = retriever.RetrieverConfig(vocab_size=50, hidden_size=D, num_layers=1, num_heads=2,
                                      mlp_dim=16, max_position_embeddings=16, dropout_rate=0.0)


@pytest.fixture(scope="module")
def dual():
    """A tiny DualEncoder: live and frozen parameters, jit query / passage towers -> numpy."""
    model = retriever.DualEncoder(RETRIEVER)
    ones = jnp.ones((1, LP), jnp.int32)
    init = jax.jit(lambda key: model.init(key, ones, ones, ones, ones)["params"])
    towers = {name: jax.jit(lambda p, ids, mask, method=method: model.apply(
        {"params": p}, ids, mask, method=method)) for name, method in (
        ("query", model.embed_queries), ("passage", model.embed_passages))}
    return {"model": model, "live": meta.unbox(init(jax.random.key(1))),
            "frozen": meta.unbox(init(jax.random.key(2))),   # unlike the live tower
            "tower": lambda p, name, ids, mask: np.asarray(towers[name](p, ids, mask),
                                                           np.float32)}


def test_cached_query_embeddings_equal_fresh_ones_and_are_used(corpus, dual):
    def apply(ids, mask):
        return dual["tower"](dual["live"], "query", ids, mask)

    calls = []

    def embed_queries(ids, mask):
        calls.append(len(ids))
        return np.asarray(apply(ids, mask), np.float32)

    tower = FakeQueryTower(np.zeros((len(QUERIES), D)))      # its encode only
    examples = _examples()
    fresh_batcher = _batcher(corpus, tower)
    cached_batcher = _batcher(corpus, tower)
    cached_batcher.cache_queries = {}
    first, second = np.array([0, 1, 0, 2]), np.array([2, 3, 3, 1])
    for rows, new_calls in ((first, [4]), (second, [4]), (first, []), (second, [])):
        calls.clear()
        _, got = cached_batcher.assemble(examples, rows, corpus["index"], embed_queries)
        assert calls == new_calls            # only unseen texts, padded to the batch size
        calls.clear()
        _, want = fresh_batcher.assemble(examples, rows, corpus["index"], embed_queries)
        assert calls == [4]
        np.testing.assert_array_equal(got, want)
    assert sorted(cached_batcher.cache_queries) == sorted(QUERIES)
    for text in QUERIES:                     # each text embedded alone
        ids, mask = fresh_batcher.query_tokens([text])
        np.testing.assert_allclose(cached_batcher.cache_queries[text],
                                   np.asarray(apply(ids, mask))[0], rtol=1e-6, atol=1e-6)
    # The cache is what retrieval reads: a planted embedding decides the top hit.
    cached_batcher.cache_queries[QUERIES[1]] = 10 * corpus["embeddings"][9]
    calls.clear()
    _, planted = cached_batcher.assemble(examples, first, corpus["index"], embed_queries)
    assert calls == [] and planted[1, 0] == 9
    np.testing.assert_array_equal(planted[1], _reference(10 * corpus["embeddings"][9],
                                                         corpus["embeddings"], K))


def test_hybrid_candidates_fuse_dense_and_bm25(corpus):
    config = hybrid_lib.HybridConfig(dense_weight=1.0, bm25_weight=2.0, rrf_k=3, candidates=6)
    tower = FakeQueryTower(corpus["queries"])
    filters = [[], ["kind=b"], [], []]
    _, found = _batcher(corpus, tower, hybrid=True, hybrid_config=config).assemble(
        _examples(filters), ROWS, corpus["index"], tower.embed)
    bm25 = corpus["index"].bm25
    for b in ROWS:
        ok = _satisfies(filters[b])
        dense = _reference(corpus["queries"][b], corpus["embeddings"], 6, filters[b])
        sparse = bm25.search([QUERIES[b]], 6, ok).ids[0]      # the BM25 library's ranking
        fused = {}
        for ids, weight in ((dense, 1.0), (sparse, 2.0)):
            for rank, i in enumerate(int(i) for i in ids if i >= 0):
                fused[i] = fused.get(i, 0.0) + weight / (3 + rank + 1)
        expected = sorted(fused, key=lambda i: (-fused[i], i))[:K]
        np.testing.assert_array_equal(found[b], expected)
        assert all(ok[i] for i in found[b])
    # BM25 mattered: a dense-only search differs.
    dense_only = np.stack([_reference(corpus["queries"][b], corpus["embeddings"], K,
                                      filters[b]) for b in ROWS])
    assert not np.array_equal(found, dense_only)


def test_batch_layout_and_host_share(corpus):
    tower = FakeQueryTower(corpus["queries"])
    examples = _examples(FILTERS)
    batcher = _batcher(corpus, tower)
    batch, found = batcher.assemble(examples, ROWS, corpus["index"], tower.embed)
    tokens, reader = corpus["retriever_tokens"], corpus["reader_tokens"]
    assert found.shape == (len(ROWS), K) and (found == -1).any()
    for b in ROWS:
        q = tower.encode([QUERIES[b]])[0]
        np.testing.assert_array_equal(batch["query_ids"][b], (q + [0] * LQ)[:LQ])
        np.testing.assert_array_equal(batch["query_mask"][b], [1] * len(q) + [0] * (LQ - len(q)))
        np.testing.assert_array_equal(batch["targets"][b], examples.targets[b])
        np.testing.assert_array_equal(batch["decoder_input_ids"][b],
                                      [0] + list(examples.targets[b, :-1]))
        for k, row in enumerate(found[b]):
            if row < 0:
                assert not batch["passage_ids"][b, k].any()
                assert not batch["passage_mask"][b, k].any()
                assert not batch["reader_ids"][b, k].any()
                continue
            n = tokens.lengths[row]
            np.testing.assert_array_equal(batch["passage_ids"][b, k],
                                          tokens.token_ids[row])
            np.testing.assert_array_equal(batch["passage_mask"][b, k], np.arange(LP) < n)
            text = list(examples.prompts[b]) + list(reader.token_ids[row, :reader.lengths[row]])
            np.testing.assert_array_equal(batch["reader_ids"][b, k],
                                          (text + [EOS_ID] + [0] * L)[:L])
    # Truncated to the reader length with EOS kept last; closed book: the prompt alone.
    short = _batcher(corpus, tower, reader_length=6).reader_inputs(examples.prompts, found)
    for b in ROWS:
        for k, row in enumerate(found[b]):
            if row >= 0:
                text = list(examples.prompts[b]) + list(reader.token_ids[row])
                np.testing.assert_array_equal(short[b, k], text[:5] + [EOS_ID])
    closed, none = _batcher(corpus, tower, closed_book=True).assemble(
        examples, ROWS, corpus["index"], tower.embed)
    assert none is None and "query_ids" not in closed
    for b in ROWS:
        prompt = list(examples.prompts[b])
        np.testing.assert_array_equal(closed["reader_ids"][b, 0],
                                      prompt + [EOS_ID] + [0] * (L - len(prompt) - 1))
    # A host's share (`keep`): every query still searched, the kept rows' tensors returned.
    tower.calls.clear()
    keep = np.array([1, 3])
    part, part_found = batcher.assemble(examples, ROWS, corpus["index"], tower.embed, keep=keep)
    np.testing.assert_array_equal(tower.calls[0], ROWS)
    np.testing.assert_array_equal(part_found, found[keep])
    assert set(part) == set(batch)
    for name in batch:
        np.testing.assert_array_equal(part[name], batch[name][keep])


def test_query_side_passage_embeddings_equal_re_encoding_with_the_frozen_tower(corpus, dual):
    models = joint_loss.JointModels(fid.FusionInDecoder(READER), dual["model"])
    reader_params = jax.jit(models.reader.init)(jax.random.key(0),
                                                jnp.ones((1, 2, L), jnp.int32),
                                                jnp.ones((1, T), jnp.int32))["params"]
    params = {"reader": meta.unbox(reader_params), "retriever": dual["live"]}
    frozen, tower = dual["frozen"], dual["tower"]
    # The index: the frozen tower's embeddings of every passage's retriever tokens.
    tokens = corpus["retriever_tokens"]
    index_rows = tower(frozen, "passage", tokens.token_ids,
                       (np.arange(LP)[None] < tokens.lengths[:, None]).astype(np.int32))
    index = passage_index.PassageIndex.from_embeddings(corpus["store"], index_rows, "device")
    k = 3
    batcher = RetrievalBatcher(
        RetrievalSettings(n_context=k, retriever_n_context=k, query_length=LQ, reader_length=L,
                          stored_passage_embeddings=True),
        FakeQueryTower(np.zeros((len(QUERIES), D))).encode, corpus["reader_tokens"], tokens)
    filters = [[], ["n>=14"], [], ["kind=a"]]          # row 1: 2 passages, one slot invalid
    batch, found = batcher.assemble(
        _examples(filters), ROWS, index,
        lambda i, m: tower(params["retriever"], "query", i, m))
    assert (found == -1).sum() == 1 and found[1, 2] == -1
    expected_rows = np.where((found >= 0)[..., None], index_rows[np.maximum(found, 0)], 0.0)
    np.testing.assert_array_equal(batch["passage_embeddings"], expected_rows)

    config = objectives.ObjectiveConfig(objective="adist", temperature_gold=0.5,
                                        temperature_score=0.5)
    stored = jax.tree.map(jnp.asarray, batch)
    encoded = {name: v for name, v in stored.items() if name != "passage_embeddings"}

    @jax.jit
    def loss_and_grads(retriever_params, b):
        # Gradients of the retriever only: the reader's do not involve the passage embeddings.
        def loss(r):
            return joint_loss.joint_loss(dict(params, retriever=r), b, models, config, k,
                                         jax.random.key(0), deterministic=True,
                                         frozen_passage_params=frozen)
        return jax.value_and_grad(loss, has_aux=True)(retriever_params)
    (_, metrics_s), grads_s = loss_and_grads(params["retriever"], stored)
    (_, metrics_e), grads_e = loss_and_grads(params["retriever"], encoded)
    assert float(metrics_e["retriever_loss"]) > 0
    for name in metrics_e:
        np.testing.assert_allclose(float(metrics_s[name]), float(metrics_e[name]),
                                   rtol=1e-5, atol=1e-7)
    flat_s, flat_e = jax.tree.leaves(grads_s), jax.tree.leaves(grads_e)
    assert len(flat_s) == len(flat_e)
    for g_s, g_e in zip(flat_s, flat_e):
        np.testing.assert_allclose(np.asarray(g_s), np.asarray(g_e), rtol=1e-4, atol=1e-6)
    assert sum(np.abs(np.asarray(g)).sum() for g in flat_s) > 0
    # The frozen tower matters: the live tower embeds the passages differently.
    live_rows = tower(params["retriever"], "passage", tokens.token_ids,
                      (np.arange(LP)[None] < tokens.lengths[:, None]).astype(np.int32))
    assert np.abs(live_rows - index_rows).max() > 0.1

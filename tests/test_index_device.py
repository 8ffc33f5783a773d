"""Sharded device search: exact equality with numpy on several mesh shapes, filters,
compressed storage, updates."""
import jax
import numpy as np
import pytest

from atlas_jax import evaluation, partitioning
from atlas_jax.index import base, device


def _data(n=1003, dim=32, queries=7, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, dim)).astype(np.float32),
            rng.normal(size=(queries, dim)).astype(np.float32))


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (1, 8), (2, 2)])
def test_sharded_search_equals_numpy(mesh_shape):
    embeddings, queries = _data()
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    backend = device.DeviceBackend(embeddings, partitioning.create_mesh(mesh_shape, devices))
    assert backend.num_shards == len(devices)
    assert backend._stored.sharding.spec == device._ROWS
    expected = base.exact_search(embeddings, queries, 10)
    result = backend.search(queries, 10)
    np.testing.assert_array_equal(result.ids, expected.ids)
    np.testing.assert_allclose(result.scores, expected.scores, rtol=1e-5, atol=1e-5)


def test_k_larger_than_corpus_pads():
    embeddings, queries = _data(n=5)
    result = device.DeviceBackend(embeddings).search(queries, 8)
    assert result.ids.shape == (7, 8)
    assert (result.ids[:, 5:] == -1).all() and np.isneginf(result.scores[:, 5:]).all()
    np.testing.assert_array_equal(np.sort(result.ids[:, :5], axis=1),
                                  np.tile(np.arange(5), (7, 1)))


@pytest.mark.parametrize("allowed_fraction", [0.005, 0.3])
def test_filters_return_k_allowed_hits(allowed_fraction):
    embeddings, queries = _data()
    mask = np.random.default_rng(1).random(len(embeddings)) < allowed_fraction
    backend = device.DeviceBackend(embeddings)
    k = 10
    result = backend.search(queries, k, mask)
    expected = base.exact_search(embeddings, queries, k, mask)
    np.testing.assert_array_equal(result.ids, expected.ids)
    found = result.ids[result.ids >= 0]
    assert mask[found].all()
    assert (result.ids >= 0).sum(axis=1).min() == min(k, mask.sum())


def test_per_query_filters():
    embeddings, queries = _data()
    masks = np.zeros((len(queries), len(embeddings)), bool)
    for q in range(len(queries)):
        masks[q, q::len(queries)] = True
    result = device.DeviceBackend(embeddings).search(queries, 5, masks)
    for q in range(len(queries)):
        assert (result.ids[q] % len(queries) == q).all()


def test_compressed_storage_and_rerank():
    embeddings, queries = _data(n=4000, dim=64, queries=50)
    exact = base.exact_search(embeddings, queries, 10).ids
    recalls = {}
    for storage, rerank in [("bfloat16", 0), ("int8", 0), ("int4", 0), ("int4", 100)]:
        backend = device.DeviceBackend(
            embeddings, config=device.DeviceIndexConfig(storage=storage,
                                                        rerank_candidates=rerank))
        recalls[storage, rerank] = evaluation.neighbour_recall(
            backend.search(queries, 10).ids, exact, 10)
        assert backend.bytes_per_vector() == {"bfloat16": 128, "int8": 64, "int4": 32}[storage]
    assert recalls["bfloat16", 0] >= 0.95
    assert recalls["int8", 0] >= 0.95
    assert recalls["int4", 100] == 1.0
    assert recalls["int4", 0] < recalls["int4", 100]


def test_int4_roundtrip():
    embeddings, _ = _data(n=50, dim=16)
    backend = device.DeviceBackend(embeddings, config=device.DeviceIndexConfig(storage="int4"))
    codes, scale = device.quantize(embeddings, 4)
    np.testing.assert_allclose(backend.host_embeddings(), codes * scale, rtol=1e-6)
    assert np.abs(backend.host_embeddings() - embeddings).max() <= scale.max() / 2 + 1e-6


def test_approx_max_k_runs_with_high_recall():
    embeddings, queries = _data(n=4000)
    backend = device.DeviceBackend(embeddings,
                                   config=device.DeviceIndexConfig(approx_recall=0.95))
    exact = base.exact_search(embeddings, queries, 10).ids
    assert evaluation.neighbour_recall(backend.search(queries, 10).ids, exact, 10) >= 0.9


def test_add_and_delete_visible_in_next_search():
    embeddings, queries = _data()
    backend = device.DeviceBackend(embeddings)
    top = backend.search(queries, 1).ids[:, 0]
    backend.delete(top)
    assert not set(backend.search(queries, 10).ids.ravel()) & set(top)
    new_ids = backend.add(queries * 10)
    np.testing.assert_array_equal(backend.search(queries, 1).ids[:, 0], new_ids)
    assert backend.size == len(embeddings) + len(queries)


def test_bad_shapes_are_named():
    embeddings, queries = _data()
    backend = device.DeviceBackend(embeddings)
    with pytest.raises(ValueError, match="dimension 32"):
        backend.search(queries[:, :16], 3)
    with pytest.raises(ValueError, match="filter mask"):
        backend.search(queries, 3, np.ones(10, bool))
    with pytest.raises(ValueError, match="storage"):
        device.DeviceBackend(embeddings, config=device.DeviceIndexConfig(storage="fp8"))

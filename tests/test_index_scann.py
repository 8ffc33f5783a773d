"""ScaNN backend: auto configuration, exactness in brute-force mode, AH / tree recall, filters,
upsert / delete, pickle-free save / load and its error messages."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from atlas_jax.index import scann_backend
from atlas_jax.index.base import exact_search
from atlas_jax.index.scann_backend import ScannBackend, ScannConfig, auto_config

DIM = 32
# Force the over-retrieval path (no query counts as "few allowed rows").
OVERRETRIEVE = dict(exact_filter_max_rows=0, exact_filter_min_fraction=0.0)


def clustered(num: int, seed: int, num_clusters: int = 64) -> np.ndarray:
    """(num, DIM) float32 clustered vectors, exactly representable in float16 (so the
    backend's float16 copy and ScaNN's float32 data score identically)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, DIM))
    points = centers[rng.integers(0, num_clusters, num)] + 0.5 * rng.standard_normal((num, DIM))
    return points.astype(np.float16).astype(np.float32)


def slot_matrix(backend: ScannBackend, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(backend.size, DIM) reference embeddings by id (zeros in holes)."""
    table = np.zeros((backend.size, DIM), np.float32)
    table[ids] = vectors
    return table


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return clustered(30_000, seed=0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(64, seed=1)


@pytest.fixture(scope="module")
def sparse_brute_force():
    """Brute-force backend over 4000 vectors with non-contiguous ids in [0, 10000)."""
    rng = np.random.default_rng(2)
    ids = rng.choice(10_000, 4000, replace=False)
    vectors = clustered(4000, seed=3)
    return ScannBackend.build(vectors, ids), ids, vectors


@pytest.fixture(scope="module")
def ah_backend(corpus):
    return ScannBackend.build(corpus)


@pytest.fixture(scope="module")
def tree_backend(corpus):
    return ScannBackend.build(corpus, config=ScannConfig(mode="tree_ah"))


def test_auto_config_follows_scann_rules_of_thumb():
    assert auto_config(19_999, DIM).mode == "brute_force"
    assert auto_config(20_000, DIM).mode == "ah"
    assert auto_config(99_999, DIM).mode == "ah"
    tree = auto_config(100_000, DIM)
    assert tree.mode == "tree_ah"
    assert (tree.num_leaves, tree.num_leaves_to_search) == (316, 79)
    assert auto_config(20_000, DIM).reorder_k == 1024
    assert tree.reorder_k == 256 and tree.training_sample_size == 100_000
    assert auto_config(4_000_000, DIM).training_sample_size == 100_000
    forced = auto_config(5000, DIM, ScannConfig(mode="tree_ah", num_leaves_to_search=7))
    assert (forced.mode, forced.num_leaves, forced.num_leaves_to_search) == ("tree_ah", 71, 7)
    assert auto_config(50_000, DIM, ScannConfig(mode="brute_force")).mode == "brute_force"
    with pytest.raises(ValueError, match="mode"):
        auto_config(10, DIM, ScannConfig(mode="hnsw"))


def test_bytes_per_vector(sparse_brute_force, ah_backend):
    assert sparse_brute_force[0].bytes_per_vector() == 4 * DIM
    assert ah_backend.bytes_per_vector() == 8 + 4 * DIM      # 16 blocks x 4 bits + float32
    int8 = ScannBackend.build(clustered(500, seed=4),
                              config=ScannConfig(mode="ah", quantize_reorder=True))
    assert int8.bytes_per_vector() == 8 + DIM                # int8 reorder data


def test_brute_force_equals_exact_search(sparse_brute_force, queries):
    backend, ids, vectors = sparse_brute_force
    assert backend.config.mode == "brute_force" and backend.size == ids.max() + 1
    table, live = slot_matrix(backend, ids, vectors), backend.live_mask()
    for k in (1, 10, 37):
        result, reference = backend.search(queries, k), exact_search(table, queries, k, live)
        np.testing.assert_array_equal(result.ids, reference.ids)
        np.testing.assert_allclose(result.scores, reference.scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("which, mode", [("ah_backend", "ah"), ("tree_backend", "tree_ah")])
def test_approximate_recall(which, mode, request, corpus, queries):
    backend = request.getfixturevalue(which)
    assert backend.config.mode == mode
    result = backend.search(queries, 10)
    assert recall_at_k(result.ids, exact_search(corpus, queries, 10).ids) >= 0.9
    assert (result.ids >= 0).all()


@pytest.mark.parametrize("which", ["ah_backend", "tree_backend"])
def test_search_settings_trade_speed_for_recall(which, request, corpus, queries):
    backend = request.getfixturevalue(which)
    settings = scann_backend.search_settings(backend)
    assert len(settings) in (3, 4)            # tree_ah: 4 leaf counts, fewer when they clip
    truth = exact_search(corpus, queries, 10).ids
    recalls = [recall_at_k(backend.search(queries, 10, **setting).ids, truth)
               for setting in settings]
    assert recalls[0] <= recalls[-1] and recalls[-1] >= 0.95


@pytest.mark.parametrize("overrides", [{}, OVERRETRIEVE, dict(OVERRETRIEVE, max_overretrieve=500)],
                         ids=["exact", "overretrieve", "overretrieve_then_exact"])
def test_filters_match_exact_in_brute_force_mode(overrides, queries):
    rng = np.random.default_rng(5)
    vectors = clustered(4000, seed=6)
    backend = ScannBackend.build(vectors, config=ScannConfig(**overrides))
    selective = np.zeros(4000, bool)
    selective[rng.choice(4000, 10, replace=False)] = True                 # (size,) shared
    broad = rng.random((len(queries), 4000)) < 0.5                        # (queries, size)
    scores = queries @ vectors.T                                          # (queries, size)
    worst_half = scores < np.median(scores, axis=1, keepdims=True)        # best hits refused
    for mask, k in ((selective, 5), (selective, 25), (broad, 10), (broad, 100),
                    (worst_half, 10)):
        result, reference = backend.search(queries, k, mask), exact_search(vectors, queries, k,
                                                                           mask)
        np.testing.assert_array_equal(result.ids, reference.ids)
        assert result.ids.shape == (len(queries), k)
    padded = backend.search(queries, 25, selective)
    assert (padded.ids[:, 10:] == -1).all() and np.isneginf(padded.scores[:, 10:]).all()
    assert backend.search(queries, 3, np.zeros(4000, bool)).ids.max() == -1


@pytest.mark.parametrize("overrides", [{}, OVERRETRIEVE], ids=["exact", "overretrieve"])
@pytest.mark.parametrize("which", ["ah_backend", "tree_backend"])
def test_approximate_filters_return_k_allowed_hits(which, overrides, request, corpus, queries,
                                                   monkeypatch):
    backend = request.getfixturevalue(which)
    monkeypatch.setattr(backend, "config", dataclasses.replace(backend.config, **overrides))
    rng = np.random.default_rng(7)
    selective = np.zeros(len(corpus), bool)
    selective[rng.choice(len(corpus), 10, replace=False)] = True
    broad = rng.random((len(queries), len(corpus))) < 0.5
    for mask, k in ((selective, 10), (broad, 10)):
        result = backend.search(queries, k, mask)
        assert (result.ids >= 0).all() and result.ids.shape == (len(queries), k)
        rows = np.arange(len(queries))[:, None] if mask.ndim == 2 else 0
        assert np.broadcast_to(mask, (len(queries), len(corpus)))[rows, result.ids].all()
        truth = exact_search(corpus, queries, k, mask).ids
        assert recall_at_k(result.ids, truth) >= 0.9


@pytest.mark.parametrize("mode", ["brute_force", "tree_ah"])
def test_upsert_and_delete_are_visible_in_the_next_search(mode):
    vectors = clustered(3000, seed=8)
    backend = ScannBackend.build(vectors, config=ScannConfig(mode=mode))
    probe = 10.0 * clustered(2, seed=9)                                    # dominant norm
    backend.upsert(np.array([5000, 17]), probe)                           # new id + replace
    assert backend.size == 5001 and backend.num_live == 3001
    result = backend.search(probe, 3)
    np.testing.assert_array_equal(result.ids[:, 0], [5000, 17])
    deleted = np.array([5000, 0, 1, 2999, 1234])
    backend.delete(deleted)
    assert backend.size == 5001 and backend.num_live == 2996
    everything = backend.search(np.concatenate([probe, vectors[:64]]), 50)
    assert not np.isin(everything.ids, deleted).any()
    only_deleted = np.zeros(backend.size, bool)
    only_deleted[deleted] = True
    assert (backend.search(probe, 4, only_deleted).ids == -1).all()
    with pytest.raises(KeyError, match="5000"):
        backend.delete(np.array([5000]))
    live_vectors = slot_matrix(backend, np.arange(3000), vectors)
    live_vectors[17] = probe[1]
    docids = [int(d) for d in backend._searcher.docids]                    # ScaNN's row order
    np.testing.assert_array_equal(docids, backend._row_ids)
    if mode == "brute_force":                                               # id map intact
        reference = exact_search(live_vectors, vectors[:64], 10, backend.live_mask())
        np.testing.assert_array_equal(backend.search(vectors[:64], 10).ids, reference.ids)


def test_save_load_round_trip_without_pickle(tmp_path, monkeypatch, queries):
    vectors = clustered(3000, seed=10)
    backend = ScannBackend.build(vectors, config=ScannConfig(mode="tree_ah"))
    backend.upsert(np.array([4000]), vectors[:1])
    backend.delete(np.array([3, 2999]))
    backend.save(tmp_path)
    assert not list(tmp_path.rglob("*.pkl")) and not (tmp_path / "scann/scann_docids.pkl").exists()
    assert (tmp_path / "scann_vectors.npy").is_file()
    assert np.load(tmp_path / "scann_vectors.npy", allow_pickle=False).dtype == np.float16

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used while loading")
    numpy_loads = []
    real_np_load = np.load

    def recording_np_load(*args, **kwargs):
        numpy_loads.append(kwargs.get("allow_pickle"))
        return real_np_load(*args, **kwargs)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(scann_backend.np, "load", recording_np_load)
    loaded = ScannBackend.load(tmp_path)
    monkeypatch.undo()
    assert numpy_loads == [False, False]
    assert (loaded.size, loaded.dim, loaded.config) == (backend.size, backend.dim, backend.config)
    mask = np.random.default_rng(11).random(backend.size) < 0.3
    for filters in (None, mask):
        before, after = backend.search(queries, 10, filters), loaded.search(queries, 10, filters)
        np.testing.assert_array_equal(before.ids, after.ids)
        # ScaNN's float32 kernels may sum in another order on the reloaded buffers (last ulp).
        np.testing.assert_allclose(before.scores, after.scores, rtol=1e-6)
    loaded.upsert(np.array([4001]), 10.0 * queries[:1])
    assert loaded.search(10.0 * queries[:1], 1).ids[0, 0] == 4001
    loaded.save(tmp_path / "again")
    reloaded = ScannBackend.load(tmp_path / "again")
    np.testing.assert_array_equal(reloaded.search(queries, 10).ids, loaded.search(queries, 10).ids)


def test_load_reports_missing_and_corrupt_files(tmp_path, sparse_brute_force):
    backend = sparse_brute_force[0]

    def saved(name: str) -> Path:
        directory = tmp_path / name
        backend.save(directory)
        return directory
    with pytest.raises(FileNotFoundError, match="scann_manifest.json"):
        ScannBackend.load(tmp_path / "nothing")
    directory = saved("missing_ids")
    (directory / "scann_row_ids.npy").unlink()
    with pytest.raises(FileNotFoundError, match="scann_row_ids.npy"):
        ScannBackend.load(directory)
    directory = saved("corrupt_vectors")
    (directory / "scann_vectors.npy").write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="scann_vectors.npy"):
        ScannBackend.load(directory)
    directory = saved("wrong_shape")
    np.save(directory / "scann_vectors.npy", np.zeros((5, DIM), np.float16))
    with pytest.raises(ValueError, match="scann_vectors.npy.*expected"):
        ScannBackend.load(directory)
    directory = saved("pickled_ids")
    np.save(directory / "scann_row_ids.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="scann_row_ids.npy"):
        ScannBackend.load(directory)
    directory = saved("missing_asset")
    (directory / "scann" / "dataset.npy").unlink()
    with pytest.raises(FileNotFoundError, match="dataset.npy"):
        ScannBackend.load(directory)
    directory = saved("truncated_asset")
    dataset = directory / "scann" / "dataset.npy"
    dataset.write_bytes(dataset.read_bytes()[:1000])
    with pytest.raises(ValueError, match="scann"):
        ScannBackend.load(directory)
    directory = saved("bad_manifest")
    manifest = json.loads((directory / "scann_manifest.json").read_text())
    manifest["num_rows"] += 1
    (directory / "scann_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="scann_row_ids.npy"):
        ScannBackend.load(directory)


def test_bad_inputs_raise_clear_errors(sparse_brute_force, queries):
    backend = sparse_brute_force[0]
    with pytest.raises(ValueError, match="dimension"):
        backend.search(queries[:, :8], 5)
    with pytest.raises(ValueError, match="filter mask"):
        backend.search(queries, 5, np.ones(7, bool))
    with pytest.raises(ValueError, match="duplicates"):
        ScannBackend.build(clustered(10, seed=12), np.array([1] * 10))
    with pytest.raises(ValueError, match="upsert embeddings"):
        backend.upsert(np.array([1, 2]), np.zeros((2, DIM + 1), np.float32))

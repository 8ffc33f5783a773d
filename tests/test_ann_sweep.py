"""The ANN sweep's pieces: the Pareto front, the 0.95 bar, ScaNN auto-tune (fastest setting
that reaches the target on tune queries, honest when none does), and one style's sweep on a
small clustered set (exact search scores recall 1, approximate settings trade recall)."""
from __future__ import annotations

import pytest

from atlas_jax.index import scann_backend, scann_tuning
from bench import ann_sweep, index_benchmark as ib


def _row(family, recall, qps):
    return {"family": family, "recall_at_10": recall, "qps": qps, "method": family}


def test_pareto_keeps_only_undominated_points_and_the_bar_compares_at_095():
    rows = [_row("scann", 0.90, 900), _row("scann", 0.96, 500), _row("scann", 0.95, 400),
            _row("scann", 0.99, 100), _row("faiss_hnsw", 0.97, 450),
            _row("faiss_hnsw", 0.94, 800)]
    front = ann_sweep.pareto(rows)
    assert [(r["recall_at_10"], r["qps"]) for r in front] == [
        (0.90, 900), (0.94, 800), (0.96, 500), (0.97, 450), (0.99, 100)]
    bar = ann_sweep.bar(rows)
    assert bar["project_best"]["qps"] == 500 and bar["faiss_hnsw_best"]["qps"] == 450
    assert bar["ratio"] == pytest.approx(500 / 450)
    assert ann_sweep.bar([_row("scann", 0.5, 10)])["ratio"] is None


@pytest.fixture(scope="module")
def clustered():
    database, queries = ib.synthetic_clustered(6000, 24, 200, seed=1)
    return database, queries, ib.numpy_exact(database, queries, ib.K)


def test_autotune_picks_the_fastest_setting_that_reaches_the_target(clustered):
    database, queries, exact = clustered
    backend = scann_backend.ScannBackend.build(
        database, config=scann_backend.ScannConfig(mode="tree_ah", num_leaves=64))
    grid = scann_tuning.search_grid(backend)
    assert len(grid) > 8 and all("num_leaves_to_search" in g for g in grid)
    tuned = scann_tuning.tune(backend, queries, exact, target_recall=0.9, k=ib.K)
    assert tuned["met"] and tuned["recall"] >= 0.9
    reaching = [t for t in tuned["tried"] if t["recall"] >= 0.905]
    assert tuned["qps"] == max(t["qps"] for t in reaching)
    assert min(t["recall"] for t in tuned["tried"]) < 0.9   # the grid spans the target
    unreachable = scann_tuning.tune(backend, queries, exact, target_recall=1.0, k=ib.K,
                                    grid=[{"num_leaves_to_search": 1, "reorder_k": 10}])
    assert not unreachable["met"] and unreachable["recall"] < 1.0
    with pytest.raises(ValueError, match="target_recall"):
        scann_tuning.tune(backend, queries, exact, target_recall=1.5)
    assert scann_tuning.recall_at_k(exact, exact) == 1.0
    assert scann_tuning.recall_at_k(exact[:, ::-1], exact) == 1.0
    assert scann_tuning.recall_at_k(exact + 10 ** 6, exact) == 0.0


def test_one_style_sweeps_device_and_scann_settings(clustered):
    database, queries, exact = clustered
    run = ann_sweep.Runner("definition", database, queries, exact)
    ann_sweep.device_methods(run, database)
    ann_sweep.scann_methods(run, database, {}, queries[:100], exact[:100])
    by_method = {}
    for row in run.rows:
        by_method.setdefault(row["method"], []).append(row)
        assert 0.0 <= row["recall_at_10"] <= 1.0 and row["qps"] > 0
    assert by_method["device_exact_float32"][0]["recall_at_10"] == 1.0
    assert {"scann_tree_ah", "scann_ah", "scann_autotune_0.95"} <= set(by_method)
    tree = [r["recall_at_10"] for r in by_method["scann_tree_ah"]]
    assert max(tree) > min(tree)                         # the sweep trades recall

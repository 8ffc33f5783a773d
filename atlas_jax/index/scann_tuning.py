"""ScaNN auto-tune: the fastest search settings that reach a target recall on held-out queries.

    tuned = scann_tuning.tune(backend, tune_queries, exact_ids, target_recall=0.95)
    backend.search(queries, 10, **tuned["setting"])

`exact_ids` are the exact top-k of `tune_queries` (e.g. `numpy` or the device index's exact
search). Every setting of `search_grid` is timed on the tune queries (one batch, after a
warm-up) and scored by recall@k against them; the pick is the highest queries/s among the
settings at or above the target plus a small margin (or, if none reaches it, the highest
recall, with `met: False`). Tune on queries that are not the ones you report: recall on the
tune set is optimistic by the selection itself.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np


def search_grid(backend: Any) -> list[dict]:
    """Search-time settings to try: for tree_ah, leaves searched from 1/64 to 1/2 of the
    leaves (9 steps) x candidates rescored (reorder_k) 40..1000; for ah, reorder_k alone;
    brute force has none."""
    config = backend.config
    reorders = [40, 100, 250, 1000]
    if config.mode == "tree_ah":
        # Doubling steps up to 1/8, then steps of 1/16: recall climbs steeply there, and a
        # doubling step overshoots a 0.95 target by half the throughput.
        leaves = sorted({max(1, round(config.num_leaves * f)) for f in (
            1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2)})
        return [{"num_leaves_to_search": n, "reorder_k": r} for n in leaves for r in reorders]
    if config.mode == "ah":
        return [{"reorder_k": r} for r in reorders + [4000]]
    return [{}]


def recall_at_k(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of each query's exact top-k ids found among its returned ids."""
    k = exact_ids.shape[1]
    hits = [len(set(row[:k].tolist()) & set(exact.tolist())) for row, exact in
            zip(np.asarray(ids), np.asarray(exact_ids))]
    return float(np.mean(hits) / k)


def measure(backend: Any, queries: np.ndarray, exact_ids: np.ndarray, setting: dict,
            k: int) -> dict:
    """recall@k and queries/s of one setting (a warm-up call first)."""
    backend.search(queries[:8], k, **setting)
    start = time.perf_counter()
    ids = backend.search(queries, k, **setting).ids
    seconds = time.perf_counter() - start
    return {"setting": setting, "recall": recall_at_k(ids, exact_ids),
            "qps": len(queries) / max(seconds, 1e-9)}


def tune(backend: Any, queries: np.ndarray, exact_ids: np.ndarray, target_recall: float = 0.95,
         k: int = 10, grid: list[dict] | None = None, margin: float = 0.005) -> dict:
    """{'setting', 'recall', 'qps', 'met', 'tried'}: the pick on the tune queries, among the
    settings at or above `target_recall + margin` (the best of many settings on the tune set
    overstates its recall on other queries; 0.005 is 2.5 queries in 500)."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    queries = np.asarray(queries, np.float32)
    exact_ids = np.asarray(exact_ids)[:, :k]
    if len(queries) != len(exact_ids):
        raise ValueError(f"{len(queries)} tune queries but {len(exact_ids)} rows of exact ids")
    tried = [measure(backend, queries, exact_ids, setting, k)
             for setting in (grid if grid is not None else search_grid(backend))]
    reaching = [t for t in tried if t["recall"] >= min(1.0, target_recall + margin)]
    best = (max(reaching, key=lambda t: t["qps"]) if reaching
            else max(tried, key=lambda t: (t["recall"], t["qps"])))
    return {**best, "met": bool(reaching), "target_recall": target_recall, "tried": tried}

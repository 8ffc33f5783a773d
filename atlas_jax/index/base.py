"""The one search interface every index backend implements.

Passages are addressed by dense integer ids (row numbers of the passage store, stable for
the life of an index: deleting a passage leaves a hole, it never renumbers the others).
Filters arrive already evaluated as a boolean mask over those ids, so a backend only has to
honour "best k among the allowed rows" -- never "k results post-filtered down to fewer".
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Protocol

import numpy as np


class SearchResult(NamedTuple):
    """`ids` (queries, k) int64 dense passage ids, best first, -1 where fewer than k passages
    are allowed; `scores` (queries, k) float32 inner products, -inf where ids is -1."""
    ids: np.ndarray
    scores: np.ndarray


class Backend(Protocol):
    """What `PassageIndex` needs from a backend (`device`, `scann`)."""
    name: str

    @property
    def size(self) -> int:
        """Number of id slots (max id + 1), deleted ones included."""

    @property
    def dim(self) -> int:
        ...

    def search(self, query_embeddings: np.ndarray, k: int,
               filters: np.ndarray | None = None) -> SearchResult:
        """Exact or approximate maximum inner product search.

        Args:
          query_embeddings: (queries, dim) float32.
          k: hits per query.
          filters: None, or a bool mask over ids, (size,) shared by all queries or
            (queries, size); True = the passage may be returned.
        """

    def bytes_per_vector(self) -> float:
        """Bytes of search-resident storage per passage (codes + scales, not ids)."""


def empty_result(num_queries: int, k: int) -> SearchResult:
    return SearchResult(np.full((num_queries, k), -1, np.int64),
                        np.full((num_queries, k), -np.inf, np.float32))


def check_queries(query_embeddings: np.ndarray, dim: int) -> np.ndarray:
    """(queries, dim) float32, or a ValueError that names the mismatch."""
    queries = np.asarray(query_embeddings, np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"query embeddings of shape {np.shape(query_embeddings)} do not match "
                         f"the index dimension {dim}")
    return queries


def check_filters(filters: np.ndarray | None, num_queries: int, size: int) -> np.ndarray | None:
    """None or a bool mask of shape (1 or queries, size)."""
    if filters is None:
        return None
    mask = np.asarray(filters, bool)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.ndim != 2 or mask.shape[1] != size or mask.shape[0] not in (1, num_queries):
        raise ValueError(f"filter mask of shape {np.shape(filters)} does not match "
                         f"{num_queries} queries over {size} passages")
    return mask


def exact_search(embeddings: np.ndarray, query_embeddings: np.ndarray, k: int,
                 filters: np.ndarray | None = None) -> SearchResult:
    """Reference numpy exact MIPS (float32 accumulation), honouring a filter mask. Ties break
    towards the lower id, as `jax.lax.top_k` does."""
    queries = check_queries(query_embeddings, embeddings.shape[1])
    mask = check_filters(filters, len(queries), len(embeddings))
    scores = queries @ np.asarray(embeddings, np.float32).T      # (queries, size)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    k_eff = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
    top_scores = np.take_along_axis(scores, top, axis=1)
    result = empty_result(len(queries), k)
    valid = np.isfinite(top_scores)
    result.ids[:, :k_eff] = np.where(valid, top, -1)
    result.scores[:, :k_eff] = np.where(valid, top_scores, -np.inf)
    return result


class HostBackend:
    """Exact numpy search on the host, updated like `DeviceBackend` (`add` replaces the table,
    `delete` writes the alive mask in place), with the cheap `copy()` that HotSwapIndex forks
    use. A reference backend for tests and benchmarks (no device, no recompiles)."""
    name, config, mesh = "host", None, None

    def __init__(self, rows):
        self.rows, self.alive = np.asarray(rows, np.float32), np.ones(len(rows), bool)

    @property
    def size(self) -> int:
        return len(self.rows)

    def search(self, queries, k, filters=None) -> SearchResult:
        mask = self.alive[None] if filters is None else (
            check_filters(filters, len(queries), self.size) & self.alive)
        return exact_search(self.rows, queries, k, mask)

    def add(self, rows) -> None:
        self.rows = np.concatenate([self.rows, np.asarray(rows, np.float32)])
        self.alive = np.concatenate([self.alive, np.ones(len(rows), bool)])

    def delete(self, ids) -> None:
        self.alive[ids] = False

    def copy(self) -> "HostBackend":
        fork = copy.copy(self)
        fork.alive = self.alive.copy()
        return fork

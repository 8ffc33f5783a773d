"""ScaNN backend: approximate maximum inner product search (plain dot product) on the host.

Build parameters follow ScaNN's rules of thumb (scann/docs/algorithms.md): see `auto_config`.
Ids: ScaNN names datapoints by string docids (`str(id)`) and addresses them by row number,
which a delete renumbers (the last row fills the hole); an int64 mirror of that row order
translates results back to ids without touching strings.
Filters: a float16 copy of the live embeddings (by id) answers queries with few allowed rows
exactly; otherwise ScaNN over-retrieves, disallowed hits are dropped, and the over-retrieval
doubles until k survive (then the exact fallback).
On disk, no pickle: `scann/` holds ScaNN's native artifacts (protobufs and .npy, relative
paths; the Python wrapper's `scann_docids.pkl` is never written nor read) next to
`scann_row_ids.npy`, `scann_vectors.npy` (float16) and `scann_manifest.json`; written and read
by `scann_storage`.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import gin
import numpy as np

from atlas_jax.index import base, scann_storage

MODES = ("auto", "brute_force", "ah", "tree_ah")
BRUTE_FORCE_BELOW = 20_000          # ScaNN: brute force for fewer than 20k points
AH_BELOW = 100_000                  # ScaNN: AH + reorder below 100k, tree + AH + reorder above
_MAX_ID = 2**31 - 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ScannConfig:
    """ScaNN build and search options; None / 'auto' are filled in by `auto_config`.

    mode: 'auto' | 'brute_force' | 'ah' | 'tree_ah'.
    num_leaves, num_leaves_to_search: k-means tree size and leaves scored per query (tree_ah).
    reorder_k: least number of AH candidates rescored exactly (the search rescores
      max(reorder_k, 4 * requested)).
    training_sample_size: points sampled to train the tree and the AH codebooks.
    dims_per_block, anisotropic_quantization_threshold: AH code layout and loss.
    quantize_reorder: int8 instead of float32 for the reorder data (and for brute force).
    exact_filter_max_rows, exact_filter_min_fraction: a filtered query whose allowed live rows
      are <= the first or < this fraction of the live rows is answered exactly.
    overretrieve_safety: extra factor on k * live / allowed when over-retrieving.
    max_overretrieve: past this many candidates, fall back to exact search.
    training_threads: ScaNN training threads (0 = ScaNN's default).
    """
    mode: str = "auto"
    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    reorder_k: int | None = None
    training_sample_size: int | None = None
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    quantize_reorder: bool = False
    exact_filter_max_rows: int = 20_000
    exact_filter_min_fraction: float = 0.02
    overretrieve_safety: float = 2.0
    max_overretrieve: int = 100_000
    training_threads: int = 0


def auto_config(num_vectors: int, dim: int, config: ScannConfig | None = None) -> ScannConfig:
    """Resolves 'auto' / None fields of `config` for a corpus of `num_vectors` x `dim`.

    Returns a ScannConfig with a concrete mode and, where the mode uses them, concrete
    num_leaves (round(sqrt(N))), num_leaves_to_search (a quarter of the leaves, at least 8:
    10% gave recall@10 0.89 on MiniLM WordNet embeddings, 25% about 0.96; see index bench),
    reorder_k (1024 for ah, 256 for tree_ah) and training_sample_size
    (min(N, max(100k, 50 * leaves))). Fields set explicitly in `config` are kept.
    """
    del dim  # the rules of thumb depend on the corpus size only
    config = config or ScannConfig()
    if config.mode not in MODES:
        raise ValueError(f"ScannConfig.mode must be one of {MODES}, got {config.mode!r}")
    mode = config.mode
    if mode == "auto":
        mode = ("brute_force" if num_vectors < BRUTE_FORCE_BELOW
                else "ah" if num_vectors < AH_BELOW else "tree_ah")
    fields: dict = {"mode": mode}
    if mode == "tree_ah":
        leaves = config.num_leaves or max(1, round(math.sqrt(num_vectors)))
        fields["num_leaves"] = leaves
        fields["num_leaves_to_search"] = min(
            leaves, config.num_leaves_to_search or max(8, math.ceil(0.25 * leaves)))
    if mode != "brute_force":
        # AH alone ranks the whole corpus with coarse codes (no residuals to a leaf centre):
        # rescoring more candidates is what keeps its recall up.
        fields["reorder_k"] = config.reorder_k or (1024 if mode == "ah" else 256)
        fields["training_sample_size"] = config.training_sample_size or min(
            num_vectors, max(100_000, 50 * fields.get("num_leaves", 0)))
    return dataclasses.replace(config, **fields)


def search_settings(backend: ScannBackend) -> list[dict]:
    """Search-time settings worth comparing in a benchmark, as `search` keyword arguments:
    half, the default, twice and four times the leaves searched (tree_ah), a quarter, the
    default and four times the reordered candidates (ah), nothing to vary (brute_force)."""
    config = backend.config
    if config.mode == "tree_ah":
        leaves = {max(1, config.num_leaves_to_search // 2), config.num_leaves_to_search,
                  min(config.num_leaves, 2 * config.num_leaves_to_search),
                  min(config.num_leaves, 4 * config.num_leaves_to_search)}
        return [{"num_leaves_to_search": value} for value in sorted(leaves)]
    if config.mode == "ah":
        return [{"reorder_k": value} for value in (config.reorder_k // 4, config.reorder_k,
                                                    4 * config.reorder_k)]
    return [{}]


def _scann_ops():
    """ScaNN's pybind wrapper module, imported on first use (importing `scann` loads
    TensorFlow when it is installed, a few seconds)."""
    from scann.scann_ops.py import scann_ops_pybind
    return scann_ops_pybind


def _builder_for(embeddings: np.ndarray, config: ScannConfig):
    """A scann_ops_pybind builder for `embeddings` (N, D) following a resolved `config`."""
    ops = _scann_ops()
    reorder_type = ops.scann_builder.ReorderType
    quantize = reorder_type.INT8 if config.quantize_reorder else reorder_type.FLOAT32
    builder = ops.builder(embeddings, 10, "dot_product")
    if config.mode == "brute_force":
        return builder.score_brute_force(quantize=quantize)
    if config.mode == "tree_ah":
        builder = builder.tree(num_leaves=config.num_leaves,
                               num_leaves_to_search=config.num_leaves_to_search,
                               training_sample_size=config.training_sample_size)
    builder = builder.score_ah(
        config.dims_per_block,
        anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
        training_sample_size=config.training_sample_size)
    return builder.reorder(config.reorder_k, quantize=quantize)


def _check_ids(ids: np.ndarray, what: str) -> np.ndarray:
    """(n,) int64 unique ids in [0, 2^31), or a ValueError naming `what`."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{what} ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > _MAX_ID):
        raise ValueError(f"{what} ids must lie in [0, {_MAX_ID}]")
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{what} ids contain duplicates")
    return ids


def _check_vectors(embeddings: np.ndarray, count: int, dim: int | None, what: str) -> np.ndarray:
    """(count, dim) finite float32, or a ValueError naming `what`."""
    vectors = np.ascontiguousarray(embeddings, np.float32)
    if vectors.ndim != 2 or len(vectors) != count or (dim is not None and vectors.shape[1] != dim):
        raise ValueError(f"{what} embeddings of shape {np.shape(embeddings)} do not match "
                         f"{count} ids of dimension {dim}")
    if vectors.size and not np.abs(vectors).max() <= np.finfo(np.float16).max:
        raise ValueError(f"{what} embeddings contain NaN, inf or values beyond float16 range")
    return vectors


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> base.SearchResult:
    """Best k of `scores` (queries, c) over candidate `ids` (c,) ascending; ties towards the
    lower id; -1/-inf padding to k columns."""
    result = base.empty_result(len(scores), k)
    take = min(k, scores.shape[1])
    if take == 0:
        return result
    if take < scores.shape[1]:
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]      # (queries, take)
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)                      # score desc, id asc
    top = np.take_along_axis(part, order, axis=1)
    result.ids[:, :take] = ids[top]
    result.scores[:, :take] = np.take_along_axis(part_scores, order, axis=1)
    return result


class ScannBackend:
    """ScaNN index over int64 passage ids; implements `base.Backend`. Create it with `build`
    or `load`; `upsert` / `delete` change it in place without a rebuild."""
    name = "scann"

    def __init__(self, searcher, row_ids: np.ndarray, vectors: np.ndarray, num_slots: int,
                 config: ScannConfig):
        """Internal: use `build` or `load`. `searcher` is a scann_ops_pybind.ScannSearcher
        whose docids are str(row_ids); `row_ids` (rows,) int64 maps ScaNN rows to ids;
        `vectors` (>= num_slots, D) float16 holds live embeddings by id (zeros elsewhere)."""
        self._searcher = searcher
        self._row_ids = row_ids                                 # (rows,) ScaNN row -> id
        self._vectors = vectors                                 # (capacity, D) by id
        self._num_slots = num_slots
        self._row_of_id = np.full(len(vectors), -1, np.int64)   # (capacity,) id -> row or -1
        self._row_of_id[row_ids] = np.arange(len(row_ids))
        self.config = config

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: np.ndarray | None = None,
              config: ScannConfig | None = None) -> ScannBackend:
        """Trains and fills a ScaNN searcher.

        Args:
          embeddings: (N, D) float32 passage embeddings, N >= 1.
          ids: (N,) unique non-negative int64 passage ids (default: 0..N-1).
          config: build options; 'auto' / None fields come from `auto_config(N, D)`.
        Returns:
          the backend.
        """
        ids = np.arange(len(embeddings)) if ids is None else ids
        ids = _check_ids(ids, "build")
        vectors = _check_vectors(embeddings, len(ids), None, "build")
        if len(ids) == 0:
            raise ValueError("cannot build a ScaNN index over zero passages")
        config = auto_config(len(ids), vectors.shape[1], config)
        builder = _builder_for(vectors, config).set_n_training_threads(config.training_threads)
        searcher = builder.build(docids=[str(i) for i in ids])
        num_slots = int(ids.max()) + 1
        copy = np.zeros((num_slots, vectors.shape[1]), np.float16)
        copy[ids] = vectors
        return cls(searcher, ids, copy, num_slots, config)

    @property
    def size(self) -> int:
        """Number of id slots (max id + 1 ever held), deleted ones included."""
        return self._num_slots

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    @property
    def num_live(self) -> int:
        """Passages currently searchable."""
        return len(self._row_ids)

    def live_mask(self) -> np.ndarray:
        """(size,) bool, True where the id holds a passage."""
        return self._row_of_id[:self._num_slots] >= 0

    def bytes_per_vector(self) -> float:
        """Bytes per passage that ScaNN keeps in memory to score it, for this mode:

        brute_force: the dataset, 4 * D (float32) or D (int8 with `quantize_reorder`);
        ah / tree_ah: AH codes, ceil(D / dims_per_block) blocks of 4 bits (LUT16; ScaNN packs
          two per byte in memory, its hashed_dataset.npy on disk uses a byte per block), plus
          the reorder data, 4 * D or D.
        Not counted: per-dimension int8 multipliers, AH codebooks and tree centroids (shared,
        independent of N); ids and the id <-> docid maps; the tree's datapoint -> leaf
        assignment (4 bytes, tree_ah); this backend's float16 copy for filtered exact search
        (2 * D). For dot product ScaNN stores no per-row int8 norm (dp_norms.npy is empty).
        """
        dense = self.dim if self.config.quantize_reorder else 4 * self.dim
        if self.config.mode == "brute_force":
            return float(dense)
        return math.ceil(self.dim / self.config.dims_per_block) * 4 / 8 + dense

    # ---------------------------------------------------------------- search

    def search(self, query_embeddings: np.ndarray, k: int, filters: np.ndarray | None = None,
               num_leaves_to_search: int | None = None,
               reorder_k: int | None = None) -> base.SearchResult:
        """Best k live passages per query by dot product, honouring `filters`.

        Args:
          query_embeddings: (queries, dim) float32.
          k: hits per query, >= 1.
          filters: None, or bool (size,) / (queries, size); True = may be returned.
          num_leaves_to_search, reorder_k: override the config for this call (see
            `search_settings`).
        Returns:
          SearchResult with (queries, k) ids and scores; -1 / -inf only where fewer than k
          live passages are allowed.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        overrides = {name: value for name, value in (("num_leaves_to_search", num_leaves_to_search),
                                                     ("reorder_k", reorder_k)) if value}
        config = dataclasses.replace(self.config, **overrides) if overrides else self.config
        queries = base.check_queries(query_embeddings, self.dim)
        mask = base.check_filters(filters, len(queries), self.size)
        result = base.empty_result(len(queries), k)
        if self.num_live == 0 or len(queries) == 0:
            return result
        if mask is not None:
            mask = mask & self.live_mask()                                # (1 or queries, size)
            allowed = mask.sum(axis=1)                                    # (1 or queries,)
            allowed = np.broadcast_to(allowed, (len(queries),))
        else:
            allowed = np.full(len(queries), self.num_live)
        exact = ((allowed <= config.exact_filter_max_rows)
                 | (allowed < config.exact_filter_min_fraction * self.num_live))
        if mask is None:
            exact[:] = self.num_live <= k
        self._search_exact(queries, np.flatnonzero(exact & (allowed > 0)), k, mask, result)
        self._search_approx(queries, np.flatnonzero(~exact & (allowed > 0)), k, mask,
                            allowed, config, result)
        return result

    def _search_exact(self, queries: np.ndarray, rows: np.ndarray, k: int,
                      mask: np.ndarray | None, result: base.SearchResult) -> None:
        """Exact search of queries[rows] over the allowed live ids (float16 copy, float32
        accumulation); writes into `result`."""
        if len(rows) == 0:
            return
        shared = mask is None or len(mask) == 1
        groups = [rows] if shared else [rows[i:i + 1] for i in range(len(rows))]
        for group in groups:
            allowed = self.live_mask() if mask is None else mask[0 if shared else group[0]]
            candidate_ids = np.flatnonzero(allowed)                       # (c,) ascending
            scores = queries[group] @ self._vectors[candidate_ids].astype(np.float32).T
            top = _top_k(scores, candidate_ids, k)                        # (group, k)
            result.ids[group], result.scores[group] = top.ids, top.scores

    def _search_approx(self, queries: np.ndarray, rows: np.ndarray, k: int,
                       mask: np.ndarray | None, allowed: np.ndarray, config: ScannConfig,
                       result: base.SearchResult) -> None:
        """ScaNN search of queries[rows], over-retrieving k * live / allowed * safety,
        doubling (candidates and leaves) until min(k, allowed) allowed hits survive; queries
        still short past `max_overretrieve` go to `_search_exact`."""
        live = self.num_live
        wanted = np.minimum(k, allowed)                                   # (queries,)
        want_candidates = np.ceil(k * live / np.maximum(allowed, 1)
                                  * (1.0 if mask is None else config.overretrieve_safety))
        candidates = int(min(live, max(k, want_candidates[rows].max(initial=k))))
        leaves = config.num_leaves_to_search if config.mode == "tree_ah" else -1
        pending = rows
        while len(pending) and candidates <= config.max_overretrieve:
            hit_ids, hit_scores = self._scann_search(queries[pending], candidates, leaves,
                                                     config.reorder_k)
            ok = hit_ids >= 0                                             # (pending, c)
            if mask is not None:
                mask_rows = np.zeros(len(pending), np.int64) if len(mask) == 1 else pending
                ok &= mask[mask_rows[:, None], np.maximum(hit_ids, 0)]
            first_ok = np.argsort(~ok, axis=1, kind="stable")[:, :k]      # allowed hits first
            ok_top = np.take_along_axis(ok, first_ok, axis=1)
            done = ok.sum(axis=1) >= wanted[pending]
            take = min(k, first_ok.shape[1])
            done_rows = pending[done]
            result.ids[done_rows, :take] = np.where(
                ok_top, np.take_along_axis(hit_ids, first_ok, axis=1), -1)[done]
            result.scores[done_rows, :take] = np.where(
                ok_top, np.take_along_axis(hit_scores, first_ok, axis=1), -np.inf)[done]
            pending = pending[~done]
            if candidates >= live and (leaves < 0 or leaves >= config.num_leaves):
                break
            candidates = min(live, 2 * candidates)
            leaves = leaves if leaves < 0 else min(2 * leaves, config.num_leaves)
        self._search_exact(queries, pending, k, mask, result)

    def _scann_search(self, queries: np.ndarray, candidates: int, leaves: int,
                      reorder_k: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Raw ScaNN batch search (leaves -1: the default; AH rescores max(reorder_k,
        4 * candidates)): (queries, candidates) int64 ids (-1 for no hit) and float32 dot
        products, best first."""
        reorder = -1 if reorder_k is None else max(reorder_k, 4 * candidates)
        rows, scores = self._searcher.searcher.search_batched(
            queries, candidates, reorder, leaves, len(queries) >= 256, 256)
        scores = np.asarray(scores, np.float32)
        found = ~np.isnan(scores)                                          # NaN = no hit
        ids = np.where(found, self._row_ids[np.where(found, rows, 0).astype(np.int64)], -1)
        return ids, np.where(found, scores, -np.inf).astype(np.float32)

    # ---------------------------------------------------------------- updates

    def upsert(self, ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Inserts new ids and replaces the vectors of existing ones, in place (ScaNN's own
        upsert: new points join the trained tree/codebooks, nothing is retrained).

        Args:
          ids: (n,) unique non-negative int64 ids.
          embeddings: (n, dim) float32.
        """
        ids = _check_ids(ids, "upsert")
        vectors = _check_vectors(embeddings, len(ids), self.dim, "upsert")
        if len(ids) == 0:
            return
        self._grow(int(ids.max()) + 1)
        new_ids = ids[self._row_of_id[ids] < 0]                            # in upsert order
        self._searcher.upsert([str(i) for i in ids], vectors)
        self._row_of_id[new_ids] = len(self._row_ids) + np.arange(len(new_ids))
        self._row_ids = np.concatenate([self._row_ids, new_ids])
        self._vectors[ids] = vectors
        self._num_slots = max(self._num_slots, int(ids.max()) + 1)

    def delete(self, ids: np.ndarray) -> None:
        """Removes live ids (their slots stay; they are never returned again).

        Raises:
          KeyError: naming ids that are not live (nothing is deleted then).
        """
        ids = _check_ids(ids, "delete")
        missing = ids[(ids >= self._num_slots)
                      | (self._row_of_id[np.minimum(ids, self._num_slots - 1)] < 0)]
        if len(missing):
            raise KeyError(f"cannot delete ids that are not in the index: {missing[:8].tolist()}")
        self._searcher.delete([str(i) for i in ids])
        for passage_id in ids:                   # mirror ScaNN: the last row fills the hole
            row, last = self._row_of_id[passage_id], len(self._row_ids) - 1
            moved = self._row_ids[last]
            self._row_ids[row], self._row_of_id[moved] = moved, row
            self._row_of_id[passage_id] = -1
            self._row_ids = self._row_ids[:last]
        self._vectors[ids] = 0

    def _grow(self, slots: int) -> None:
        """Makes room for ids < slots (capacity grows geometrically)."""
        if slots <= len(self._vectors):
            return
        capacity = max(slots, 2 * len(self._vectors))
        vectors = np.zeros((capacity, self.dim), np.float16)
        vectors[:len(self._vectors)] = self._vectors
        row_of_id = np.full(capacity, -1, np.int64)
        row_of_id[:len(self._row_of_id)] = self._row_of_id
        self._vectors, self._row_of_id = vectors, row_of_id

    # ---------------------------------------------------------------- save / load

    def save(self, directory: str | Path) -> None:
        """Writes the index into `directory` (created; an existing `scann/` inside it is
        replaced). No file is a pickle; see `scann_storage` for the layout."""
        scann_storage.save(directory, self._searcher.searcher, self._row_ids, self._vectors,
                           self._num_slots, self.config)

    @classmethod
    def load(cls, directory: str | Path) -> ScannBackend:
        """Reads an index written by `save` without unpickling anything.

        Raises:
          FileNotFoundError: a file of the layout is missing (named).
          ValueError: a file is unreadable or inconsistent with the manifest (named).
        """
        return cls(*scann_storage.load(directory, ScannConfig, _scann_ops))

"""Exact (or `approx_max_k`) maximum inner product search sharded over every device of a mesh.

The passage embeddings are split by rows over all mesh devices (both mesh axes flattened).
One search is a `shard_map`: each device scores the replicated queries against its rows
(float32 accumulation), takes its local top-k, the (devices * k) candidates are all-gathered
and merged by an exact top-k. The merge is exact, so with `approx_recall=None` the result is
exactly the global top-k (ties towards the lower id, as numpy's stable sort).

Storage (`storage=`):
  float32 / bfloat16  the embeddings as they are (bfloat16: half the bytes, scores still
                      accumulated in float32);
  int8 / int4         per-dimension symmetric scalar quantisation, codes on device, the
                      per-dimension scale folded into the query (no per-row storage): 1/2 and
                      1/4 of float16's bytes. int4 packs two codes per byte.
With `rerank_candidates=R` the device returns the top max(R, k) by the stored codes and the
host rescores them exactly against full-precision rows (`rerank_rows`, e.g. the index's
memory-mapped float16 shards on disk), so compressed storage keeps exact-search recall while
device memory holds only the codes.
"""
from __future__ import annotations

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from atlas_jax import distributed, partitioning
from atlas_jax.index import base

STORAGES = ("float32", "bfloat16", "int8", "int4")
_ROWS = PartitionSpec(("data", "model"), None)          # rows over every device
_MASK = PartitionSpec(None, ("data", "model"))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DeviceIndexConfig:
    """`storage`: one of STORAGES; `approx_recall`: None for exact per-shard top-k, else the
    recall target of `jax.lax.approx_max_k` (the TPU-KNN kernel); `rerank_candidates`: 0 for
    none, else how many candidates to rescore exactly on the host."""
    storage: str = "float32"
    approx_recall: float | None = None
    rerank_candidates: int = 0


def quantize(embeddings: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension symmetric quantisation: returns (codes (N, D) int8 in
    [-(2^(bits-1)-1), 2^(bits-1)-1], scale (D,) float32) with embeddings ~= codes * scale."""
    levels = 2 ** (bits - 1) - 1
    embeddings = np.asarray(embeddings, np.float32)
    scale = np.abs(embeddings).max(axis=0) / levels if len(embeddings) else np.ones(
        embeddings.shape[1], np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(embeddings / scale), -levels, levels).astype(np.int8)
    return codes, scale


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """(N, D) int8 codes in [-7, 7], D even -> (N, D/2) uint8, even dims in the low nibble."""
    biased = (codes.astype(np.int16) + 8).astype(np.uint8)
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


class DeviceBackend:
    """Sharded exact MIPS; see the module docstring. Ids are row numbers."""
    name = "device"

    def __init__(self, embeddings: np.ndarray, mesh: jax.sharding.Mesh | None = None,
                 config: DeviceIndexConfig | None = None,
                 rerank_rows: np.ndarray | None = None):
        """Args:
          embeddings: (N, D) float array; row i is passage id i.
          mesh: the device mesh (default: every device, `create_mesh((-1, 1))`).
          config: storage / approximate search / rerank options.
          rerank_rows: (N, D) full-precision rows for `rerank_candidates` (default: a float16
            host copy of `embeddings`).
        """
        self.config = config or DeviceIndexConfig()
        if self.config.storage not in STORAGES:
            raise ValueError(f"device index storage {self.config.storage!r} is not one of "
                             f"{STORAGES}")
        self.mesh = mesh if mesh is not None else partitioning.create_mesh((-1, 1))
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (passages, dim), got {embeddings.shape}")
        if self.config.storage == "int4" and embeddings.shape[1] % 2:
            raise ValueError(f"int4 storage needs an even dimension, got {embeddings.shape[1]}")
        self._num_rows, self._dim = embeddings.shape
        self._alive = np.ones(self._num_rows, bool)
        if self.config.rerank_candidates:
            self.rerank_rows = (rerank_rows if rerank_rows is not None
                                else embeddings.astype(np.float16))
        else:
            self.rerank_rows = None
        self._place(embeddings)

    # ------------------------------------------------------------------ placement
    @property
    def num_shards(self) -> int:
        return self.mesh.devices.size

    @property
    def size(self) -> int:
        return self._num_rows

    @property
    def dim(self) -> int:
        return self._dim

    def _padded_rows(self) -> int:
        per_shard = max(1, -(-self._num_rows // self.num_shards))
        return per_shard * self.num_shards

    def _place(self, embeddings: np.ndarray) -> None:
        storage = self.config.storage
        padded = np.zeros((self._padded_rows(), self._dim), np.float32)
        padded[:self._num_rows] = embeddings
        self.query_scale = np.ones(self._dim, np.float32)
        if storage == "float32":
            stored = padded
        elif storage == "bfloat16":
            stored = padded.astype(jnp.bfloat16)
        else:
            codes, self.query_scale = quantize(padded[:self._num_rows], 8 if storage == "int8"
                                               else 4)
            stored = np.zeros((len(padded), self._dim), np.int8)
            stored[:self._num_rows] = codes
            if storage == "int4":
                stored = pack_int4(stored)
        self._stored = jax.device_put(stored, NamedSharding(self.mesh, _ROWS))
        self._device_alive = self._put_mask(self._alive[None])

    def _put_mask(self, mask: np.ndarray) -> jax.Array:
        padded = np.zeros((mask.shape[0], self._padded_rows()), bool)
        padded[:, :self._num_rows] = mask
        return jax.device_put(padded, NamedSharding(self.mesh, _MASK))

    def bytes_per_vector(self) -> float:
        return {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}[
            self.config.storage] * self._dim

    # ------------------------------------------------------------------ updates
    def add(self, embeddings: np.ndarray) -> np.ndarray:
        """Appends rows; returns their ids. Re-places the (re-quantised) table on the mesh."""
        embeddings = np.asarray(embeddings, np.float32)
        new_ids = np.arange(self._num_rows, self._num_rows + len(embeddings))
        full = np.concatenate([self.host_embeddings(), embeddings])
        if self.rerank_rows is not None:
            self.rerank_rows = np.concatenate([self.rerank_rows,
                                               embeddings.astype(self.rerank_rows.dtype)])
        alive = np.concatenate([self._alive, np.ones(len(embeddings), bool)])
        self._num_rows = len(full)
        self._alive = alive
        self._place(full)
        return new_ids

    def delete(self, ids: np.ndarray) -> None:
        """Marks ids as deleted: they are never returned again."""
        self._alive[np.asarray(ids, np.int64)] = False
        self._device_alive = self._put_mask(self._alive[None])

    def host_embeddings(self) -> np.ndarray:
        """(N, D) float32 rows as stored (dequantised for int8/int4)."""
        stored = distributed.host_array(self._stored)[:self._num_rows]
        if self.config.storage == "int4":
            codes = np.empty((len(stored), self._dim), np.int8)
            codes[:, 0::2] = (stored & 15).astype(np.int8) - 8
            codes[:, 1::2] = (stored >> 4).astype(np.int8) - 8
            stored = codes
        return stored.astype(np.float32) * self.query_scale

    # ------------------------------------------------------------------ search
    def search(self, query_embeddings: np.ndarray, k: int,
               filters: np.ndarray | None = None) -> base.SearchResult:
        queries = base.check_queries(query_embeddings, self._dim)
        mask = base.check_filters(filters, len(queries), self._num_rows)
        device_mask = (self._device_alive if mask is None
                       else self._put_mask(mask & self._alive[None]))
        candidates = max(k, self.config.rerank_candidates)
        candidates = min(candidates, self._padded_rows() // self.num_shards * self.num_shards)
        search_fn = _search_fn(self.mesh, self.config.storage, candidates,
                               min(candidates, self._padded_rows() // self.num_shards),
                               self.config.approx_recall)
        scores, ids = search_fn(self._stored, device_mask,
                                jnp.asarray(queries * self.query_scale))
        scores, ids = np.asarray(scores, np.float32), np.asarray(ids, np.int64)
        ids = np.where(np.isfinite(scores), ids, -1)
        if self.rerank_rows is not None:
            return _rerank(queries, ids, self.rerank_rows, k)
        result = base.empty_result(len(queries), k)
        width = min(k, ids.shape[1])
        result.ids[:, :width] = ids[:, :width]
        result.scores[:, :width] = np.where(ids[:, :width] >= 0, scores[:, :width], -np.inf)
        return result


def _rerank(queries: np.ndarray, candidate_ids: np.ndarray, rows: np.ndarray,
            k: int) -> base.SearchResult:
    """Exact rescoring of (queries, R) candidates against host rows; -1 candidates stay last."""
    safe = np.maximum(candidate_ids, 0)
    exact = np.einsum("qd,qrd->qr", queries, np.asarray(rows[safe.ravel()], np.float32)
                      .reshape(safe.shape + (queries.shape[1],)))
    exact = np.where(candidate_ids >= 0, exact, -np.inf)
    # Stable sort on (-score, id): same tie order as exact search.
    order = np.lexsort((candidate_ids, -exact), axis=1)[:, :k]
    result = base.empty_result(len(queries), k)
    width = order.shape[1]
    result.ids[:, :width] = np.take_along_axis(candidate_ids, order, axis=1)
    result.scores[:, :width] = np.take_along_axis(exact, order, axis=1)
    result.ids[~np.isfinite(result.scores)] = -1
    return result


@functools.lru_cache(maxsize=64)
def _search_fn(mesh, storage: str, k: int, local_k: int, approx_recall: float | None):
    """jit(shard_map) search for one (storage, k) pair; cached per mesh."""
    axes = ("data", "model")

    def local_scores(stored, queries):                    # -> (queries, local_rows) float32
        if storage == "int4":
            low = (stored & 15).astype(jnp.int8) - 8          # even dimensions
            high = (stored >> 4).astype(jnp.int8) - 8         # odd dimensions
            return (jnp.dot(queries[:, 0::2], low.astype(jnp.float32).T)
                    + jnp.dot(queries[:, 1::2], high.astype(jnp.float32).T))
        compute = jnp.bfloat16 if storage == "bfloat16" else jnp.float32
        return jnp.dot(queries.astype(compute), stored.astype(compute).T,
                       preferred_element_type=jnp.float32)

    def shard_search(stored, mask, queries):
        scores = jnp.where(mask, local_scores(stored, queries), -jnp.inf)
        if approx_recall is None:
            top_scores, top_local = jax.lax.top_k(scores, local_k)
        else:
            top_scores, top_local = jax.lax.approx_max_k(scores, local_k,
                                                         recall_target=approx_recall)
        offset = jax.lax.axis_index(axes) * stored.shape[0]
        top_ids = top_local.astype(jnp.int32) + offset
        # (shards, queries, local_k) -> (queries, shards * local_k), shard-major = id order.
        all_scores = jax.lax.all_gather(top_scores, axes, axis=1, tiled=True)
        all_ids = jax.lax.all_gather(top_ids, axes, axis=1, tiled=True)
        merged_scores, position = jax.lax.top_k(all_scores, k)
        return merged_scores, jnp.take_along_axis(all_ids, position, axis=1)

    mapped = jax.shard_map(shard_search, mesh=mesh,
                           in_specs=(_ROWS, _MASK, PartitionSpec()),
                           out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
    return jax.jit(mapped)

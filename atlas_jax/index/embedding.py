"""Corpus embedding for the passage index: the retriever's passage tower over every passage.

    token_ids, lengths = tokenize_for_retriever(retriever, texts)     # (N, L) int32, (N,) int32
    run = embed_corpus(retriever, token_ids, lengths)                  # run.embeddings (N, D)

Passages are sorted by length (longest first) and cut into batches; each batch is sliced to
its longest passage rounded up to a bucket length (`bucket_length`), so a corpus compiles into
a few (batch, bucket length) shapes and little time goes into padding. Each shape is compiled
once per process (ahead of time, cached across calls, so an index refresh recompiles nothing),
the batch is sharded over the mesh's 'data' axis, the parameters are placed by the partitioning
rules, and the next batch is dispatched before the previous one is read back. Output row i is
passage i.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from atlas_jax import distributed, partitioning, towers
from atlas_jax.index import passages
from atlas_jax.models import retriever as retriever_lib
from atlas_jax.weights import Retriever


@dataclasses.dataclass
class EmbeddingRun:
    """Result of `embed_corpus`."""
    embeddings: np.ndarray        # (N, D) in the requested dtype; row i is passage i
    seconds: float                # wall time of the whole call, compilation included
    passages_per_second: float    # N / seconds
    compile_seconds: float = 0.0  # part of `seconds` spent compiling new shapes (0 when cached)


def retriever_encoder(retriever: Retriever, max_length: int | None = None
                      ) -> tuple[Callable[[list[str]], list[list[int]]], int]:
    """(encode_batch, limit): a function texts -> token id lists with the retriever's tokenizer
    truncating at `limit` (default: the checkpoint's max length; [CLS] ... [SEP] kept), as
    `passages.TokenArray.build` takes it."""
    if retriever.tokenizer is None:
        raise ValueError("this retriever was built without a tokenizer")
    limit = retriever.config.max_length if max_length is None else int(max_length)
    if not 0 < limit <= retriever.config.max_position_embeddings:
        raise ValueError(f"max_length {limit} must be in [1, "
                         f"{retriever.config.max_position_embeddings}]")
    tokenizer = retriever.tokenizer

    def encode_batch(texts: list[str]) -> list[list[int]]:
        if not hasattr(tokenizer, "enable_truncation"):  # e.g. synthetic.WordTokenizer
            return [list(encoding.ids)[:limit] for encoding in tokenizer.encode_batch(texts)]
        saved = tokenizer.truncation
        tokenizer.enable_truncation(limit)
        try:
            return [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]
        finally:
            if saved is None:
                tokenizer.no_truncation()
            else:
                tokenizer.enable_truncation(**saved)
    return encode_batch, limit


def tokenize_for_retriever(retriever: Retriever, texts: Sequence[str],
                           max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (token_ids (N, L) int32 padded with 0, lengths (N,) int32), with the retriever's
    tokenizer truncating at `max_length` (default: the checkpoint's max length). L is the
    longest tokenized text (at least 1)."""
    encode_batch, limit = retriever_encoder(retriever, max_length)
    tokens = passages.TokenArray.build(list(texts), encode_batch, limit)
    width = max(int(tokens.lengths.max(initial=0)), 1)
    return np.ascontiguousarray(tokens.token_ids[:, :width]), np.asarray(tokens.lengths)


def bucket_length(longest: int, limit: int, step: int = 4) -> int:
    """Padded length of a batch whose longest passage has `longest` tokens: rounded up to a
    multiple of `step` up to 16 * step tokens, beyond that to a multiple of P / 16, P the
    smallest power of two >= longest (step 4: 4, 8, ..., 64, 72, ..., 128, 144, ..., 256, 288,
    ...: 8 shapes per octave, under 12.5% padding past 64 tokens); capped at `limit`, >= 1."""
    longest = max(int(longest), 1)
    granularity = max(step, 2 ** ((longest - 1).bit_length() - 4))
    return min(-(-longest // granularity) * granularity, limit)


def _check_corpus(retriever: Retriever, token_ids: np.ndarray, lengths: np.ndarray,
                  tower: str) -> tuple[np.ndarray, int]:
    """Validates `embed_corpus`'s inputs: (lengths (N,) int64, limit), limit being the longest
    passage the tower may embed (min of the token_ids width and max_position_embeddings)."""
    if tower not in ("query", "passage"):
        raise ValueError(f"tower must be 'query' or 'passage', got {tower!r}")
    lengths = np.asarray(lengths).astype(np.int64).reshape(-1)  # (N,)
    if token_ids.ndim != 2 or token_ids.shape[0] != lengths.shape[0]:
        raise ValueError(f"token_ids of shape {token_ids.shape} do not match lengths of shape "
                         f"{lengths.shape}: expected (N, L) and (N,)")
    num_passages, width = token_ids.shape
    limit = min(width, retriever.config.max_position_embeddings)
    if num_passages and (lengths.min() < 0 or lengths.max() > limit):
        bad = int(np.flatnonzero((lengths < 0) | (lengths > limit))[0])
        raise ValueError(f"passage {bad} has length {lengths[bad]}, outside [0, {limit}] "
                         f"(token_ids width {width}, max_position_embeddings "
                         f"{retriever.config.max_position_embeddings})")
    return lengths, limit


def _compile_buckets(config: retriever_lib.RetrieverConfig, tower: str, mesh: Mesh,
                     rules: tuple, batch: int, bucket_of: Sequence[int],
                     signature: tuple) -> dict[int, Any]:
    """{bucket length: the tower compiled for (batch, length)}, one per distinct length in
    `bucket_of` (cached across calls by `towers.compiled_tower`)."""
    precision = jax.config.jax_default_matmul_precision
    return {length: towers.compiled_tower(config, tower, mesh, rules, batch, length, signature,
                                          precision)
            for length in sorted(set(bucket_of))}


def _embed_batches(compiled: dict[int, Any], tower_params: Any, mesh: Mesh,
                   token_ids: np.ndarray, lengths: np.ndarray, order: np.ndarray,
                   batches: Iterable[tuple[int, int]], batch: int, embeddings: np.ndarray,
                   bar: tqdm) -> None:
    """Runs each (start, bucket length) of `batches` (passages order[start:start + batch],
    sliced to that length and padded to `batch` rows) and writes the embeddings into
    `embeddings` rows; the next batch is dispatched before the previous one is read back."""
    data_sharding = NamedSharding(mesh, PartitionSpec("data", None))
    pending = None  # (rows, device result) of the batch in flight

    def read_back(rows, result):
        embeddings[rows] = distributed.host_array(result)[:len(rows)]
        bar.update(len(rows))

    for start, length in batches:
        rows = np.sort(order[start:start + batch])  # ascending: sequential memmap reads
        ids = np.zeros((batch, length), np.int32)  # (batch, length); dummy rows stay empty
        ids[:len(rows)] = np.asarray(token_ids[rows, :length])
        mask = (np.arange(length)[None] < lengths[rows][:, None]).astype(np.int32)
        mask = np.concatenate([mask, np.zeros((batch - len(rows), length), np.int32)])
        result = compiled[length](tower_params, jax.device_put(ids, data_sharding),
                                  jax.device_put(mask, data_sharding))  # (batch, D)
        if pending is not None:
            read_back(*pending)
        pending = (rows, result)
    if pending is not None:
        read_back(*pending)


def embed_corpus(retriever: Retriever, token_ids: np.ndarray, lengths: np.ndarray, *,
                 mesh: Mesh | None = None, batch_size: int = 256, tower: str = "passage",
                 params: Any = None, progress: bool = True, dtype: Any = np.float32,
                 bucket_step: int = 4, rules: Sequence | None = None) -> EmbeddingRun:
    """Embeds pre-tokenized passages with the retriever's passage (or query) tower.

    Args:
      retriever: supplies the model config and (unless `params` is given) the parameters.
      token_ids: (N, L) int32 passages padded with 0 beyond `lengths`; may be memory-mapped
        (only the rows of one batch are read at a time).
      lengths: (N,) number of real tokens of each passage.
      mesh: a ('data', 'model') mesh; default `partitioning.create_mesh((-1, 1))` over all
        devices. Batches are split over 'data'; parameters placed by `rules`.
      batch_size: passages per step, rounded up to a multiple of the 'data' axis size.
      tower: 'passage' (default) or 'query'.
      params: parameters to use instead of `retriever.params` (e.g. the current training
        parameters at an index refresh); same tree as `retriever.params`.
      progress: show a tqdm bar with passages/s.
      dtype: dtype of the returned embeddings (computation follows the model config).
      bucket_step: padding granularity of short batches (see `bucket_length`); 32 gives
        multiples of 32 up to 512 tokens (fewer shapes, more padding).
      rules: logical axis rules; default `partitioning.standard_logical_axis_rules()`.
    Returns:
      EmbeddingRun with embeddings (N, D) where row i is passage i.
    """
    lengths, limit = _check_corpus(retriever, token_ids, lengths, tower)
    num_passages = token_ids.shape[0]
    start_time = time.perf_counter()
    mesh = mesh if mesh is not None else partitioning.create_mesh((-1, 1))
    rules = towers.as_rules(rules)
    data_size = mesh.shape["data"]
    batch = -(-max(int(batch_size), 1) // data_size) * data_size
    tower_params = towers.place_tower_params(
        retriever.config, retriever.params if params is None else params, tower, mesh, rules)
    signature = towers.param_signature(tower_params)

    order = np.argsort(-lengths, kind="stable")  # longest first
    starts = range(0, num_passages, batch)
    bucket_of = [bucket_length(lengths[order[s]], limit, bucket_step) for s in starts]
    compile_start = time.perf_counter()
    compiled = _compile_buckets(retriever.config, tower, mesh, rules, batch, bucket_of,
                                signature)
    compile_seconds = time.perf_counter() - compile_start

    embeddings = np.zeros((num_passages, retriever.config.embedding_dim), dtype)  # (N, D)
    bar = tqdm(total=num_passages, unit="passage", unit_scale=True, disable=not progress,
               desc=f"embed {tower}s", smoothing=0.1)
    _embed_batches(compiled, tower_params, mesh, token_ids, lengths, order,
                   zip(starts, bucket_of), batch, embeddings, bar)
    bar.close()
    seconds = time.perf_counter() - start_time
    return EmbeddingRun(embeddings, seconds, num_passages / max(seconds, 1e-9),
                        compile_seconds)

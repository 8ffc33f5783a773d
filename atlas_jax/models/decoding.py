"""Greedy and beam search driven by a `tokens_to_logits(tokens, cache)` callback (t5x style).

The cache is any pytree whose array leaves have the batch as leading axis, or as second axis
under a scanned stack `layers` (scalars such as the cache index are left alone); beam search
tiles and reorders it along that axis.
`generate` wires these searches to a T5 / FiD `Transformer` with its key/value cache.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.models.fid import copy_source_ids

NEG_INF = np.float32(-1.0e7)
TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def greedy_search(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int, max_length: int,
                  eos_id: int, start_id: int = 0, pad_id: int = 0) -> jax.Array:
    """Argmax decoding until every row emitted `eos_id` or `max_length` tokens were made.

    Returns (batch, max_length) int32: the generated tokens without the start token, the EOS
    included, `pad_id` after it.
    """
    def cond(state):
        step, _, finished, _, _ = state
        return (step < max_length) & ~jnp.all(finished)

    def body(state):
        step, token, finished, sequences, cache = state
        logits, cache = tokens_to_logits(token[:, None], cache)
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_token = jnp.where(finished, pad_id, next_token)
        sequences = sequences.at[:, step].set(next_token)
        return step + 1, next_token, finished | (next_token == eos_id), sequences, cache

    state = (jnp.array(0), jnp.full((batch_size,), start_id, jnp.int32),
             jnp.zeros((batch_size,), bool), jnp.full((batch_size, max_length), pad_id, jnp.int32),
             cache)
    return jax.lax.while_loop(cond, body, state)[3]


def brevity_penalty(alpha: float, length: jax.Array) -> jax.Array:
    """GNMT length penalty ((5 + length) / 6) ** alpha used to normalise beam scores."""
    return jnp.power((5.0 + length) / 6.0, alpha)


def _batch_axis(path) -> int:
    """The batch axis of a cache leaf: 1 under a scanned stack (`layers`: a leading layer axis,
    models/stacking.py), else 0."""
    return int(any(getattr(key, "key", None) == "layers" for key in path))


def _map_batched(fn: Callable[[jax.Array], jax.Array], tree: Any) -> Any:
    """fn on the batch-leading view of every leaf that has a batch axis (scalars such as the
    cache index, or a scanned stack of them, are left alone)."""
    def apply(path, x):
        axis = _batch_axis(path)
        if x.ndim <= axis:
            return x
        return jnp.moveaxis(fn(jnp.moveaxis(x, axis, 0)), 0, axis)
    return jax.tree_util.tree_map_with_path(apply, tree)


def _tile_beams(tree: Any, beam_size: int) -> Any:
    return _map_batched(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def _gather_beams(tree: Any, beam_indices: jax.Array, batch_size: int, beam_size: int) -> Any:
    """Reorders (batch*beam, ...) leaves by beam_indices (batch, new_beam)."""
    def gather(x):
        x = x.reshape((batch_size, beam_size) + x.shape[1:])
        idx = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1).reshape((-1,) + x.shape[2:])
    return _map_batched(gather, tree)


def beam_search(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int, beam_size: int,
                max_length: int, eos_id: int, start_id: int = 0, pad_id: int = 0,
                alpha: float = 0.6) -> tuple[jax.Array, jax.Array]:
    """Beam search with a GNMT length penalty.

    `cache` has batch leading axis `batch_size` and is tiled to `batch_size * beam_size` here.
    Returns (sequences (batch, beam, max_length), scores (batch, beam)), best first; scores are
    sum of log-probabilities divided by brevity_penalty(alpha, length). Rows that finished no
    hypothesis return their alive beams.
    """
    cache = _tile_beams(cache, beam_size)
    shape = (batch_size, beam_size)
    alive_seqs = jnp.full(shape + (max_length,), pad_id, jnp.int32)
    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beam_size - 1), jnp.float32),
                          (batch_size, 1))
    finished_seqs = alive_seqs
    finished_scores = jnp.full(shape, NEG_INF, jnp.float32)
    last_token = jnp.full(shape, start_id, jnp.int32)

    def cond(state):
        step, _, alive_logp, _, finished_scores, _, _ = state
        best_alive = alive_logp[:, 0] / brevity_penalty(alpha, max_length)
        worst_finished = jnp.min(finished_scores, axis=1)
        can_improve = jnp.any(best_alive > worst_finished)
        return (step < max_length) & can_improve

    def body(state):
        step, alive_seqs, alive_logp, finished_seqs, finished_scores, last_token, cache = state
        logits, cache = tokens_to_logits(last_token.reshape(-1, 1), cache)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(shape + (vocab,))
        candidate_logp = (alive_logp[..., None] + logp).reshape(batch_size, -1)
        top_logp, top_index = jax.lax.top_k(candidate_logp, 2 * beam_size)  # (batch, 2W)
        top_beam, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_seqs = jnp.take_along_axis(alive_seqs, top_beam[..., None], axis=1)
        top_seqs = top_seqs.at[:, :, step].set(top_token)
        is_eos = top_token == eos_id

        # Alive: the best W candidates that did not end.
        alive_candidates = jnp.where(is_eos, NEG_INF, top_logp)
        new_alive_logp, alive_pick = jax.lax.top_k(alive_candidates, beam_size)
        new_alive_seqs = jnp.take_along_axis(top_seqs, alive_pick[..., None], axis=1)
        new_last_token = jnp.take_along_axis(top_token, alive_pick, axis=1)
        cache = _gather_beams(cache, jnp.take_along_axis(top_beam, alive_pick, axis=1),
                              batch_size, beam_size)

        # Finished: merge the ended candidates into the finished pool.
        ended_scores = jnp.where(is_eos & (top_logp > NEG_INF / 2),
                                 top_logp / brevity_penalty(alpha, step + 1), NEG_INF)
        pool_scores = jnp.concatenate([finished_scores, ended_scores], axis=1)
        pool_seqs = jnp.concatenate([finished_seqs, top_seqs], axis=1)
        new_finished_scores, finished_pick = jax.lax.top_k(pool_scores, beam_size)
        new_finished_seqs = jnp.take_along_axis(pool_seqs, finished_pick[..., None], axis=1)
        return (step + 1, new_alive_seqs, new_alive_logp, new_finished_seqs, new_finished_scores,
                new_last_token, cache)

    state = (jnp.array(0), alive_seqs, alive_logp, finished_seqs, finished_scores, last_token,
             cache)
    _, alive_seqs, alive_logp, finished_seqs, finished_scores, _, _ = jax.lax.while_loop(
        cond, body, state)
    none_finished = jnp.all(finished_scores <= NEG_INF / 2, axis=1)
    alive_scores = alive_logp / brevity_penalty(alpha, max_length)
    sequences = jnp.where(none_finished[:, None, None], alive_seqs, finished_seqs)
    scores = jnp.where(none_finished[:, None], alive_scores, finished_scores)
    return sequences, scores


def generate(model: nn.Module, params: Any, encoded: jax.Array, encoder_mask: jax.Array,
             max_length: int, beam_size: int = 1, alpha: float = 0.6,
             encoder_ids: jax.Array | None = None):
    """Decodes from encoder states with a key/value cache.

    Args:
      model: a `t5.Transformer` (or FiD subclass); params: its parameters.
      encoded: (batch, source_length, embed); encoder_mask: (batch, source_length) bool.
      beam_size: 1 for greedy search.
      encoder_ids: (batch, source_length) source tokens; needed by a `copy_head` reader.
    Returns:
      greedy: tokens (batch, max_length); beam: (sequences (batch, beam, max_length), scores).
    """
    cfg = model.config
    batch_size = encoded.shape[0]
    _, variables = model.apply(
        {"params": params}, encoded, encoder_mask, jnp.zeros((batch_size, max_length), jnp.int32),
        decode=True, max_decode_length=max_length, mutable=["cache"], method=model.decode,
        encoder_ids=encoder_ids)
    # Beam search tiles the cache (cross-attention keys/values included) to batch * beam rows.
    step_mask = jnp.repeat(encoder_mask, beam_size, axis=0)
    step_ids = None if encoder_ids is None else jnp.repeat(encoder_ids, beam_size, axis=0)

    def tokens_to_logits(tokens, cache):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, None, step_mask, tokens, decode=True,
            max_decode_length=max_length, mutable=["cache"], method=model.decode,
            encoder_ids=step_ids)
        return logits[:, -1], variables["cache"]

    if beam_size == 1:
        return greedy_search(tokens_to_logits, variables["cache"], batch_size, max_length,
                             cfg.eos_id, cfg.decoder_start_id, cfg.pad_id)
    return beam_search(tokens_to_logits, variables["cache"], batch_size, beam_size, max_length,
                       cfg.eos_id, cfg.decoder_start_id, cfg.pad_id, alpha)


def generate_from_passages(model: nn.Module, params: Any, passage_ids: jax.Array,
                           max_length: int, beam_size: int = 1, alpha: float = 0.6):
    """`generate` for a FiD model from its (batch, n_passages, length) input ids: encodes the
    passages, then decodes with their ids as the source a `copy_head` reader copies from."""
    encoded, mask = model.apply({"params": params}, passage_ids, method=model.encode_passages)
    return generate(model, params, encoded, mask, max_length, beam_size, alpha,
                    encoder_ids=copy_source_ids(passage_ids, model.config))

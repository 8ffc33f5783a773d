"""Fusion-in-Decoder: each of K passages is encoded on its own, the decoder reads all of them.

The parameters are exactly T5's (FiD adds none), so a T5 checkpoint is a FiD checkpoint.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atlas_jax.models import t5


class FusionInDecoder(t5.Transformer):
    """T5 reading (batch, n_passages, length) inputs.

    The K*L encoder states of an example are concatenated into one sequence for the decoder's
    cross-attention; pad positions (id `pad_id`) are masked.
    """

    def encode_passages(self, passage_ids: jax.Array, deterministic: bool = True):
        """passage_ids (batch, n_passages, length) -> (encoded (batch, n_passages*length, embed),
        mask (batch, n_passages*length) bool)."""
        batch, n_passages, length = passage_ids.shape
        flat = passage_ids.reshape(batch * n_passages, length)
        encoded = self.encode(flat, deterministic)  # (batch*K, L, embed)
        encoded = encoded.reshape(batch, n_passages * length, encoded.shape[-1])
        encoded = nn.with_logical_constraint(encoded, ("batch", "length", "embed"))
        return encoded, (passage_ids != self.config.pad_id).reshape(batch, n_passages * length)

    def __call__(self, passage_ids: jax.Array, decoder_input_ids: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """Teacher-forced logits (batch, target_length, vocab)."""
        encoded, mask = self.encode_passages(passage_ids, deterministic)
        return self.decode(encoded, mask, decoder_input_ids, deterministic,
                           encoder_ids=copy_source_ids(passage_ids, self.config))


def copy_source_ids(passage_ids: jax.Array, config) -> jax.Array:
    """The (batch, n_passages*length) source ids a copy head copies from: `passage_ids`, with
    each row's prompt (through the *last* `config.copy_skip_through_id` in the row: the
    `answer: <extra_id_0>` that ends `question: {q} answer: <extra_id_0>`, after any mask
    the question itself holds) set to the pad id when `copy_skip_through_id` is set. A row
    with nothing after it (closed book) keeps its question. Why (docs/reader.md): the
    question repeats in every row, so a piece it holds (the year `23` of `2023-06-28`)
    gathered pointer mass from every row and outweighed the amount the answer is."""
    batch, n_passages, length = passage_ids.shape
    marker = getattr(config, "copy_skip_through_id", None)
    if marker is not None:
        hits = passage_ids == marker
        # positions after the last marker: no marker at or after them
        later = jnp.flip(jnp.cumsum(jnp.flip(hits, -1), -1), -1) > 0
        after = ~later & hits.any(-1, keepdims=True)
        evidence = (after & (passage_ids != config.pad_id)).any(-1, keepdims=True)
        passage_ids = jnp.where(after | ~evidence, passage_ids, config.pad_id)
    return passage_ids.reshape(batch, n_passages * length)


def cross_attention_passage_scores(intermediates: Any, n_passages: int,
                                   target_mask: jax.Array | None = None) -> jax.Array:
    """Per-passage cross-attention mass (the ADist signal) from a FiD call's intermediates.

    Call the model with `mutable=['intermediates']`; every decoder layer sows
    (batch, target_length, n_passages*length) = attention probability x |value| summed over
    heads. This sums them over layers, unmasked target tokens and each passage's tokens
    (Atlas's ADist). A reader with a copy head (`t5.T5Config.copy_head`) also sows its
    pointer (copy probability x pointer distribution): the attention that decides which
    passage's tokens are copied into the answer. It counts as one more layer: its shares of
    the passages, times the layers' mean mass per example (docs/training.md: without it,
    ADist did not learn on the synthetic task, where a copying reader's cross-attention
    layers give the gold passage a 0.27 share among 5 and its pointer 0.72).

    Args:
      intermediates: the 'intermediates' collection returned by `apply`.
      n_passages: K.
      target_mask: (batch, target_length), 1 for real target tokens; None counts all.
    Returns:
      (batch, n_passages) float32.
    """
    named = jax.tree_util.tree_flatten_with_path(intermediates)[0]
    is_pointer = ["copy_pointer_scores" in jax.tree_util.keystr(path) for path, _ in named]
    # A scanned decoder (T5Config.scan_layers) sows one (layers, batch, q, kv) stack.
    layers = [layer for (_, leaf), p in zip(named, is_pointer) if not p
              for layer in (list(leaf) if leaf.ndim == 4 else [leaf])]
    pointers = [leaf for (_, leaf), p in zip(named, is_pointer) if p]
    if not layers:
        raise ValueError("no cross-attention scores found: call the model with "
                         "mutable=['intermediates']")

    def per_passage(total: jax.Array) -> jax.Array:
        if target_mask is not None:
            total = total * target_mask[..., None].astype(total.dtype)
        batch, _, source_length = total.shape
        return total.sum(axis=1).reshape(batch, n_passages, source_length // n_passages
                                         ).sum(axis=-1).astype(jnp.float32)

    scores = per_passage(sum(layers))  # (batch, K)
    if pointers:
        pointer = per_passage(sum(pointers))
        layer_mean = scores.sum(-1, keepdims=True) / len(layers)
        scores = scores + pointer * layer_mean / jnp.maximum(
            pointer.sum(-1, keepdims=True), 1e-9)
    return scores

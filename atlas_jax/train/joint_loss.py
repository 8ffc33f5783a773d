"""The Atlas joint loss of one training batch (docs/design.md §1): reader NLL + retriever loss.

    total, metrics = joint_loss(params, batch, models, objective, n_context, rng)

`params = {"reader": <FiD T5 params>, "retriever": <DualEncoder params>}`. The batch holds the
K = retriever_n_context passages already retrieved for each query, tokenized twice (reader and
retriever vocabularies):

  query_ids, query_mask            (B, Lq) int32   retriever tokens of the question
  passage_ids, passage_mask        (B, K, Lp) int32 retriever tokens of the passages
  passage_valid                    (B, K) bool     False where fewer than K were retrieved
  reader_ids                       (B, K, L) int32 reader tokens "question: .. title: .. context:
                                                   ..", all pad for invalid passages
  decoder_input_ids, targets       (B, T) int32
  target_mask                      (B, T) int32 / bool

The reader reads the first `n_context` passages (FiD); its token NLL is the reader loss. The
retriever's scores s_k = q . p_k / sqrt(D) over the K passages train towards the objective's
gold signal (objectives.py): PDist / EMDR2 from the reader on each passage alone, LOOP from
the reader on all passages but one, ADist from the main pass's cross-attention. Gold signals
never carry gradient (the reader learns only from its own loss). With `frozen_passage_params`
(query-side training) the passage embeddings come from that frozen tower, without gradient,
or, when the batch carries `passage_embeddings` (B, K, D) (the index's rows of the retrieved
passages, which that same frozen tower embedded), from the batch: no passage is re-encoded.

This module is the step's math only; the trainer jits it on the mesh with the optimizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.train import objectives
from atlas_jax.models import fid, retriever as retriever_lib


@dataclasses.dataclass(frozen=True)
class JointModels:
    """The two Flax modules (their parameters travel separately)."""
    reader: fid.FusionInDecoder
    retriever: retriever_lib.DualEncoder


def _reader_nll(models: JointModels, reader_params: Any, passages: jax.Array,
                decoder_input_ids: jax.Array, targets: jax.Array, target_mask: jax.Array,
                length_normalised: bool) -> jax.Array:
    """Per-example target NLL of the FiD reader over `passages` (N, K', L) -> (N,)."""
    logits = models.reader.apply({"params": reader_params}, passages, decoder_input_ids,
                                 deterministic=True)
    return objectives.target_token_nll(logits, targets, target_mask,
                                       length_normalised=length_normalised)


def _repeat_per_passage(array: jax.Array, n_passages: int) -> jax.Array:
    """(B, ...) -> (B * n_passages, ...), each row repeated for its passages."""
    return jnp.repeat(array, n_passages, axis=0)


def reader_signal(objective: str, models: JointModels, reader_params: Any, batch: dict,
                  cross_attention: jax.Array | None) -> jax.Array | None:
    """The (B, K) reader signal `objectives.retriever_loss` expects for `objective`, computed
    without gradient: PDist -mean NLL and EMDR2 -summed NLL of the reader on each passage
    alone, LOOP mean NLL on all passages but k, ADist the cross-attention masses."""
    if objective == "none":
        return None
    if objective == "adist":
        return cross_attention
    reader_params = jax.lax.stop_gradient(reader_params)
    reader_ids = batch["reader_ids"]                                    # (B, K, L)
    batch_size, n_passages, length = reader_ids.shape
    repeat = lambda name: _repeat_per_passage(batch[name], n_passages)  # noqa: E731
    if objective in ("pdist", "emdr2"):
        alone = reader_ids.reshape(batch_size * n_passages, 1, length)
        nll = _reader_nll(models, reader_params, alone, repeat("decoder_input_ids"),
                          repeat("targets"), repeat("target_mask"),
                          length_normalised=objective == "pdist")
        return -nll.reshape(batch_size, n_passages)
    if objective == "loop":
        # others[k] = every passage index but k: (K, K-1), static.
        others = np.array([[j for j in range(n_passages) if j != k] for k in range(n_passages)])
        without = reader_ids[:, others].reshape(batch_size * n_passages, n_passages - 1, length)
        nll = _reader_nll(models, reader_params, without, repeat("decoder_input_ids"),
                          repeat("targets"), repeat("target_mask"), length_normalised=True)
        return nll.reshape(batch_size, n_passages)
    raise ValueError(f"unknown retriever objective {objective!r}")


def joint_loss(params: dict, batch: dict, models: JointModels,
               objective: objectives.ObjectiveConfig, n_context: int, rng: jax.Array,
               deterministic: bool = False, frozen_passage_params: Any = None
               ) -> tuple[jax.Array, dict]:
    """Reader loss + retriever loss of one batch.

    Args:
      params: {"reader": ..., "retriever": ...}.
      batch: see the module docstring.
      models: the reader and retriever modules.
      objective: which retriever loss, and its temperatures.
      n_context: passages the reader reads (the first n_context of the K retrieved).
      rng: dropout key.
      deterministic: disable dropout.
      frozen_passage_params: query-side training: a fixed passage tower's parameters.
    Returns:
      (total loss, metrics {"loss", "reader_loss", "retriever_loss"}) float32 scalars.
    """
    reader_ids = batch["reader_ids"][:, :n_context]                     # (B, n_context, L)
    reader_rng, retriever_rng = jax.random.split(rng)
    logits, state = models.reader.apply(
        {"params": params["reader"]}, reader_ids, batch["decoder_input_ids"],
        deterministic=deterministic, rngs={"dropout": reader_rng},
        mutable=["intermediates"] if objective.objective == "adist" else [])
    reader_loss = objectives.target_token_nll(logits, batch["targets"],
                                              batch["target_mask"]).sum() / jnp.maximum(
        jnp.asarray(batch["target_mask"], jnp.float32).sum(), 1.0)

    if objective.objective == "none":
        retriever_loss = jnp.zeros((), jnp.float32)
    else:
        batch_size, n_passages, passage_length = batch["passage_ids"].shape
        tower = lambda p, method, ids, mask: models.retriever.apply(  # noqa: E731
            {"params": p}, ids, mask, deterministic=deterministic,
            rngs={"dropout": retriever_rng}, method=method)
        queries = tower(params["retriever"], models.retriever.embed_queries,
                        batch["query_ids"], batch["query_mask"])          # (B, D)
        if frozen_passage_params is not None and "passage_embeddings" in batch:
            # Query-side: the frozen tower's embeddings are the index's rows already.
            passages = jnp.asarray(batch["passage_embeddings"], jnp.float32)
        else:
            flat_ids = batch["passage_ids"].reshape(batch_size * n_passages, passage_length)
            flat_mask = batch["passage_mask"].reshape(batch_size * n_passages, passage_length)
            passage_params = (params["retriever"] if frozen_passage_params is None
                              else jax.lax.stop_gradient(frozen_passage_params))
            passages = tower(passage_params, models.retriever.embed_passages, flat_ids,
                             flat_mask).reshape(batch_size, n_passages, -1)
        scores = objectives.retriever_scores(queries, passages)  # (B, K)
        valid = batch["passage_valid"]
        cross_attention = None
        if objective.objective == "adist":
            # ADist scores only the passages the reader read.
            cross_attention = fid.cross_attention_passage_scores(
                state["intermediates"], n_context, batch["target_mask"])
            scores, valid = scores[:, :n_context], valid[:, :n_context]
        signal = reader_signal(objective.objective, models, params["reader"], batch,
                               cross_attention)
        retriever_loss = objectives.retriever_loss(
            objective.objective, signal, scores, valid, objective.temperature_gold,
            objective.temperature_score)
    total = reader_loss + retriever_loss
    return total, {"loss": total, "reader_loss": reader_loss, "retriever_loss": retriever_loss}

"""Retriever training objectives (Atlas): pure jax functions, one per objective.

The retriever scores s_k = q . p_k / sqrt(D) are trained towards a gold signal g_k from the
reader (docs/design.md §1). Every gold score passes through `jax.lax.stop_gradient`: the reader is
never trained through the retriever loss, gradients reach only `scores`.

  pdist : g_k = mean token log-likelihood of the target given the query and passage k alone
  loop  : g_k = mean token NLL of the target given all passages except k
  adist : g_k = share of the reader's cross-attention mass (prob x |value|) on passage k
  emdr2 : no g; loss = -log sum_k p(y | q, d_k) p_retr(k | q)
  none  : 0 (fixed retriever)

pdist / loop / adist use `distillation_loss` = KL(softmax(g/τ_gold) || softmax(s/τ_score)).
`passage_mask` (B, K) bool marks real passages; masked ones (fewer than K retrieved, id -1)
are left out of every softmax and sum and get zero gradient, whatever values they hold.
"""
from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

OBJECTIVES = ("pdist", "adist", "loop", "emdr2", "none")

# A finite stand-in for log(0): exp() underflows to exactly 0, yet differences of it stay
# finite, so 0 * (log p - log q) never becomes 0 * inf = NaN (in the value or the gradient).
_MASKED_LOGIT = -1e9


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which retriever loss to train with and its temperatures (Atlas defaults 0.01)."""
    objective: str = "pdist"
    temperature_gold: float = 0.01
    temperature_score: float = 0.01

    def __post_init__(self):
        _check_objective(self.objective)
        for name in ("temperature_gold", "temperature_score"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ObjectiveConfig.{name} must be > 0, got "
                                 f"{getattr(self, name)!r}")


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown retriever objective {objective!r}; choose one of "
                         f"{', '.join(OBJECTIVES)}")


def retriever_scores(query_embeddings: jax.Array, passage_embeddings: jax.Array) -> jax.Array:
    """Atlas retriever scores q . p_k / sqrt(D) (no L2 normalisation).

    Args:
      query_embeddings: (B, D).
      passage_embeddings: (B, K, D).
    Returns:
      (B, K) float32.
    """
    query = query_embeddings.astype(jnp.float32)
    passages = passage_embeddings.astype(jnp.float32)
    return jnp.einsum("bd,bkd->bk", query, passages) / jnp.sqrt(jnp.float32(query.shape[-1]))


def target_token_nll(logits: jax.Array, targets: jax.Array, target_mask: jax.Array,
                     length_normalised: bool = False) -> jax.Array:
    """Negative log-likelihood of each target sequence under teacher-forced reader logits.

    Args:
      logits: (N, T, V), e.g. N = B*K rows of one passage each (PDist, EMDR2) or of all
        passages but one (LOOP).
      targets: (N, T) token ids; ids at padded positions are ignored (any value).
      target_mask: (N, T), true / 1 for real target tokens.
      length_normalised: divide by the number of real target tokens (mean token NLL, as
        Atlas's PDist and LOOP gold scores do); a row without real tokens gives 0.
    Returns:
      (N,) float32: summed (or mean) token NLL.
    """
    mask = target_mask.astype(bool)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe_targets = jnp.where(mask, targets, 0)
    token_log_probs = jnp.take_along_axis(log_probs, safe_targets[..., None], axis=-1)[..., 0]
    nll = -jnp.sum(jnp.where(mask, token_log_probs, 0.0), axis=-1)
    if length_normalised:
        nll = nll / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)
    return nll


def _masked_log_softmax(logits: jax.Array, passage_mask: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(jnp.where(passage_mask, logits, _MASKED_LOGIT), axis=-1)


def _mean_over_rows(per_row: jax.Array, passage_mask: jax.Array) -> jax.Array:
    """Mean over the rows that hold at least one real passage (0 when none does)."""
    row_has_passage = jnp.any(passage_mask, axis=-1)
    total = jnp.sum(jnp.where(row_has_passage, per_row, 0.0))
    return total / jnp.maximum(jnp.sum(row_has_passage), 1).astype(jnp.float32)


def distillation_loss(gold_scores: jax.Array, scores: jax.Array, passage_mask: jax.Array,
                      temperature_gold: float = 0.01,
                      temperature_score: float = 0.01) -> jax.Array:
    """KL( softmax(stop_gradient(gold)/τ_gold) || softmax(scores/τ_score) ), batch mean.

    The KL is summed over a row's real passages and averaged over the rows that have one
    (Atlas's `nn.KLDivLoss()` uses reduction='mean', i.e. it also divides by K: ours is the
    true per-example KL, K times the reference's value).

    Args:
      gold_scores: (B, K) gold scores g (no gradient flows into them).
      scores: (B, K) retriever scores s.
      passage_mask: (B, K) bool, true for real passages.
    Returns:
      scalar float32.
    """
    passage_mask = passage_mask.astype(bool)
    gold = jax.lax.stop_gradient(gold_scores.astype(jnp.float32))
    gold_log_probs = _masked_log_softmax(gold / temperature_gold, passage_mask)
    score_log_probs = _masked_log_softmax(scores.astype(jnp.float32) / temperature_score,
                                          passage_mask)
    terms = jnp.exp(gold_log_probs) * (gold_log_probs - score_log_probs)
    per_row = jnp.sum(jnp.where(passage_mask, terms, 0.0), axis=-1)
    return _mean_over_rows(per_row, passage_mask)


def pdist_gold(per_passage_log_likelihood: jax.Array) -> jax.Array:
    """Perplexity-distillation gold: (B, K) -> (B, K), stop-gradient.

    Input: log-likelihood of the target given the query and passage k alone, length-normalised
    (`-target_token_nll(..., length_normalised=True)` on the B*K single-passage rows), as in
    Atlas's `perplexity_score` (-sum NLL / n_tokens). Higher = more useful passage.
    """
    return jax.lax.stop_gradient(per_passage_log_likelihood.astype(jnp.float32))


def loop_gold(nll_without_passage: jax.Array) -> jax.Array:
    """Leave-one-out gold: (B, K) -> (B, K), stop-gradient.

    Input: length-normalised NLL of the target given all passages except k. The sign is
    kept positive, as in Atlas's `loop_score`: removing a useful passage raises the NLL, so a
    larger gold score means a more relevant passage.
    """
    return jax.lax.stop_gradient(nll_without_passage.astype(jnp.float32))


def adist_gold(cross_attention_scores: jax.Array,
               passage_mask: jax.Array | None = None) -> jax.Array:
    """Attention-distillation gold: each passage's share of the cross-attention mass.

    Input: (B, K) masses (attention prob x |value|, summed over heads, layers, real target
    tokens and the passage's tokens) from `fid.cross_attention_passage_scores`. Output:
    mass_k / sum of the row's real passages' masses, stop-gradient (a masked passage gets 0).
    Atlas instead takes the raw mass divided by a constant (head mean, / (256 * n_layers *
    n_target_tokens)), so its gold's sharpness under τ_gold depends on value norms and
    passage length; the share is independent of model size, target length and value scale.
    """
    masses = cross_attention_scores.astype(jnp.float32)
    if passage_mask is not None:
        masses = jnp.where(passage_mask.astype(bool), masses, 0.0)
    total = jnp.sum(masses, axis=-1, keepdims=True)
    return jax.lax.stop_gradient(masses / jnp.maximum(total, jnp.finfo(jnp.float32).tiny))


def emdr2_loss(per_passage_log_likelihood: jax.Array, scores: jax.Array,
               passage_mask: jax.Array, temperature_score: float = 0.01) -> jax.Array:
    """EMDR2: -mean_b log sum_k p(y | q, d_k) p_retr(k | q), in log space.

    = -mean_b logsumexp_k( stop_gradient(log p(y | q, d_k)) + log_softmax(s / τ_score)_k )
    over real passages. Atlas's `logprob` marginalises per target token and applies τ_gold to
    the reader logits; this is the paper's sequence-level form.

    Args:
      per_passage_log_likelihood: (B, K) summed target log-likelihood given passage k alone
        (`-target_token_nll(...)`).
      scores: (B, K) retriever scores.
      passage_mask: (B, K) bool.
    Returns:
      scalar float32.
    """
    passage_mask = passage_mask.astype(bool)
    log_likelihood = jax.lax.stop_gradient(per_passage_log_likelihood.astype(jnp.float32))
    log_likelihood = jnp.where(passage_mask, log_likelihood, 0.0)
    log_retrieval = _masked_log_softmax(scores.astype(jnp.float32) / temperature_score,
                                        passage_mask)
    log_joint = jnp.where(passage_mask, log_likelihood + log_retrieval, _MASKED_LOGIT)
    per_row = -jax.nn.logsumexp(log_joint, axis=-1)
    return _mean_over_rows(per_row, passage_mask)


def gold_scores(objective: str, reader_signal: jax.Array,
                passage_mask: jax.Array) -> jax.Array:
    """The (B, K) stop-gradient gold scores of a distillation objective (pdist/adist/loop)."""
    if objective == "pdist":
        return pdist_gold(reader_signal)
    if objective == "loop":
        return loop_gold(reader_signal)
    if objective == "adist":
        return adist_gold(reader_signal, passage_mask)
    _check_objective(objective)
    raise ValueError(f"objective {objective!r} has no gold scores (only pdist, adist, loop)")


def retriever_loss(objective: str, reader_signal: jax.Array | None, scores: jax.Array,
                   passage_mask: jax.Array, temperature_gold: float = 0.01,
                   temperature_score: float = 0.01) -> jax.Array:
    """The retriever loss of `objective` (a static string: jit with static_argnames).

    Args:
      objective: 'pdist' | 'adist' | 'loop' | 'emdr2' | 'none'.
      reader_signal: (B, K) from the reader, per objective:
        pdist: length-normalised target log-likelihood given passage k alone;
        loop:  length-normalised target NLL given all passages but k;
        adist: cross-attention masses (`fid.cross_attention_passage_scores`);
        emdr2: summed target log-likelihood given passage k alone;
        none:  ignored (may be None).
      scores: (B, K) retriever scores (`retriever_scores`).
      passage_mask: (B, K) bool, true for real passages.
    Returns:
      scalar float32; gradients flow only into `scores`.
    """
    _check_objective(objective)
    if objective == "none":
        return jnp.zeros((), jnp.float32)
    passage_mask = passage_mask.astype(bool)
    if objective == "emdr2":
        return emdr2_loss(reader_signal, scores, passage_mask, temperature_score)
    gold = gold_scores(objective, reader_signal, passage_mask)
    return distillation_loss(gold, scores, passage_mask, temperature_gold, temperature_score)

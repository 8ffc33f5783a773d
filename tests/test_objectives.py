"""Retriever objectives: each loss equals a float64 numpy computation of its formula on a fixed
small batch (gold scores included), gradients reach only the retriever scores, masked passages
are excluded and never produce NaN."""
from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.train import objectives

B, K, T, V, D = 3, 4, 5, 11, 8
TAU_GOLD, TAU_SCORE = 0.5, 0.3  # moderate temperatures keep float32 vs float64 tight
RTOL = 1e-5


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, K), bool)
    mask[1, 3] = False  # row 1 retrieved only 3 passages (id -1 in slot 3)
    target_mask = np.ones((B * K, T), bool)
    target_mask[:, 3:] = False  # targets of 3 tokens + 2 pads
    target_mask[4:8, 2:] = False  # row 1's targets: 2 tokens
    targets = rng.integers(0, V, size=(B * K, T))
    targets[~target_mask] = -100  # pad ids must be ignored
    return dict(
        query=rng.normal(size=(B, D)).astype(np.float32),
        passages=rng.normal(size=(B, K, D)).astype(np.float32),
        logits=rng.normal(size=(B * K, T, V)).astype(np.float32) * 2,
        targets=targets, target_mask=target_mask,
        masses=rng.uniform(0.1, 3.0, size=(B, K)).astype(np.float32),
        scores=rng.normal(size=(B, K)).astype(np.float32),
        mask=mask)


# ---- float64 numpy references -------------------------------------------------------------

def _np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _np_nll(logits, targets, target_mask, normalised):
    log_probs = _np_log_softmax(logits.astype(np.float64))
    out = np.zeros(len(logits))
    for n in range(len(logits)):
        positions = np.flatnonzero(target_mask[n])
        out[n] = -sum(log_probs[n, t, targets[n, t]] for t in positions)
        if normalised and len(positions):
            out[n] /= len(positions)
    return out


def _np_kl(gold, scores, mask, tau_gold, tau_score):
    rows = []
    for b in range(len(gold)):
        valid = mask[b]
        log_p = _np_log_softmax(gold[b, valid].astype(np.float64) / tau_gold)
        log_q = _np_log_softmax(scores[b, valid].astype(np.float64) / tau_score)
        rows.append(np.sum(np.exp(log_p) * (log_p - log_q)))
    return np.mean(rows)


def _np_emdr2(log_likelihood, scores, mask, tau_score):
    rows = []
    for b in range(len(scores)):
        valid = mask[b]
        log_retr = _np_log_softmax(scores[b, valid].astype(np.float64) / tau_score)
        joint = log_likelihood[b, valid] + log_retr
        rows.append(-(joint.max() + np.log(np.exp(joint - joint.max()).sum())))
    return np.mean(rows)


# ---- formulas ----------------------------------------------------------------------------

def test_retriever_scores_are_dot_over_sqrt_d():
    batch = _batch()
    got = objectives.retriever_scores(batch["query"], batch["passages"])
    query = batch["query"].astype(np.float64)
    want = np.einsum("bd,bkd->bk", query, batch["passages"]) / np.sqrt(D)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("normalised", [False, True])
def test_target_token_nll_matches_numpy_with_padding_masked(normalised):
    batch = _batch()
    got = objectives.target_token_nll(batch["logits"], batch["targets"], batch["target_mask"],
                                      length_normalised=normalised)
    want = _np_nll(batch["logits"], batch["targets"], batch["target_mask"], normalised)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    empty = objectives.target_token_nll(batch["logits"][:1], batch["targets"][:1],
                                        np.zeros((1, T), bool), length_normalised=normalised)
    np.testing.assert_array_equal(empty, [0.0])


def test_kl_matches_numpy():
    batch = _batch()
    gold = np.random.default_rng(1).normal(size=(B, K)).astype(np.float32)
    gold[1, 3] = 1e6  # a masked passage's value must not matter
    got = objectives.distillation_loss(gold, batch["scores"], batch["mask"], TAU_GOLD, TAU_SCORE)
    want = _np_kl(gold, batch["scores"], batch["mask"], TAU_GOLD, TAU_SCORE)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    at_defaults = objectives.distillation_loss(gold, batch["scores"], batch["mask"])
    np.testing.assert_allclose(at_defaults, _np_kl(gold, batch["scores"], batch["mask"], 0.01,
                                                   0.01), rtol=1e-4)


def test_pdist_loss_from_single_passage_logits():
    batch = _batch()
    log_likelihood = -objectives.target_token_nll(
        batch["logits"], batch["targets"], batch["target_mask"], length_normalised=True)
    got = objectives.retriever_loss("pdist", log_likelihood.reshape(B, K), batch["scores"],
                                    batch["mask"], TAU_GOLD, TAU_SCORE)
    gold = -_np_nll(batch["logits"], batch["targets"], batch["target_mask"], True).reshape(B, K)
    np.testing.assert_allclose(got, _np_kl(gold, batch["scores"], batch["mask"], TAU_GOLD,
                                           TAU_SCORE), rtol=RTOL)


def test_loop_loss_from_leave_one_out_logits():
    batch = _batch()  # row b*K+k: logits given all passages of example b except k
    nll_without = objectives.target_token_nll(
        batch["logits"], batch["targets"], batch["target_mask"], length_normalised=True)
    got = objectives.retriever_loss("loop", nll_without.reshape(B, K), batch["scores"],
                                    batch["mask"], TAU_GOLD, TAU_SCORE)
    gold = _np_nll(batch["logits"], batch["targets"], batch["target_mask"], True).reshape(B, K)
    np.testing.assert_allclose(got, _np_kl(gold, batch["scores"], batch["mask"], TAU_GOLD,
                                           TAU_SCORE), rtol=RTOL)
    # larger NLL without k = more relevant k: the gold is the NLL itself, not its negative
    np.testing.assert_allclose(objectives.loop_gold(nll_without), nll_without)


def test_adist_loss_from_attention_masses():
    batch = _batch()
    masses = batch["masses"].copy()
    masses[1, 3] = 50.0  # masked passage: out of the normaliser too
    got = objectives.retriever_loss("adist", masses, batch["scores"], batch["mask"],
                                    TAU_GOLD, TAU_SCORE)
    share = np.where(batch["mask"], masses, 0).astype(np.float64)
    share /= share.sum(-1, keepdims=True)
    np.testing.assert_allclose(objectives.adist_gold(masses, batch["mask"]), share, rtol=RTOL)
    np.testing.assert_allclose(got, _np_kl(share, batch["scores"], batch["mask"], TAU_GOLD,
                                           TAU_SCORE), rtol=RTOL)


@pytest.mark.parametrize("tau_score", [TAU_SCORE, 0.01])
def test_emdr2_loss_from_single_passage_logits(tau_score):
    batch = _batch()
    log_likelihood = -objectives.target_token_nll(
        batch["logits"], batch["targets"], batch["target_mask"]).reshape(B, K)
    got = objectives.retriever_loss("emdr2", log_likelihood, batch["scores"], batch["mask"],
                                    TAU_GOLD, tau_score)
    want_ll = -_np_nll(batch["logits"], batch["targets"], batch["target_mask"], False)
    want = _np_emdr2(want_ll.reshape(B, K), batch["scores"], batch["mask"], tau_score)
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_jit_matches_eager():
    batch = _batch()
    jitted = jax.jit(objectives.retriever_loss, static_argnames="objective")
    for objective in ("pdist", "adist", "loop", "emdr2"):
        args = (batch["masses"], batch["scores"], batch["mask"], TAU_GOLD, TAU_SCORE)
        np.testing.assert_allclose(jitted(objective, *args),
                                   objectives.retriever_loss(objective, *args), rtol=1e-6)


# ---- gradients and masking ---------------------------------------------------------------

@pytest.mark.parametrize("objective", ["pdist", "adist", "loop", "emdr2"])
def test_gradients_reach_only_scores_and_skip_masked_passages(objective):
    batch = _batch()
    signal, scores = batch["masses"].copy(), batch["scores"].copy()
    signal[1, 3], scores[1, 3] = np.nan, np.inf  # garbage in the masked slot
    loss = lambda g, s: objectives.retriever_loss(objective, g, s, batch["mask"],  # noqa: E731
                                                  TAU_GOLD, TAU_SCORE)
    value = loss(signal, scores)
    grad_gold, grad_scores = jax.grad(loss, argnums=(0, 1))(signal, scores)
    assert np.isfinite(value)
    np.testing.assert_array_equal(grad_gold, np.zeros((B, K)))
    assert np.all(np.isfinite(grad_scores))
    assert grad_scores[1, 3] == 0.0
    assert np.all(np.asarray(grad_scores)[batch["mask"]] != 0.0)


def test_kl_gradient_is_q_minus_p():
    batch = _batch()
    gold = batch["masses"]
    grad = jax.grad(objectives.distillation_loss, argnums=1)(gold, batch["scores"], batch["mask"],
                                                             TAU_GOLD, TAU_SCORE)
    want = np.zeros((B, K))
    for b in range(B):
        valid = batch["mask"][b]
        p = np.exp(_np_log_softmax(gold[b, valid].astype(np.float64) / TAU_GOLD))
        q = np.exp(_np_log_softmax(batch["scores"][b, valid].astype(np.float64) / TAU_SCORE))
        want[b, valid] = (q - p) / TAU_SCORE / B
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)


def test_row_without_passages_is_left_out_of_the_mean():
    batch = _batch()
    mask = batch["mask"].copy()
    mask[2] = False
    for objective in ("pdist", "emdr2"):
        got = objectives.retriever_loss(objective, batch["masses"], batch["scores"], mask,
                                        TAU_GOLD, TAU_SCORE)
        first_two = objectives.retriever_loss(objective, batch["masses"][:2],
                                              batch["scores"][:2], mask[:2], TAU_GOLD, TAU_SCORE)
        assert np.isfinite(got)
        np.testing.assert_allclose(got, first_two, rtol=1e-6)


def test_lower_gold_temperature_sharpens_the_target():
    batch = _batch()
    uniform = np.zeros((B, K), np.float32)  # KL(p || uniform) = log K - H(p): grows as p sharpens
    losses = [float(objectives.distillation_loss(batch["masses"], uniform, batch["mask"], tau,
                                                 1.0)) for tau in (10.0, 1.0, 0.3, 0.1, 1e-4)]
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    np.testing.assert_allclose(losses[-1], np.mean(np.log(batch["mask"].sum(-1))), rtol=1e-5)
    same = objectives.distillation_loss(batch["scores"], batch["scores"], batch["mask"], 0.2, 0.2)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


# ---- dispatch and config -----------------------------------------------------------------

def test_none_is_zero_with_zero_gradient():
    batch = _batch()
    loss = lambda s: objectives.retriever_loss("none", None, s, batch["mask"])  # noqa: E731
    assert float(loss(batch["scores"])) == 0.0
    np.testing.assert_array_equal(jax.grad(loss)(batch["scores"]), np.zeros((B, K)))


def test_unknown_objective_lists_the_choices():
    batch = _batch()
    with pytest.raises(ValueError, match=r"'pdsit'.*pdist, adist, loop, emdr2, none"):
        objectives.retriever_loss("pdsit", batch["masses"], batch["scores"], batch["mask"])
    with pytest.raises(ValueError, match=r"pdist, adist, loop, emdr2, none"):
        objectives.ObjectiveConfig(objective="ppmean")
    with pytest.raises(ValueError, match=r"temperature_gold"):
        objectives.ObjectiveConfig(temperature_gold=0.0)


def test_objective_config_defaults_and_gin():
    config = objectives.ObjectiveConfig()
    assert (config.objective, config.temperature_gold, config.temperature_score) == (
        "pdist", 0.01, 0.01)
    gin.clear_config()
    try:
        gin.parse_config("objectives.ObjectiveConfig.objective = 'loop'\n"
                         "objectives.ObjectiveConfig.temperature_score = 0.1")
        config = objectives.ObjectiveConfig()
        assert (config.objective, config.temperature_score) == ("loop", 0.1)
    finally:
        gin.clear_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.objective = "adist"


@pytest.mark.parametrize("name", objectives.OBJECTIVES)
def test_objective_gin_files(name):
    from atlas_jax import gin_config
    try:
        gin_config.parse([f"objectives/{name}.gin"])
        assert objectives.ObjectiveConfig().objective == name
    finally:
        gin.clear_config()

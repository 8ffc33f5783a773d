"""The joint loss: reader NLL + each retriever objective on tiny models; gold signals equal
direct per-passage reader computations; gradients reach only where they should."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from atlas_jax.train import joint_loss, objectives
from atlas_jax.models import fid, retriever, t5
from tests.adist_reference import adist_masses

READER = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                     num_encoder_layers=1, num_decoder_layers=1,
                     mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                     scale_decoder_outputs=False, dropout_rate=0.0)
RETRIEVER = retriever.RetrieverConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                      mlp_dim=32, max_position_embeddings=16, dropout_rate=0.0)
B, K, N_CONTEXT, L, LP, LQ, T = 2, 3, 2, 8, 6, 5, 4


@pytest.fixture(scope="module")
def setup():
    models = joint_loss.JointModels(fid.FusionInDecoder(READER),
                                    retriever.DualEncoder(RETRIEVER))
    reader_params = models.reader.init(jax.random.key(0), jnp.ones((1, 2, L), jnp.int32),
                                       jnp.ones((1, T), jnp.int32))["params"]
    ones = jnp.ones((1, LP), jnp.int32)
    retriever_params = models.retriever.init(jax.random.key(1), ones, ones, ones, ones)["params"]
    params = {"reader": meta.unbox(reader_params), "retriever": meta.unbox(retriever_params)}
    rng = np.random.default_rng(0)
    reader_ids = rng.integers(2, 64, (B, K, L)).astype(np.int32)
    reader_ids[:, :, 6:] = 0
    valid = np.ones((B, K), bool)
    valid[1, 2] = False                       # row 1 retrieved only two passages
    reader_ids[1, 2] = 0
    passage_ids = rng.integers(3, 50, (B, K, LP)).astype(np.int32)
    passage_mask = np.ones((B, K, LP), np.int32)
    passage_ids[1, 2], passage_mask[1, 2] = 0, 0
    targets = rng.integers(2, 64, (B, T)).astype(np.int32)
    target_mask = np.ones((B, T), np.int32)
    target_mask[0, 3] = 0
    batch = {"query_ids": rng.integers(3, 50, (B, LQ)).astype(np.int32),
             "query_mask": np.ones((B, LQ), np.int32),
             "passage_ids": passage_ids, "passage_mask": passage_mask, "passage_valid": valid,
             "reader_ids": reader_ids, "targets": targets, "target_mask": target_mask,
             "decoder_input_ids": np.asarray(t5.shift_right(targets, 0))}
    return models, params, jax.tree.map(jnp.asarray, batch)


def _direct_nll(models, params, passages, batch, row, normalised=True):
    """Mean (or summed) target NLL of the reader on `passages` (K', L) for batch row `row`."""
    logits = models.reader.apply({"params": params["reader"]}, passages[None],
                                 batch["decoder_input_ids"][row:row + 1])[0]
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    mask = np.asarray(batch["target_mask"][row], bool)
    token = log_probs[np.arange(T), np.asarray(batch["targets"][row])]
    total = -token[mask].sum()
    return total / mask.sum() if normalised else total


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_losses_and_gradients(setup, objective):
    models, params, batch = setup
    config = objectives.ObjectiveConfig(objective=objective, temperature_gold=0.5,
                                        temperature_score=0.5)
    loss_fn = jax.jit(lambda p: joint_loss.joint_loss(p, batch, models, config, N_CONTEXT,
                                                      jax.random.key(3), deterministic=True))
    total, metrics = loss_fn(params)
    assert np.isfinite(float(total))
    np.testing.assert_allclose(float(total), float(metrics["reader_loss"])
                               + float(metrics["retriever_loss"]), rtol=1e-6)
    # Reader loss: token NLL over the first n_context passages, averaged over target tokens.
    summed = [_direct_nll(models, params, batch["reader_ids"][b, :N_CONTEXT], batch, b,
                          normalised=False) for b in range(B)]
    expected = sum(summed) / float(np.sum(batch["target_mask"]))
    np.testing.assert_allclose(float(metrics["reader_loss"]), expected, rtol=1e-4)

    retriever_grads = jax.grad(lambda p: loss_fn(p)[1]["retriever_loss"])(params)
    retriever_norm = sum(float(jnp.abs(g).sum()) for g in
                         jax.tree.leaves(retriever_grads["retriever"]))
    reader_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(retriever_grads["reader"]))
    assert reader_norm == 0.0                  # gold signals carry no gradient
    if objective == "none":
        assert retriever_norm == 0.0 and float(metrics["retriever_loss"]) == 0.0
    else:
        assert retriever_norm > 0.0


@pytest.mark.parametrize("objective", ["pdist", "emdr2", "loop"])
def test_reader_signal_matches_direct_computation(setup, objective):
    models, params, batch = setup
    signal = np.asarray(joint_loss.reader_signal(objective, models, params["reader"], batch,
                                                 None))
    for b in range(B):
        for k in range(K):
            if objective == "loop":
                others = [j for j in range(K) if j != k]
                expected = _direct_nll(models, params, batch["reader_ids"][b, others], batch, b)
            else:
                expected = -_direct_nll(models, params, batch["reader_ids"][b, k:k + 1], batch,
                                        b, normalised=objective == "pdist")
            np.testing.assert_allclose(signal[b, k], expected, rtol=1e-4, atol=1e-5)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - (np.log(np.exp(x - x.max()).sum()) + x.max())


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_retriever_loss_value_matches_direct_computation(setup, objective):
    """joint_loss's retriever loss against float64 numpy from the reader's likelihoods
    (_direct_nll), the ADist masses (tests/adist_reference.py) and q . p / sqrt(D)."""
    models, params, batch = setup
    tau_gold, tau_score = 0.5, 0.7
    config = objectives.ObjectiveConfig(objective=objective, temperature_gold=tau_gold,
                                        temperature_score=tau_score)
    _, metrics = joint_loss.joint_loss(params, batch, models, config, N_CONTEXT,
                                       jax.random.key(3), deterministic=True)
    if objective == "none":
        assert float(metrics["retriever_loss"]) == 0.0
        return
    tower = lambda method, ids, mask: np.asarray(models.retriever.apply(  # noqa: E731
        {"params": params["retriever"]}, ids, mask, method=method), np.float64)
    queries = tower(models.retriever.embed_queries, batch["query_ids"], batch["query_mask"])
    passages = tower(models.retriever.embed_passages,
                     batch["passage_ids"].reshape(B * K, LP),
                     batch["passage_mask"].reshape(B * K, LP)).reshape(B, K, -1)
    scores = np.einsum("bd,bkd->bk", queries, passages) / np.sqrt(queries.shape[-1])
    valid = np.asarray(batch["passage_valid"], bool)
    ids = batch["reader_ids"]
    if objective == "adist":           # the masses of the passages the reader read
        signal = adist_masses(models.reader, params["reader"], np.asarray(ids[:, :N_CONTEXT]),
                              np.asarray(batch["decoder_input_ids"]),
                              np.asarray(batch["target_mask"]))
        scores, valid = scores[:, :N_CONTEXT], valid[:, :N_CONTEXT]
    else:
        signal = np.zeros((B, K))
        for b in range(B):
            for k in range(K):
                if objective == "loop":
                    others = [j for j in range(K) if j != k]
                    signal[b, k] = _direct_nll(models, params, ids[b, others], batch, b)
                else:
                    signal[b, k] = -_direct_nll(models, params, ids[b, k:k + 1], batch, b,
                                                normalised=objective == "pdist")
    per_row = []
    for b in range(B):
        keep = valid[b]
        log_retrieval = _log_softmax(scores[b, keep] / tau_score)
        if objective == "emdr2":
            joint = signal[b, keep] + log_retrieval
            per_row.append(-(np.log(np.exp(joint - joint.max()).sum()) + joint.max()))
            continue
        gold = signal[b, keep]
        if objective == "adist":
            gold = gold / gold.sum()                  # each passage's share of the mass
        log_gold = _log_softmax(gold / tau_gold)
        per_row.append(float(np.sum(np.exp(log_gold) * (log_gold - log_retrieval))))
    np.testing.assert_allclose(float(metrics["retriever_loss"]), np.mean(per_row), rtol=1e-4)


def test_query_side_training_freezes_the_passage_tower(setup):
    models, params, batch = setup
    config = objectives.ObjectiveConfig(objective="pdist", temperature_gold=0.5,
                                        temperature_score=0.5)
    frozen = jax.tree.map(jnp.copy, params["retriever"])

    def loss(p, frozen_params):
        return joint_loss.joint_loss(p, batch, models, config, N_CONTEXT, jax.random.key(0),
                                     deterministic=True, frozen_passage_params=frozen_params)[0]
    grads_live, grads_frozen = jax.grad(loss, argnums=(0, 1))(params, frozen)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(grads_frozen))
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads_live["retriever"])) > 0
    # Same parameters, so the same loss as joint training; only the gradient path differs.
    np.testing.assert_allclose(
        float(loss(params, frozen)),
        float(joint_loss.joint_loss(params, batch, models, config, N_CONTEXT,
                                    jax.random.key(0), deterministic=True)[0]), rtol=1e-6)

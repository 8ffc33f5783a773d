"""FiD: passages are encoded independently, padding is masked, the decoder sees all K."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from atlas_jax.models import fid, t5
from tests.adist_reference import adist_masses

CONFIG = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                     num_encoder_layers=2, num_decoder_layers=2,
                     mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                     scale_decoder_outputs=False, dropout_rate=0.0)


def init_fid(config: t5.T5Config):
    """(FiD model, unboxed parameters) of `config`, seed 0."""
    model = fid.FusionInDecoder(config)
    params = model.init(jax.random.key(0), jnp.ones((1, 2, 6), jnp.int32),
                        jnp.ones((1, 3), jnp.int32))["params"]
    return model, meta.unbox(params)


@pytest.fixture(scope="module")
def model_and_params():
    return init_fid(CONFIG)


def _passages(seed=0, batch=2, k=3, length=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 64, size=(batch, k, length)).astype(np.int32)
    ids[:, 1, 6:] = 0  # passage 1 padded
    return ids


def test_each_passage_encoded_as_if_alone(model_and_params):
    model, params = model_and_params
    ids = _passages()
    encoded, mask = model.apply({"params": params}, ids, method=model.encode_passages)
    assert encoded.shape == (2, 30, 32) and mask.shape == (2, 30)
    for b in range(2):
        for k in range(3):
            alone = model.apply({"params": params}, ids[b, k][None], method=model.encode)[0]
            np.testing.assert_allclose(encoded[b, k * 10:(k + 1) * 10], alone, atol=1e-5)
    np.testing.assert_array_equal(mask, (ids != 0).reshape(2, 30))


def test_padding_in_one_passage_does_not_change_another(model_and_params):
    model, params = model_and_params
    ids = _passages()
    longer_pad = ids.copy()
    longer_pad[:, 1, 3:] = 0
    a, _ = model.apply({"params": params}, ids, method=model.encode_passages)
    b, _ = model.apply({"params": params}, longer_pad, method=model.encode_passages)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)   # passage 0
    np.testing.assert_allclose(a[:, 20:], b[:, 20:], atol=1e-6)   # passage 2
    # and the states at pad positions never reach the decoder
    encoded, mask = model.apply({"params": params}, ids, method=model.encode_passages)
    decoder_ids = np.ones((2, 4), np.int32)
    noise = jnp.where(mask[..., None], 0.0, 100.0 * jax.random.normal(jax.random.key(1),
                                                                       encoded.shape))
    clean = model.apply({"params": params}, encoded, mask, decoder_ids, method=model.decode)
    noisy = model.apply({"params": params}, encoded + noise, mask, decoder_ids,
                        method=model.decode)
    np.testing.assert_allclose(clean, noisy, atol=1e-5)


def test_decoder_sees_every_passage(model_and_params):
    model, params = model_and_params
    ids = _passages()
    decoder_ids = np.ones((2, 4), np.int32)
    base = model.apply({"params": params}, ids, decoder_ids)
    for k in range(3):
        changed = ids.copy()
        changed[:, k, :3] = (changed[:, k, :3] + 7) % 60 + 2
        assert np.abs(model.apply({"params": params}, changed, decoder_ids) - base).max() > 1e-3


def test_cross_attention_passage_scores(model_and_params):
    model, params = model_and_params
    ids = _passages()
    decoder_ids = np.ones((2, 4), np.int32)
    logits, state = model.apply({"params": params}, ids, decoder_ids,
                                mutable=["intermediates"])
    np.testing.assert_allclose(logits, model.apply({"params": params}, ids, decoder_ids),
                               atol=1e-6)
    scores = fid.cross_attention_passage_scores(state["intermediates"], 3)
    assert scores.shape == (2, 3) and bool(jnp.all(scores > 0))
    # A passage made entirely of padding receives no attention at all.
    empty = ids.copy()
    empty[:, 2] = 0
    _, state = model.apply({"params": params}, empty, decoder_ids, mutable=["intermediates"])
    masked = fid.cross_attention_passage_scores(state["intermediates"], 3)
    np.testing.assert_allclose(masked[:, 2], 0.0, atol=1e-6)
    # The target mask removes padded target positions from the sum.
    half = fid.cross_attention_passage_scores(state["intermediates"], 3,
                                              jnp.array([[1, 1, 0, 0]] * 2))
    assert bool(jnp.all(half[:, :2] < masked[:, :2]))
    with pytest.raises(ValueError, match="mutable"):
        fid.cross_attention_passage_scores({}, 3)


def test_adist_counts_a_copy_heads_pointer_as_one_more_layer():
    """With `copy_head`, the pointer (copy probability x pointer distribution) is sown too and
    joins the ADist masses as one more layer, scaled to the layers' mean mass per example;
    a padded passage still gets nothing."""
    import dataclasses
    model, params = init_fid(dataclasses.replace(CONFIG, copy_head=True))
    ids = _passages(seed=5)
    ids[:, 2] = 0                                     # passage 2 all padding
    decoder_ids = np.random.default_rng(6).integers(1, 64, (2, 4)).astype(np.int32)
    target_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
    logits, state = model.apply({"params": params}, ids, decoder_ids, mutable=["intermediates"])
    inter = state["intermediates"]
    pointer = np.asarray(inter["decoder"]["copy_head"]["copy_pointer_scores"][0], np.float64)
    log_p = np.asarray(logits, np.float64)
    assert pointer.shape == (2, 4, 30) and np.all(pointer.sum(-1) < 1 + 1e-5)
    np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, rtol=1e-5)  # normalised output
    layers_only = {"decoder": {k: v for k, v in inter["decoder"].items() if k != "copy_head"}}
    masses = np.asarray(fid.cross_attention_passage_scores(layers_only, 3, target_mask))
    copied = (pointer * target_mask[..., None]).sum(1).reshape(2, 3, 10).sum(-1)
    expected = masses + copied / copied.sum(-1, keepdims=True) * masses.sum(-1, keepdims=True) / 2
    got = np.asarray(fid.cross_attention_passage_scores(inter, 3, target_mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.all(got[:, 2] == 0) and np.all(got[:, :2] > masses[:, :2])


def test_cross_attention_passage_scores_equal_an_independent_computation(model_and_params):
    """The ADist masses against a float64 numpy re-computation from the attention inputs
    (tests/adist_reference.py): probability x |value|, over heads, layers, target tokens."""
    model, params = model_and_params
    ids = _passages(seed=3)
    decoder_ids = np.random.default_rng(4).integers(1, 64, (2, 5)).astype(np.int32)
    target_mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.int32)
    _, state = model.apply({"params": params}, ids, decoder_ids, mutable=["intermediates"])
    got = fid.cross_attention_passage_scores(state["intermediates"], 3, jnp.asarray(target_mask))
    expected = adist_masses(model, params, ids, decoder_ids, target_mask)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5)

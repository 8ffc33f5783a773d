"""The XLA:CPU performance forms in `layers` compute what the plain forms do."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.models import layers


def _shared_bias_case(batch=3, heads=2, q=5, k=7):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(batch, heads, q, k)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, heads, q, k)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(batch, heads, q, k)), jnp.float32)
    return logits, bias, weights


def test_shared_bias_add_value_and_gradients():
    logits, bias, weights = _shared_bias_case()

    def loss(add, logits, bias):
        return jnp.sum(jnp.tanh(add(logits, bias)) * weights)

    plain = lambda x, b: x + b  # noqa: E731
    np.testing.assert_array_equal(layers.add_bias(logits, bias), plain(logits, bias))
    ours = jax.jit(jax.value_and_grad(lambda x, b: loss(layers.add_bias, x, b), (0, 1)))
    ref = jax.jit(jax.value_and_grad(lambda x, b: loss(plain, x, b), (0, 1)))
    (value, (g_logits, g_bias)), (ref_value, (ref_logits, ref_bias)) = ours(logits, bias), \
        ref(logits, bias)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(g_logits, ref_logits, rtol=1e-6, atol=1e-7)
    assert g_bias.shape == bias.shape
    np.testing.assert_allclose(g_bias, ref_bias, rtol=1e-5, atol=1e-6)


def test_shared_bias_add_falls_back_for_other_shapes():
    logits, bias, _ = _shared_bias_case()
    for other in (bias[:, :1], bias[0], jnp.broadcast_to(bias, logits.shape),
                  bias.astype(jnp.bfloat16)):
        np.testing.assert_allclose(layers.add_bias(logits, other), logits + other, rtol=1e-6)
        g = jax.grad(lambda b: jnp.sum(layers.add_bias(logits, b) ** 2))(other)
        ref = jax.grad(lambda b: jnp.sum((logits + b) ** 2))(other)
        np.testing.assert_allclose(np.float32(g), np.float32(ref), rtol=1e-5)


def test_dense_on_3d_input_equals_einsum():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    dense = layers.Dense(5, ("embed", "mlp"), use_bias=True)
    params = dense.init(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # non-zero bias
    kernel = nn.unbox(params["params"]["kernel"])
    bias = nn.unbox(params["params"]["bias"])
    y = dense.apply(params, x)
    assert y.shape == (2, 3, 5)
    np.testing.assert_allclose(y, jnp.einsum("bld,df->blf", x, kernel) + bias,
                               rtol=1e-5, atol=1e-6)
    # Gradients too (the backward of the flattened dot).
    g = jax.grad(lambda p, x: jnp.sum(jnp.sin(dense.apply(p, x))), (0, 1))(params, x)
    g_ref = jax.grad(lambda k, x: jnp.sum(jnp.sin(jnp.einsum("bld,df->blf", x, k) + bias)),
                     (0, 1))(kernel, x)
    np.testing.assert_allclose(nn.unbox(g[0]["params"]["kernel"]), g_ref[0], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-5, atol=1e-6)


def test_embed_attend_on_3d_query_equals_einsum():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    embed = layers.Embed(11, 8)
    params = embed.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32))
    table = nn.unbox(params["params"]["embedding"])
    out = embed.apply(params, q, method=layers.Embed.attend)
    np.testing.assert_allclose(out, jnp.einsum("bld,vd->blv", q, table), rtol=1e-5, atol=1e-5)

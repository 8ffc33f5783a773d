"""Building blocks shared by the T5 reader and the BERT retriever.

Every parameter is declared with logical axis names (t5x convention) so that one table of
rules in `atlas_jax.partitioning` places it on the ('data', 'model') mesh.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: Sequence[str]) -> jax.Array:
    """Declares a float32 parameter annotated with logical axis names; returns it unboxed."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                        jnp.float32)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation by name: t5x names ('relu', 'gelu' = tanh approximation, 'linear') plus
    'gelu_exact' (erf, BERT and HF T5 'gelu') and 'silu'."""
    table = {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
        "silu": jax.nn.silu,
        "linear": lambda x: x,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(table)}")
    return table[name]


def dot_2d(inputs: jax.Array, kernel: jax.Array) -> jax.Array:
    """`jnp.dot(inputs, kernel)` for a 2-D kernel, with inputs of rank > 2 flattened to
    (prod(leading dims), features) and the result reshaped back: XLA:CPU runs 2-D x 2-D dots,
    and especially their backward, much faster than batched 3-D x 2-D ones."""
    if inputs.ndim <= 2:
        return jnp.dot(inputs, kernel)
    leading = inputs.shape[:-1]
    y = jnp.dot(inputs.reshape(math.prod(leading), inputs.shape[-1]), kernel)
    return y.reshape(leading + kernel.shape[-1:])


class Dense(nn.Module):
    """Dense layer over the last axis with a logically-annotated (in, out) kernel."""
    features: int
    kernel_axes: tuple[str, str]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = param_with_axes(self, "kernel", self.kernel_init,
                                 (inputs.shape[-1], self.features), self.kernel_axes)
        y = dot_2d(inputs.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                                   self.kernel_axes[-1:])
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """Token embedding table (vocab, embed); `attend` gives logits against the same table."""
    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    axes: tuple[str, str] = ("vocab", "embed")
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = param_with_axes(self, "embedding", self.embedding_init,
                                         (self.num_embeddings, self.features), self.axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, query: jax.Array) -> jax.Array:
        return dot_2d(query.astype(self.dtype), self.embedding.astype(self.dtype).T)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + self.epsilon)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """BERT layer norm (mean and variance, scale and bias), statistics in float32."""
    epsilon: float = 1e-12
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(variance + self.epsilon)
        return (y * scale + bias).astype(self.dtype)


@jax.custom_vjp
def _add_batch_shared_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """`logits + bias` for bias (1, ...) shared across logits' batch (B, ...) of the same dtype.
    Its bias cotangent, the sum of the logits cotangent over the batch, is a ones(1, B) matmul:
    XLA:CPU runs that reduce (T5's relative-position bias gradient) much slower."""
    return logits + bias


def _add_batch_shared_bias_fwd(logits, bias):
    return logits + bias, None


def _add_batch_shared_bias_bwd(_, g):
    batch = g.shape[0]
    ones = jnp.ones((1, batch), g.dtype)
    g_bias = jnp.dot(ones, g.reshape(batch, -1), precision=jax.lax.Precision.HIGHEST)
    return g, g_bias.reshape((1,) + g.shape[1:])


_add_batch_shared_bias.defvjp(_add_batch_shared_bias_fwd, _add_batch_shared_bias_bwd)


def add_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """`logits + bias`; through `_add_batch_shared_bias` when bias is logits' shape but for a
    batch of 1 (broadcast over the batch) and of the same dtype, else the plain add."""
    if (bias.ndim == logits.ndim >= 1 and bias.dtype == logits.dtype and bias.shape[0] == 1
            and logits.shape[0] > 1 and bias.shape[1:] == logits.shape[1:]):
        return _add_batch_shared_bias(logits, bias)
    return logits + bias


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          bias: jax.Array | None, mask: jax.Array | None,
                          dropout: Callable[[jax.Array], jax.Array],
                          scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Softmax attention with logits in float32.

    Args:
      query: (batch, q_length, heads, head_dim); key, value: (batch, kv_length, heads, head_dim).
      bias: broadcastable to (batch, heads, q_length, kv_length), added to the logits.
      mask: boolean, broadcastable to (batch, heads, q_length, kv_length); False is masked.
      dropout: applied to the attention probabilities.
    Returns:
      (output (batch, q_length, heads, head_dim), probabilities (batch, heads, q, kv) float32).
    """
    # Heads-major (batch, heads, length, head_dim) operands: XLA:CPU runs these batched
    # matmuls ~1.2x faster than the length-major einsum (bench/embed.py); TPU/GPU re-layout
    # either form.
    query, key, value = (jnp.swapaxes(t, 1, 2) for t in (query, key, value))
    logits = jnp.einsum("bhqd,bhkd->bhqk", query, key,
                        preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = add_bias(logits, bias.astype(jnp.float32))
    if mask is not None:
        logits = jnp.where(mask, logits, np.finfo(np.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    output = jnp.einsum("bhqk,bhkd->bhqd", dropout(probs).astype(value.dtype), value)
    return jnp.swapaxes(output, 1, 2), probs

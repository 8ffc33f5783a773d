"""T5 encoder-decoder in Flax linen with t5x parameter names and logical axes.

Covers T5 v1.0 (ReLU MLP, output layer tied to the embedding, decoder output scaled by
d_model^-0.5) and v1.1 / lm-adapt (gated-GELU MLP, untied `logits_dense`, no scaling).
Parameter tree (t5x names, so t5x and Hugging Face checkpoints map on by name):

  token_embedder/embedding                                  (vocab, embed)
  encoder/relpos_bias/rel_embedding                         (heads, relpos_buckets)
  encoder/layers_N/{pre_attention_layer_norm, attention/{query,key,value,out}, pre_mlp_layer_norm,
                    mlp/{wi | wi_0, wi_1, wo}}
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_N/{pre_self_attention_layer_norm, self_attention, pre_cross_attention_layer_norm,
                    encoder_decoder_attention, pre_mlp_layer_norm, mlp}
  decoder/decoder_norm/scale, decoder/logits_dense/kernel (untied only)

With `scan_layers` each stack is one `nn.scan` over stacked parameters `encoder/layers/...`,
`decoder/layers/...` with a leading (layers) axis (models/stacking.py converts both ways);
`remat` picks the rematerialisation policy of every layer (stacking.REMAT_POLICIES).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.models import layers, stacking


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
    """Reader hyper-parameters (field names follow t5x's T5Config)."""
    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    head_dim: int = 64
    mlp_dim: int = 2048
    mlp_activations: Sequence[str] = ("relu",)
    dropout_rate: float = 0.1
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    logits_via_embedding: bool = True
    scale_decoder_outputs: bool = True
    dtype: str = "float32"
    # Rematerialisation policy of each layer: False/'none', True/'full', 'save_dots',
    # 'save_dots_no_batch' (models/stacking.remat_policy).
    remat: bool | str = False
    # One nn.scan over stacked layer parameters: compile time flat in depth (t5x, maxtext).
    scan_layers: bool = False
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0
    # Pointer-generator output (not T5, not in Hugging Face): see `CopyHead`.
    copy_head: bool = False
    # With a copy head in a FiD reader: the pointer skips each passage row through the last
    # occurrence of this id (the prompt's `<extra_id_0>` in `question: {q} answer:
    # <extra_id_0> title: ... context: ...`), so it copies from the evidence and not from
    # the question; rows with no evidence (closed book) keep their question. None: copy
    # from the whole row (`fid.copy_source_ids`).
    copy_skip_through_id: int | None = None

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """T5's bucketing of (memory position - query position): exact below num_buckets/2 (or /4
    each way when bidirectional), logarithmic up to max_distance."""
    bucket = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).astype(np.int32) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    safe = np.maximum(relative_position, 1).astype(np.float32)  # log(0) lands in is_small
    large = max_exact + (np.log(safe / max_exact)
                         / np.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return bucket + np.where(is_small, relative_position, large)


class RelativePositionBiases(nn.Module):
    """Learned per-head bias for each relative-position bucket."""
    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q_length: int, k_length: int, bidirectional: bool) -> jax.Array:
        """Returns the bias (1, heads, q_length, k_length)."""
        context = np.arange(q_length, dtype=np.int32)[:, None]
        memory = np.arange(k_length, dtype=np.int32)[None, :]
        buckets = relative_position_bucket(memory - context, bidirectional, self.num_buckets,
                                           self.max_distance)
        table = layers.param_with_axes(
            self, "rel_embedding", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
        values = jnp.take(table.astype(self.dtype), jnp.asarray(buckets), axis=1)  # (H, q, k)
        return values[None]


class MultiHeadAttention(nn.Module):
    """T5 attention (no 1/sqrt(d) scaling: it is folded into the query initialiser).

    In `decode` mode self-attention keeps keys/values in the 'cache' collection and attends
    causally up to `cache_index`; cross-attention projects the encoder states once into the
    cache and reuses them at every step.
    """
    num_heads: int
    head_dim: int
    dropout_rate: float
    dtype: jnp.dtype
    is_cross_attention: bool = False

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None, bias: jax.Array | None,
                 mask: jax.Array | None, *, deterministic: bool, decode: bool = False):
        features = self.num_heads * self.head_dim
        kernel_init = layers.default_kernel_init
        query_init = lambda *a: kernel_init(*a) / np.sqrt(self.head_dim)  # noqa: E731
        project = lambda name, init=kernel_init: layers.Dense(  # noqa: E731
            features, ("embed", "joined_kv"), dtype=self.dtype, kernel_init=init, name=name)
        split = lambda x: x.reshape(x.shape[:2] + (self.num_heads, self.head_dim))  # noqa: E731
        query = split(project("query", query_init)(inputs_q))
        key_projection, value_projection = project("key"), project("value")
        if decode and self.is_cross_attention:
            # Projected once from the encoder states when the cache is created, then reused.
            key = self.variable("cache", "cached_key",
                                lambda: split(key_projection(inputs_kv))).value
            value = self.variable("cache", "cached_value",
                                  lambda: split(value_projection(inputs_kv))).value
        else:
            key = split(key_projection(inputs_kv))
            value = split(value_projection(inputs_kv))

        if decode and not self.is_cross_attention:
            initialized = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                         value.dtype)
            cache_index = self.variable("cache", "cache_index",
                                        lambda: jnp.array(0, dtype=jnp.int32))
            if initialized:  # one step: write this position, attend to every earlier one
                index = cache_index.value
                max_length = cached_key.value.shape[1]
                key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
                value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
                cached_key.value, cached_value.value = key, value
                cache_index.value = index + 1
                mask = (jnp.arange(max_length) <= index)[None, None, None, :]
                bias = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=-2)

        dropout = nn.Dropout(self.dropout_rate, deterministic=deterministic)
        out, probs = layers.dot_product_attention(query, key, value, bias, mask, dropout)
        if self.is_cross_attention and self.is_mutable_collection("intermediates"):
            # ADist: attention probability x |value|, summed over heads -> (batch, q, kv).
            value_norm = jnp.linalg.norm(value.astype(jnp.float32), axis=-1)  # (b, kv, h)
            self.sow("intermediates", "cross_attention_scores",
                     jnp.einsum("bhqk,bkh->bqk", probs, value_norm))
        out = out.reshape(out.shape[:2] + (features,))
        return layers.Dense(inputs_q.shape[-1], ("joined_kv", "embed"), dtype=self.dtype,
                            name="out")(out)


class MlpBlock(nn.Module):
    """Position-wise MLP; several activations give the gated form (t5x `wi_0`, `wi_1`)."""
    mlp_dim: int
    activations: Sequence[str]
    dropout_rate: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        hidden = None
        for i, name in enumerate(self.activations):
            dense_name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            h = layers.activation(name)(layers.Dense(self.mlp_dim, ("embed", "mlp"),
                                                     dtype=self.dtype, name=dense_name)(x))
            hidden = h if hidden is None else hidden * h
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(self.dropout_rate, deterministic=deterministic)(hidden)
        return layers.Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(hidden)


def _attention(config: T5Config, name: str, cross: bool = False) -> MultiHeadAttention:
    return MultiHeadAttention(config.num_heads, config.head_dim, config.dropout_rate,
                              config.compute_dtype, is_cross_attention=cross, name=name)


def _norm(config: T5Config, name: str) -> layers.RMSNorm:
    return layers.RMSNorm(config.layer_norm_epsilon, config.compute_dtype, name=name)


def _mlp(config: T5Config) -> MlpBlock:
    return MlpBlock(config.mlp_dim, tuple(config.mlp_activations), config.dropout_rate,
                    config.compute_dtype, name="mlp")


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, bias, mask, deterministic):
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        h = _norm(cfg, "pre_attention_layer_norm")(x)
        h = _attention(cfg, "attention")(h, h, bias, mask, deterministic=deterministic)
        x = x + dropout(h)
        h = _mlp(cfg)(_norm(cfg, "pre_mlp_layer_norm")(x), deterministic)
        x = x + dropout(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if cfg.scan_layers else x


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, encoded, self_bias, self_mask, cross_mask, deterministic, decode):
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        h = _norm(cfg, "pre_self_attention_layer_norm")(x)
        h = _attention(cfg, "self_attention")(h, h, self_bias, self_mask,
                                              deterministic=deterministic, decode=decode)
        x = x + dropout(h)
        h = _norm(cfg, "pre_cross_attention_layer_norm")(x)
        h = _attention(cfg, "encoder_decoder_attention", cross=True)(
            h, encoded, None, cross_mask, deterministic=deterministic, decode=decode)
        x = x + dropout(h)
        h = _mlp(cfg)(_norm(cfg, "pre_mlp_layer_norm")(x), deterministic)
        x = x + dropout(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if cfg.scan_layers else x


class CopyHead(nn.Module):
    """Pointer-generator output layer (See et al., 2017, "Get To The Point"), optional.

    p(y) = g * softmax(logits)(y) + (1 - g) * sum_{s: source_id[s] = y} a(s), where a is one
    attention distribution of the decoder's final state over the encoder states (all FiD
    passages together) and g = sigmoid(w . state). A small reader trained from scratch learns
    to *point* at a number in the evidence far sooner than to route its identity through
    cross-attention values into the vocabulary projection, which is what a plain T5 must do.

    Returns log p (batch, length, vocab) as float32 "logits": every consumer applies
    log_softmax, which leaves normalised log-probabilities unchanged. Parameters:
    decoder/copy_head/{query, key, gate}/kernel. In decode mode the projected keys are cached
    like the cross-attention keys.
    """
    config: T5Config

    @nn.compact
    def __call__(self, x, encoded, encoder_mask, encoder_ids, logits, decode: bool):
        cfg = self.config
        dim = cfg.head_dim
        query_init = lambda *a: layers.default_kernel_init(*a) / np.sqrt(dim)  # noqa: E731
        query = layers.Dense(dim, ("embed", "kv"), dtype=cfg.compute_dtype, kernel_init=query_init,
                             name="query")(x)
        key_projection = layers.Dense(dim, ("embed", "kv"), dtype=cfg.compute_dtype, name="key")
        if decode:
            key = self.variable("cache", "cached_key", lambda: key_projection(encoded)).value
        else:
            key = key_projection(encoded)
        scores = jnp.einsum("btd,bsd->bts", query, key).astype(jnp.float32)
        # Pad ids are not copied: `fid.copy_source_ids` marks skipped positions with them.
        copyable = encoder_mask & (encoder_ids != cfg.pad_id)
        scores = jnp.where(copyable[:, None, :], scores, -1e9)
        pointer = jax.nn.softmax(scores, axis=-1)  # (batch, length, source)
        vocab = logits.shape[-1]
        copy = jax.vmap(lambda a, ids: jnp.zeros((a.shape[0], vocab), jnp.float32)
                        .at[:, ids].add(a))(pointer, encoder_ids)
        gate = layers.Dense(1, ("embed", "kv"), dtype=cfg.compute_dtype, name="gate")(x)
        gate = gate.astype(jnp.float32)
        if self.is_mutable_collection("intermediates"):
            # ADist: the share of each output token's probability copied from each source
            # token (copy probability x pointer) -> (batch, length, source).
            self.sow("intermediates", "copy_pointer_scores", jax.nn.sigmoid(-gate) * pointer)
        return jnp.logaddexp(jax.nn.log_sigmoid(gate) + jax.nn.log_softmax(logits, axis=-1),
                             jax.nn.log_sigmoid(-gate) + jnp.log(jnp.maximum(copy, 1e-30)))


def _relpos(config: T5Config) -> RelativePositionBiases:
    return RelativePositionBiases(config.relative_attention_num_buckets,
                                  config.relative_attention_max_distance, config.num_heads,
                                  config.compute_dtype, name="relpos_bias")


class Encoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, input_ids: jax.Array, deterministic: bool) -> jax.Array:
        """input_ids (batch, length) with pad id masked -> states (batch, length, embed)."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        x = dropout(self.shared_embedding(input_ids))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        length = input_ids.shape[-1]
        bias = _relpos(cfg)(length, length, bidirectional=True)
        mask = (input_ids != cfg.pad_id)[:, None, None, :]
        layer_cls = stacking.layer_stack(EncoderLayer, remat=cfg.remat, scan=cfg.scan_layers,
                                         length=cfg.num_encoder_layers, static_argnums=(4,),
                                         broadcast_args=3)
        if cfg.scan_layers and cfg.num_encoder_layers:
            x, _ = layer_cls(cfg, name="layers")(x, bias, mask, deterministic)
        elif not cfg.scan_layers:
            for i in range(cfg.num_encoder_layers):
                x = layer_cls(cfg, name=f"layers_{i}")(x, bias, mask, deterministic)
        return dropout(_norm(cfg, "encoder_norm")(x))


class Decoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded: jax.Array, encoder_mask: jax.Array, decoder_input_ids: jax.Array,
                 deterministic: bool, decode: bool = False,
                 max_decode_length: int | None = None,
                 encoder_ids: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits (batch, length, vocab), or one step in `decode` mode.

        encoded: (batch, source_length, embed); encoder_mask: (batch, source_length) bool.
        In decode mode decoder_input_ids is (batch, 1) and the self-attention cache must have
        been created by a first call with (batch, max_decode_length) ids. encoder_ids
        (batch, source_length), the source tokens, are needed only with `copy_head`.
        """
        cfg = self.config
        if cfg.copy_head and encoder_ids is None:
            raise ValueError("T5Config.copy_head: the decoder needs encoder_ids (the source "
                             "tokens it may copy)")
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        x = dropout(self.shared_embedding(decoder_input_ids))
        length = max_decode_length if decode else decoder_input_ids.shape[-1]
        self_bias = _relpos(cfg)(length, length, bidirectional=False)
        self_mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        cross_mask = encoder_mask[:, None, None, :]
        layer_cls = stacking.layer_stack(DecoderLayer, remat=cfg.remat, scan=cfg.scan_layers,
                                         length=cfg.num_decoder_layers, static_argnums=(6, 7),
                                         broadcast_args=6)
        args = (encoded, self_bias, self_mask, cross_mask, deterministic, decode)
        if cfg.scan_layers and cfg.num_decoder_layers:
            x, _ = layer_cls(cfg, name="layers")(x, *args)
        elif not cfg.scan_layers:
            for i in range(cfg.num_decoder_layers):
                x = layer_cls(cfg, name=f"layers_{i}")(x, *args)
        x = dropout(_norm(cfg, "decoder_norm")(x))
        state = x
        if cfg.scale_decoder_outputs:
            x = x * (cfg.emb_dim ** -0.5)
        if cfg.logits_via_embedding:
            logits = self.shared_embedding.attend(x)
        else:
            logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype,
                                  name="logits_dense")(x)
        if cfg.copy_head:
            logits = CopyHead(cfg, name="copy_head")(state, encoded, encoder_mask, encoder_ids,
                                                     logits.astype(jnp.float32), decode)
        return nn.with_logical_constraint(logits.astype(jnp.float32),
                                          ("batch", "length", "vocab"))


class Transformer(nn.Module):
    """T5 encoder-decoder: `encode`, `decode` and teacher-forced `__call__`."""
    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, cfg.compute_dtype)
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_ids: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.encoder(encoder_input_ids, deterministic)

    def decode(self, encoded, encoder_mask, decoder_input_ids, deterministic: bool = True,
               decode: bool = False, max_decode_length: int | None = None,
               encoder_ids: jax.Array | None = None):
        return self.decoder(encoded, encoder_mask, decoder_input_ids, deterministic, decode,
                            max_decode_length, encoder_ids)

    def __call__(self, encoder_input_ids: jax.Array, decoder_input_ids: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        encoded = self.encode(encoder_input_ids, deterministic)
        return self.decode(encoded, encoder_input_ids != self.config.pad_id, decoder_input_ids,
                           deterministic, encoder_ids=encoder_input_ids)


def shift_right(targets: jax.Array, decoder_start_id: int = 0) -> jax.Array:
    """Decoder inputs from targets: start token, then targets without the last position."""
    return jnp.concatenate(
        [jnp.full(targets.shape[:-1] + (1,), decoder_start_id, targets.dtype), targets[..., :-1]],
        axis=-1)

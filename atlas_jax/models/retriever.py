"""BERT-family dual encoder (Contriever, MiniLM / sentence-transformers).

Parameter tree of one tower (`encoder/...` when the towers are tied, `query_encoder/...` and
`passage_encoder/...` when untied):

  token_embedder/embedding (vocab, embed), position_embedder/embedding (abspos_buckets, embed),
  segment_embedder/embedding (segments, embed), embeddings_norm/{scale,bias},
  layers_N/attention/{query,key,value,out}/{kernel,bias}, layers_N/post_attention_layer_norm,
  layers_N/{wi,wo}/{kernel,bias}, layers_N/post_mlp_layer_norm
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.models import layers


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    """Dual-encoder hyper-parameters (BERT field meanings)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_epsilon: float = 1e-12
    hidden_act: str = "gelu_exact"
    dropout_rate: float = 0.1
    pooling: str = "mean"          # 'mean' (masked) or 'cls'
    normalize: bool = False        # L2-normalise the pooled embedding
    shared_towers: bool = True     # one encoder for queries and passages
    max_length: int = 512          # tokenizer truncation length
    dtype: str = "float32"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def embedding_dim(self) -> int:
        return self.hidden_size


class BertAttention(nn.Module):
    config: RetrieverConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_heads
        project = lambda name: layers.Dense(  # noqa: E731
            cfg.hidden_size, ("embed", "joined_kv"), use_bias=True, dtype=cfg.compute_dtype,
            name=name)
        split = lambda t: t.reshape(t.shape[:2] + (cfg.num_heads, head_dim))  # noqa: E731
        query, key, value = (split(project(name)(x)) for name in ("query", "key", "value"))
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        out, _ = layers.dot_product_attention(query, key, value, None, mask, dropout,
                                              scale=head_dim ** -0.5)
        out = out.reshape(out.shape[:2] + (cfg.hidden_size,))
        return layers.Dense(cfg.hidden_size, ("joined_kv", "embed"), use_bias=True,
                            dtype=cfg.compute_dtype, name="out")(out)


class BertLayer(nn.Module):
    """Post-LN transformer layer (BERT)."""
    config: RetrieverConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        h = BertAttention(cfg, name="attention")(x, mask, deterministic)
        x = layers.LayerNorm(cfg.layer_norm_epsilon, dtype, name="post_attention_layer_norm")(
            x + dropout(h))
        h = layers.Dense(cfg.mlp_dim, ("embed", "mlp"), use_bias=True, dtype=dtype,
                         name="wi")(x)
        h = layers.activation(cfg.hidden_act)(nn.with_logical_constraint(
            h, ("batch", "length", "mlp")))
        h = layers.Dense(cfg.hidden_size, ("mlp", "embed"), use_bias=True, dtype=dtype,
                         name="wo")(h)
        x = layers.LayerNorm(cfg.layer_norm_epsilon, dtype, name="post_mlp_layer_norm")(
            x + dropout(h))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class BertEncoder(nn.Module):
    """One tower: token ids (batch, length) and mask -> pooled embedding (batch, hidden)."""
    config: RetrieverConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        init = nn.initializers.normal(0.02)
        tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype, embedding_init=init,
                              name="token_embedder")(input_ids)
        positions = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype,
                                 axes=("abspos_buckets", "embed"), embedding_init=init,
                                 name="position_embedder")(jnp.arange(length)[None])
        segments = layers.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype,
                                axes=("segments", "embed"), embedding_init=init,
                                name="segment_embedder")(jnp.zeros_like(input_ids))
        x = layers.LayerNorm(cfg.layer_norm_epsilon, dtype, name="embeddings_norm")(
            tokens + positions + segments)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        mask = attention_mask.astype(bool)[:, None, None, :]
        for i in range(cfg.num_layers):
            x = BertLayer(cfg, name=f"layers_{i}")(x, mask, deterministic)
        return pool(x, attention_mask, cfg.pooling, cfg.normalize)


def pool(states: jax.Array, attention_mask: jax.Array, pooling: str, normalize: bool) -> jax.Array:
    """Masked mean or CLS pooling of (batch, length, hidden) states, float32 out."""
    states = states.astype(jnp.float32)
    if pooling == "mean":
        weights = attention_mask.astype(jnp.float32)[..., None]
        pooled = (states * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)
    elif pooling == "cls":
        pooled = states[:, 0]
    else:
        raise ValueError(f"unknown pooling {pooling!r}: use 'mean' or 'cls'")
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


class DualEncoder(nn.Module):
    """Query and passage towers, tied (`encoder`) or untied (`query_encoder`,
    `passage_encoder`) per `config.shared_towers`."""
    config: RetrieverConfig

    def setup(self):
        if self.config.shared_towers:
            self.encoder = BertEncoder(self.config)
        else:
            self.query_encoder = BertEncoder(self.config)
            self.passage_encoder = BertEncoder(self.config)

    def embed_queries(self, input_ids, attention_mask, deterministic: bool = True):
        tower = self.encoder if self.config.shared_towers else self.query_encoder
        return tower(input_ids, attention_mask, deterministic)

    def embed_passages(self, input_ids, attention_mask, deterministic: bool = True):
        tower = self.encoder if self.config.shared_towers else self.passage_encoder
        return tower(input_ids, attention_mask, deterministic)

    def __call__(self, query_ids, query_mask, passage_ids, passage_mask,
                 deterministic: bool = True):
        """Returns (query embeddings (B, D), passage embeddings (N, D))."""
        return (self.embed_queries(query_ids, query_mask, deterministic),
                self.embed_passages(passage_ids, passage_mask, deterministic))


def untie_params(shared_params: dict) -> dict:
    """Tied-tower parameters -> untied ones, both towers starting from the same weights."""
    tower = shared_params["encoder"]
    return {"query_encoder": tower, "passage_encoder": jax.tree.map(np.array, tower)}

"""Dual encoders: BERT-family towers (Contriever, MiniLM / sentence-transformers) or T5-encoder
towers (t5x_retrieval's GTR / sentence-T5: `architecture='t5'`, see `T5EncoderTower`).

Parameter tree of one tower (`encoder/...` when the towers are tied, `query_encoder/...` and
`passage_encoder/...` when untied):

  token_embedder/embedding (vocab, embed), position_embedder/embedding (abspos_buckets, embed),
  segment_embedder/embedding (segments, embed), embeddings_norm/{scale,bias},
  layers_N/attention/{query,key,value,out}/{kernel,bias}, layers_N/post_attention_layer_norm,
  layers_N/{wi,wo}/{kernel,bias}, layers_N/post_mlp_layer_norm
  (with `scan_layers`: `layers/...` stacked on a leading layer axis, models/stacking.py)

and of a T5-encoder tower (t5x_retrieval's names, so its checkpoints load without mapping):

  token_embedder/embedding, encoder/{layers_N/..., relpos_bias/rel_embedding, encoder_norm},
  projection_layer/kernel (embed, projection)
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.models import layers, stacking, t5


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
    # Rematerialisation policy of each tower layer (models/stacking.remat_policy) and one
    # nn.scan over stacked layer parameters `layers/...`, as T5Config's.
    remat: bool | str = False
    scan_layers: bool = False
    # 'bert', or 't5': a T5 encoder, mean pooling, projection, L2 norm (t5x_retrieval);
    # the fields below are the T5 tower's (hidden_size is its emb_dim).
    architecture: str = "bert"
    head_dim: int = 64
    mlp_activations: tuple[str, ...] = ("relu",)
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    projection_dim: int = 768

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def embedding_dim(self) -> int:
        return self.projection_dim if self.architecture == "t5" else self.hidden_size

    def t5_config(self):
        """The T5Config of a T5-encoder tower (no decoder)."""
        return t5.T5Config(
            vocab_size=self.vocab_size, emb_dim=self.hidden_size, num_heads=self.num_heads,
            num_encoder_layers=self.num_layers, num_decoder_layers=0, head_dim=self.head_dim,
            mlp_dim=self.mlp_dim, mlp_activations=tuple(self.mlp_activations),
            dropout_rate=self.dropout_rate,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            layer_norm_epsilon=self.layer_norm_epsilon, dtype=self.dtype, remat=self.remat,
            scan_layers=self.scan_layers)


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
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if cfg.scan_layers else x


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
        layer_cls = stacking.layer_stack(BertLayer, remat=cfg.remat, scan=cfg.scan_layers,
                                         length=cfg.num_layers, static_argnums=(3,),
                                         broadcast_args=2)
        if cfg.scan_layers and cfg.num_layers:
            x, _ = layer_cls(cfg, name="layers")(x, mask, deterministic)
        elif not cfg.scan_layers:
            for i in range(cfg.num_layers):
                x = layer_cls(cfg, name=f"layers_{i}")(x, mask, deterministic)
        return pool(x, attention_mask, cfg.pooling, cfg.normalize)


class T5EncoderTower(nn.Module):
    """t5x_retrieval's dual-encoder tower (flaxformer DualEncoder.encode), in its order: T5
    encoder over the tokens, mean pooling over tokens > 0, projection without bias, then
    L2 normalisation x * rsqrt(sum x^2 + 1e-6) in float32."""
    config: RetrieverConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        t5_config = cfg.t5_config()
        ids = jnp.where(attention_mask.astype(bool), input_ids, 0)
        embedder = layers.Embed(cfg.vocab_size, cfg.hidden_size, t5_config.compute_dtype,
                                name="token_embedder")
        states = t5.Encoder(t5_config, embedder, name="encoder")(ids, deterministic)
        mask = (ids > 0).astype(jnp.float32)[..., None]
        pooled = ((states.astype(jnp.float32) * mask).sum(axis=1)
                  / jnp.maximum(mask.sum(axis=1), 1e-10))
        projected = layers.Dense(cfg.projection_dim, ("embed", "mlp"), name="projection_layer")(
            pooled).astype(jnp.float32)
        if not cfg.normalize:
            return projected
        return projected * jax.lax.rsqrt((projected ** 2).sum(axis=-1, keepdims=True) + 1e-6)


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
        tower = T5EncoderTower if self.config.architecture == "t5" else BertEncoder
        if self.config.shared_towers:
            self.encoder = tower(self.config)
        else:
            self.query_encoder = tower(self.config)
            self.passage_encoder = tower(self.config)

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

"""t5x_retrieval dual encoders (GTR, sentence-T5) -> a T5-encoder retriever tower.

A t5x_retrieval checkpoint is a t5x checkpoint (read by formats/t5x.py) whose `target` is
flaxformer's DualEncoder: `token_embedder/embedding`, `encoder/...` (a T5 encoder:
`layers_i`, `relpos_bias/rel_embedding`, `encoder_norm`) and `projection_layer/kernel`
(no bias). The tower is mean pooling over tokens > 0, projection, L2 norm
(models/retriever.py T5EncoderTower). The config is read off the shapes; GTR's released
checkpoints are T5 1.0 shaped (ReLU `mlp/wi`), sentence-T5 1.1 ones gated (`wi_0`, `wi_1`).
Tokenization: the T5 SentencePiece model passed as `tokenizer=`, with EOS appended, as
t5x_retrieval's seqio features are.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from atlas_jax.formats import t5x
from atlas_jax.formats.hf import CheckpointError, flat_shapes, unflatten
from atlas_jax.models import retriever as retriever_lib

EOS_ID = 1


def is_dual_encoder(arrays: dict) -> bool:
    return "projection_layer/kernel" in arrays


def config_from_arrays(arrays: dict[str, np.ndarray], source: Path, max_distance: int | None,
                       max_length: int) -> retriever_lib.RetrieverConfig:
    """The T5-encoder tower's config implied by the target's arrays."""
    t5 = t5x.config_from_arrays(arrays, source, max_distance)
    return retriever_lib.RetrieverConfig(
        scan_layers=False, remat=False,  # every format is per layer (stacking.py)
        architecture="t5", vocab_size=t5.vocab_size, hidden_size=t5.emb_dim,
        num_layers=t5.num_encoder_layers, num_heads=t5.num_heads, head_dim=t5.head_dim,
        mlp_dim=t5.mlp_dim, mlp_activations=tuple(t5.mlp_activations),
        relative_attention_num_buckets=t5.relative_attention_num_buckets,
        relative_attention_max_distance=t5.relative_attention_max_distance,
        projection_dim=arrays["projection_layer/kernel"].shape[1], layer_norm_epsilon=1e-6,
        pooling="mean", normalize=True, max_length=max_length,
        max_position_embeddings=max_length)


def abstract_tower(config: retriever_lib.RetrieverConfig):
    import flax
    import jax
    import jax.numpy as jnp
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda r: retriever_lib.T5EncoderTower(config).init(r, ids, ids),
                            jax.random.key(0))["params"]
    return flax.linen.meta.unbox(shapes)


def load_dual_encoder(path: Path, max_distance: int | None = None, max_length: int = 512
                      ) -> tuple[retriever_lib.RetrieverConfig, dict]:
    """(config, params {"encoder": tower}) of a t5x_retrieval checkpoint."""
    arrays, source = t5x.read_target(path)
    arrays = t5x.flatten_heads(arrays)
    if "encoder/token_embedder/embedding" in arrays:   # an encoder-owned embedder
        arrays["token_embedder/embedding"] = arrays.pop("encoder/token_embedder/embedding")
    if not is_dual_encoder(arrays):
        raise CheckpointError(f"{source}: no projection_layer/kernel: not a t5x_retrieval dual "
                              "encoder (a T5 encoder-decoder loads with load_reader)")
    # the tower is token_embedder + encoder + projection_layer; other top-level parameters
    # (a similarity layer's, if a variant has one) are not part of embedding
    arrays = {k: v for k, v in arrays.items()
              if k.split("/")[0] in ("token_embedder", "encoder", "projection_layer")}
    config = config_from_arrays(arrays, source, max_distance, max_length)
    t5x.check_arrays(arrays, flat_shapes(abstract_tower(config)), source,
                     "a T5 dual-encoder tower of the inferred config")
    return config, {"encoder": unflatten(arrays)}


@dataclasses.dataclass(frozen=True)
class _Encoding:
    ids: list[int]


class SentencePieceTokenizer:
    """T5 SentencePiece tokenization for a retriever: pieces, truncated to max_length - 1,
    then EOS. `encode_batch(texts)` -> objects with `.ids`, as `Retriever.tokenize` takes."""

    def __init__(self, model_file: str | Path, max_length: int = 512):
        import sentencepiece as spm
        path = Path(model_file)
        if not path.is_file():
            raise CheckpointError(f"{path}: SentencePiece model not found")
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a SentencePiece model "
                                  f"({' '.join(str(e).split())})") from None
        self.path, self.max_length = path, max_length

    def encode_batch(self, texts: list[str]) -> list[_Encoding]:
        pieces = self.processor.encode(list(texts))
        return [_Encoding(list(ids[: self.max_length - 1]) + [EOS_ID]) for ids in pieces]

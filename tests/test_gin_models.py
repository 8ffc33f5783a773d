"""Gin model files: published T5 v1.1 sizes, retriever choices, clear binding errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import gin_config, weights
from atlas_jax.models import retriever, t5

# Parameter counts of google/t5-v1_1-{small,base,large,xl,xxl} (untied logits_dense).
PUBLISHED = {"small": 76_961_152, "base": 247_577_856, "large": 783_150_080,
             "xl": 2_849_757_184, "xxl": 11_135_332_352}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_model_sizes_match_published_t5_v1_1(size):
    gin_config.parse([f"models/{size}.gin"])
    config = t5.T5Config()
    assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding
    shapes = weights.t5_abstract_params(config)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == PUBLISHED[size]


def test_tiny_gin_builds_a_working_reader():
    gin_config.parse(["models/tiny.gin"], ["--gin.t5.T5Config.vocab_size = 256"])
    reader = weights.build_reader()
    assert reader.config.emb_dim == 64 and reader.config.dtype == "float32"
    ids = np.array([[5, 6, 7, 1, 0]], np.int32)
    assert reader.logits(ids, np.zeros((1, 3), np.int32)).shape == (1, 3, 256)
    assert reader.generate(ids, max_length=4).shape == (1, 4)


def test_minilm_gin_loads_packaged_weights_and_contriever_dims():
    gin_config.parse(["models/retriever/minilm.gin"])
    built = weights.build_retriever()
    assert built.config.hidden_size == 384 and built.config.normalize
    assert built.embed(["hello"]).shape == (1, 384)
    gin_config.parse(["models/retriever/contriever.gin"],
                     ["retriever.RetrieverConfig.num_layers = 2"])
    random = weights.build_retriever()  # no checkpoint bound: random weights of that config
    assert random.config.hidden_size == 768 and not random.config.normalize
    ids = jnp.ones((2, 8), jnp.int32)
    assert random.embed_tokens(ids, ids).shape == (2, 768)


def test_binding_that_contradicts_the_checkpoint_names_the_binding():
    gin_config.parse(["models/retriever/minilm.gin"],
                     ["--gin.retriever.RetrieverConfig.hidden_size = 768"])
    with pytest.raises(weights.CheckpointError,
                       match=r"gin binding RetrieverConfig.hidden_size = 768 does not match"):
        weights.build_retriever()


def test_bad_binding_and_missing_file_are_named():
    with pytest.raises(ValueError, match=r"--gin.t5.T5Config.no_such_field"):
        gin_config.parse(["models/tiny.gin"], ["--gin.t5.T5Config.no_such_field = 3"])
    with pytest.raises(FileNotFoundError, match=r"models/huge.gin"):
        gin_config.parse(["models/huge.gin"])


def test_cls_pooling_and_untied_towers():
    config = retriever.RetrieverConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                       mlp_dim=32, max_position_embeddings=16, pooling="cls",
                                       shared_towers=False, dropout_rate=0.0)
    model = retriever.DualEncoder(config)
    ids = jnp.array([[3, 4, 5, 0]], jnp.int32)
    mask = (ids != 0).astype(jnp.int32)
    params = model.init(jax.random.key(0), ids, mask, ids, mask)["params"]
    assert set(params) == {"query_encoder", "passage_encoder"}
    q, p = model.apply(params_of(params), ids, mask, ids, mask)
    assert q.shape == p.shape == (1, 16)
    assert float(jnp.abs(q - p).max()) > 1e-4  # independent random towers


def params_of(params):
    from flax.linen import meta
    return {"params": meta.unbox(params)}

"""Mesh and logical axis rules: the tiny reader on a (4, 2) mesh equals one device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta
from jax.sharding import PartitionSpec as P

from atlas_jax import partitioning
from atlas_jax.models import fid, t5

CONFIG = t5.T5Config(vocab_size=256, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                     num_encoder_layers=2, num_decoder_layers=2,
                     mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                     scale_decoder_outputs=False, dropout_rate=0.0)


def test_eight_simulated_devices():
    assert jax.device_count() == 8


def test_create_mesh_shapes_and_errors():
    mesh = partitioning.create_mesh((-1, 2))
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 6 devices"):
        partitioning.create_mesh((3, 2))
    with pytest.raises(ValueError, match="do not split"):
        partitioning.create_mesh((-1, 3))


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): v for path, v in leaves}


@pytest.mark.parametrize("dims", [1, 2])
def test_sharded_reader_equals_single_device(dims):
    mesh = partitioning.create_mesh((4, 2))
    rules = partitioning.standard_logical_axis_rules(dims)
    model = fid.FusionInDecoder(CONFIG)
    rng = np.random.default_rng(0)
    passages = rng.integers(2, 256, size=(8, 2, 12)).astype(np.int32)
    passages[::2, 1, 7:] = 0
    decoder_ids = rng.integers(2, 256, size=(8, 5)).astype(np.int32)
    init_fn = lambda r: model.init(r, passages[:1], decoder_ids[:1])  # noqa: E731
    params = meta.unbox(init_fn(jax.random.key(0))["params"])
    shardings = partitioning.param_shardings(init_fn, mesh, rules)

    sharded = partitioning.shard_params(params, shardings)
    specs = {k: v.sharding.spec for k, v in _flat(sharded).items()}
    embed = "data" if dims == 2 else None
    assert specs["token_embedder/embedding"] == P("model", embed)
    assert specs["encoder/layers_0/attention/query/kernel"] == P(embed, "model")
    assert specs["encoder/layers_0/attention/out/kernel"] == P("model", embed)
    assert specs["decoder/layers_1/mlp/wi_0/kernel"] == P(embed, "model")
    assert specs["decoder/layers_1/mlp/wo/kernel"] == P("model", embed)
    assert specs["decoder/logits_dense/kernel"] == P(embed, "model")
    assert specs["encoder/relpos_bias/rel_embedding"] == P("model", None)
    assert specs["encoder/encoder_norm/scale"] == P(embed)
    # Actually split: each device holds half the vocabulary rows of the embedding.
    shard = _flat(sharded)["token_embedder/embedding"].addressable_shards[0].data
    assert shard.shape == (128, 32 // (4 if dims == 2 else 1))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(lambda p, x, d: model.apply({"params": p}, x, d),
                       in_shardings=(shardings, partitioning.batch_sharding(mesh, 3),
                                     partitioning.batch_sharding(mesh, 2)))
        sharded_logits = step(sharded, passages, decoder_ids)
    assert sharded_logits.sharding.spec[0] == "data"
    single = jax.jit(lambda p, x, d: model.apply({"params": p}, x, d))(
        jax.device_put(params, jax.devices()[0]), passages, decoder_ids)
    np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(single), atol=1e-5)


def test_rules_reject_unknown_dims():
    with pytest.raises(ValueError, match="1 or 2"):
        partitioning.standard_logical_axis_rules(3)

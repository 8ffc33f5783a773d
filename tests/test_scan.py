"""Scanned layers (`scan_layers`: nn.scan over stacked parameters) equal the per-layer model:
loss, gradients, greedy and beam tokens, ADist scores, both retriever towers, on one device and
on a (4, 2) mesh; every checkpoint loads into either layout; remat policies by name."""
import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.linen import meta
from jax.sharding import PartitionSpec as P

import atlas_jax
from atlas_jax import checkpoints, partitioning, weights
from atlas_jax.ledger import reader_export
from atlas_jax.models import decoding, fid, retriever as retriever_lib, stacking, t5
from tests.hf_reference import make_hf_t5, random_ids

CONFIG = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                     num_encoder_layers=3, num_decoder_layers=2, dropout_rate=0.0,
                     mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                     scale_decoder_outputs=False)


def _inputs(vocab=64, batch=4, passages=3, length=9, target=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, passages, length)).astype(np.int32)
    ids[::2, -1, 5:] = 0                   # padding, so the masks matter
    return jnp.asarray(ids), jnp.asarray(rng.integers(2, vocab, (batch, target)), jnp.int32)


def _max_difference(a, b) -> float:
    """Largest |a - b| of a leaf over that leaf's largest |a| (at least 1e-3 of the tree's
    largest: a gradient that is zero in exact arithmetic, like a key bias's, is float noise)."""
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a)) + 1e-30
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(jnp.max(jnp.abs(x - y))) / max(float(jnp.max(jnp.abs(x))),
                                                           1e-3 * scale), a, b)))


def _reader_pair(config=CONFIG, remat=False):
    model = fid.FusionInDecoder(config)
    scanned = fid.FusionInDecoder(dataclasses.replace(config, scan_layers=True, remat=remat))
    ids, dec = _inputs(config.vocab_size)
    params = meta.unbox(model.init(jax.random.key(0), ids, dec)["params"])
    return model, scanned, params, stacking.stack_layers(params)


def test_scanned_init_has_the_stacked_layout_and_a_layers_axis():
    model, scanned, params, stacked = _reader_pair()
    ids, dec = _inputs()
    boxed = scanned.init(jax.random.key(0), ids, dec)["params"]
    assert jax.tree.map(jnp.shape, meta.unbox(boxed)) == jax.tree.map(jnp.shape, stacked)
    assert "layers_0" not in boxed["encoder"] and "layers" in boxed["encoder"]
    kernel = boxed["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert kernel.names == ("layers", "embed", "joined_kv")
    assert kernel.value.shape == (3, 32, 32)
    assert boxed["decoder"]["layers"]["mlp"]["wo"]["kernel"].value.shape == (2, 48, 32)


@pytest.mark.parametrize("remat", ["none", "full", "save_dots", "save_dots_no_batch"])
def test_scanned_loss_and_gradients_equal_per_layer(remat):
    model, scanned, params, stacked = _reader_pair(remat=remat)
    ids, dec = _inputs()

    def loss(m):
        def f(p):
            logits = m.apply({"params": p}, ids, dec)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), dec[..., None], -1))
        return jax.jit(jax.value_and_grad(f))

    value, grads = loss(model)(params)
    scanned_value, scanned_grads = loss(scanned)(stacked)
    assert abs(float(value) - float(scanned_value)) <= 1e-5
    assert _max_difference(stacking.stack_layers(grads), scanned_grads) <= 1e-5
    assert float(jnp.abs(grads["encoder"]["layers_2"]["mlp"]["wo"]["kernel"]).max()) > 0


def test_scanned_adist_scores_equal_per_layer():
    model, scanned, params, stacked = _reader_pair()
    ids, dec = _inputs()
    _, state = model.apply({"params": params}, ids, dec, mutable=["intermediates"])
    _, scanned_state = scanned.apply({"params": stacked}, ids, dec, mutable=["intermediates"])
    ours = fid.cross_attention_passage_scores(state["intermediates"], 3)
    theirs = fid.cross_attention_passage_scores(scanned_state["intermediates"], 3)
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=1e-5)


def test_hf_checkpoint_loads_into_both_layouts_with_the_same_tokens(tmp_path):
    """A Hugging Face T5 through the gin builder, scanned and not: same logits, same greedy
    and beam tokens with the KV cache (the scanned cache holds a leading layer axis)."""
    make_hf_t5(tmp_path / "t5", version="v1.1", vocab_size=32, seed=3, num_layers=3)
    readers = {}
    for scan in (False, True):
        gin.clear_config()
        gin.parse_config([f"t5.T5Config.scan_layers = {scan}", "t5.T5Config.vocab_size = 32",
                          "t5.T5Config.emb_dim = 32", "t5.T5Config.num_heads = 4",
                          "t5.T5Config.head_dim = 8", "t5.T5Config.mlp_dim = 48",
                          "t5.T5Config.num_encoder_layers = 3",
                          "t5.T5Config.num_decoder_layers = 3", "t5.T5Config.dropout_rate = 0.0"])
        readers[scan] = weights.build_reader(checkpoint=str(tmp_path / "t5"))
    gin.clear_config()
    per_layer, scanned = readers[False], readers[True]
    assert scanned.config.scan_layers and stacking.is_stacked(scanned.params)
    assert not stacking.is_stacked(per_layer.params)
    enc = random_ids(np.random.default_rng(2), 4, 12, 32)
    dec = random_ids(np.random.default_rng(3), 4, 6, 32)
    np.testing.assert_allclose(scanned.logits(enc, dec), per_layer.logits(enc, dec), atol=1e-5)
    greedy = per_layer.generate(enc, max_length=10)
    assert len(np.unique(greedy)) > 3           # a real sequence, not one repeated token
    np.testing.assert_array_equal(scanned.generate(enc, max_length=10), greedy)
    beams, scores = per_layer.generate(enc, max_length=8, beam_size=3)
    scanned_beams, scanned_scores = scanned.generate(enc, max_length=8, beam_size=3)
    np.testing.assert_array_equal(scanned_beams, beams)
    np.testing.assert_allclose(scanned_scores, scores, atol=1e-5)
    # Export writes the per-layer (Hugging Face) names from either layout.
    ours, theirs = reader_export.hf_tensors(per_layer), reader_export.hf_tensors(scanned)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(theirs[name], ours[name])


@pytest.mark.parametrize("architecture", ["bert", "t5"])
def test_scanned_retriever_towers_equal_per_layer(architecture):
    config = retriever_lib.RetrieverConfig(
        vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, mlp_dim=48,
        max_position_embeddings=16, dropout_rate=0.0, architecture=architecture, head_dim=8,
        projection_dim=16, shared_towers=False)
    model = retriever_lib.DualEncoder(config)
    scanned = retriever_lib.DualEncoder(dataclasses.replace(config, scan_layers=True,
                                                            remat="full"))
    ids = jax.random.randint(jax.random.key(1), (3, 9), 1, 50)
    mask = jnp.ones_like(ids).at[:, 6:].set(0)
    params = meta.unbox(model.init(jax.random.key(0), ids, mask, ids, mask)["params"])
    stacked = stacking.stack_layers(params)

    def loss(m):
        def f(p):
            q, d = m.apply({"params": p}, ids, mask, ids[::-1], mask[::-1])
            return jnp.mean(jax.nn.log_softmax(q @ d.T) ** 2)
        return jax.jit(jax.value_and_grad(f))

    value, grads = loss(model)(params)
    scanned_value, scanned_grads = loss(scanned)(stacked)
    assert abs(float(value) - float(scanned_value)) <= 1e-5 * max(1.0, abs(float(value)))
    assert _max_difference(stacking.stack_layers(grads), scanned_grads) <= 1e-5


@pytest.mark.parametrize("dims", [1, 2])
def test_scanned_reader_on_a_mesh_equals_one_device(dims):
    """The stacked kernels keep their model/fsdp split with a replicated layer axis."""
    model, scanned, params, stacked = _reader_pair(remat="full")
    ids, dec = _inputs(batch=8)
    mesh = partitioning.create_mesh((4, 2))
    rules = partitioning.standard_logical_axis_rules(dims)
    shardings = partitioning.param_shardings(
        lambda r: scanned.init(r, ids[:1], dec[:1]), mesh, rules)
    embed = "data" if dims == 2 else None
    assert shardings["encoder"]["layers"]["attention"]["query"]["kernel"].spec == P(
        None, embed, "model")
    assert shardings["decoder"]["layers"]["mlp"]["wo"]["kernel"].spec == P(None, "model", embed)
    placed = partitioning.shard_params(stacked, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits = jax.jit(jax.grad(lambda p: jnp.mean(scanned.apply({"params": p}, ids, dec) ** 2)),
                         in_shardings=(shardings,))(placed)
    single = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, ids, dec) ** 2)))(
        params)
    assert _max_difference(stacking.stack_layers(single), logits) <= 1e-5


def test_stack_and_unstack_round_trip_any_tree():
    _, _, params, stacked = _reader_pair()
    assert jax.tree.map(jnp.shape, stacking.unstack_layers(stacked)) == jax.tree.map(
        jnp.shape, params)
    assert stacking.to_layout(stacked, True) is not None
    adam = optax.adam(1e-3).init(params)       # NamedTuples around dicts
    converted = stacking.stack_layers(adam)
    assert converted[0].mu["encoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (3, 48, 32)
    assert stacking.is_stacked(converted) and not stacking.is_stacked(adam)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert stacking.stack_layers(abstract)["decoder"]["layers"]["self_attention"]["query"][
        "kernel"].shape == (2, 32, 32)
    with pytest.raises(ValueError, match="not 0..1"):
        stacking.stack_layers({"layers_0": {"w": np.ones(2)}, "layers_2": {"w": np.ones(2)}})


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_a_run_checkpoint_restores_into_the_other_layout(tmp_path, saved_scanned):
    _, _, params, stacked = _reader_pair()
    saved, target = (stacked, params) if saved_scanned else (params, stacked)
    optimizer = optax.adam(1e-3)
    store = checkpoints.Checkpoints(tmp_path / "ckpt")
    store.save(3, {"params": saved, "opt_state": optimizer.init(saved)}, {"step": 3})
    mesh = partitioning.create_mesh((8, 1))
    replicated = jax.sharding.NamedSharding(mesh, P())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            {"params": target, "opt_state": optimizer.init(target)})
    restored, meta_ = store.restore(3, abstract)
    assert meta_ == {"step": 3}
    assert _max_difference(target, restored["params"]) == 0.0
    assert restored["params"]["encoder"][
        "layers" if not saved_scanned else "layers_0"]["mlp"]["wo"]["kernel"].sharding == replicated
    only_params, _ = store.restore(3, {"params": abstract["params"]}, partial=True)
    assert _max_difference(target, only_params["params"]) == 0.0
    store.close()


def test_remat_policies_by_name_and_a_clear_error():
    assert stacking.remat_policy(False) == (False, None)
    assert stacking.remat_policy(True)[0] and stacking.remat_policy("full")[1] is not None
    with pytest.raises(ValueError, match="remat = 'sometimes'"):
        stacking.remat_policy("sometimes")
    gin.clear_config()
    gin.parse_config(["t5.T5Config.remat = 'save_dots'", "t5.T5Config.scan_layers = True"])
    config = t5.T5Config()
    gin.clear_config()
    assert config.remat == "save_dots" and config.scan_layers


def test_load_reader_stays_per_layer_and_public_api_converts():
    assert atlas_jax.load_reader is weights.load_reader
    _, _, params, stacked = _reader_pair()
    reader = weights.Reader(CONFIG, params)
    scanned = weights.in_layout(reader, dataclasses.replace(CONFIG, scan_layers=True))
    assert scanned.config.scan_layers and stacking.is_stacked(scanned.params)
    back = weights.in_layout(scanned, CONFIG)
    assert _max_difference(params, back.params) == 0.0
    ids, _ = _inputs()
    np.testing.assert_array_equal(decoding.generate_from_passages(
        scanned.model, scanned.params, ids, 4), reader.generate(ids, max_length=4))

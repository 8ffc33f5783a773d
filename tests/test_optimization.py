"""Optimisation: schedules, per-group AdamW, decay mask, clipping, accumulation, frozen
subtrees, non-finite skipping, and a jit update on a sharded (4, 2) mesh."""
from __future__ import annotations

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from atlas_jax.train import optimization
from atlas_jax import partitioning
from atlas_jax.train.optimization import OptimizerConfig

CONSTANT = OptimizerConfig(schedule="constant", reader_learning_rate=1e-2,
                           retriever_learning_rate=1e-3, weight_decay=0.0, clip_norm=None)


def _toy_params(seed: int = 0, frozen: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    tower = lambda: {"layers_0": {"wi": {"kernel": rng.normal(size=(4, 6)),  # noqa: E731
                                          "bias": rng.normal(size=(6,))},
                                   "norm": {"scale": rng.normal(size=(6,))}},
                     "token_embedder": {"embedding": rng.normal(size=(10, 4))}}
    params = {"reader": tower(), "retriever": tower()}
    if frozen:
        params["frozen_passage_tower"] = tower()
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def _random_like(tree, seed: int, scale: float = 1.0):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32)
                              for x in leaves])


def _step(optimizer, grads, state, params):
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _schedule_values(kind, steps):
    config = OptimizerConfig(schedule=kind, warmup_steps=10, total_steps=110)
    schedule = optimization.learning_rate_schedule(2.0, config)
    return [float(schedule(jnp.asarray(s))) for s in steps]


def test_schedule_values():
    steps = [0, 5, 10, 60, 110, 500]
    np.testing.assert_allclose(_schedule_values("linear", steps), [0, 1, 2, 1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(_schedule_values("cosine", steps), [0, 1, 2, 1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(_schedule_values("cosine", [35]),
                               [1 + np.cos(np.pi / 4)], rtol=1e-6)  # quarter of the decay
    np.testing.assert_allclose(_schedule_values("constant", steps), [0, 1, 2, 2, 2, 2],
                               atol=1e-6)
    no_warmup = optimization.learning_rate_schedule(3.0, OptimizerConfig(schedule="constant"))
    assert float(no_warmup(0)) == 3.0
    jitted = jax.jit(optimization.learning_rate_schedule(
        2.0, OptimizerConfig(warmup_steps=10, total_steps=110)))
    assert float(jitted(jnp.asarray(60))) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="linear"), "OptimizerConfig.total_steps is required"),
    (dict(schedule="cosine", total_steps=None), "OptimizerConfig.total_steps is required"),
    (dict(schedule="linear", warmup_steps=10, total_steps=10), "must exceed"),
    (dict(schedule="step"), "OptimizerConfig.schedule must be one of"),
    (dict(schedule="constant", accumulation_steps=0), "accumulation_steps"),
    (dict(schedule="constant", warmup_steps=-1), "warmup_steps"),
    (dict(schedule="constant", clip_norm=-1.0), "clip_norm"),
    (dict(schedule="constant", max_consecutive_nonfinite=0), "max_consecutive_nonfinite"),
    (dict(schedule="constant", b2=1.0), "b2"),
])
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)


def test_gin_binding():
    gin.clear_config()
    try:
        gin.parse_config("\n".join([
            "from __gin__ import dynamic_registration",
            "from atlas_jax.train import optimization",
            "optimization.OptimizerConfig.schedule = 'cosine'",
            "optimization.OptimizerConfig.total_steps = 100",
            "optimization.OptimizerConfig.accumulation_steps = 4"]))
        config = OptimizerConfig()
    finally:
        gin.clear_config()
    assert (config.schedule, config.total_steps, config.accumulation_steps) == ("cosine", 100, 4)


def test_separate_learning_rates_first_adam_step():
    params, optimizer = _toy_params(), optimization.make_optimizer(CONSTANT, _toy_params())
    grads = _random_like(params, seed=1)
    new_params, _ = _step(optimizer, grads, optimizer.init(params), params)
    # The first Adam step moves each element by lr * g / (|g| + eps) = lr * sign(g).
    for group, lr in (("reader", 1e-2), ("retriever", 1e-3)):
        moved = jax.tree.map(lambda new, old: new - old, new_params[group], params[group])
        for delta, grad in zip(jax.tree.leaves(moved), jax.tree.leaves(grads[group])):
            np.testing.assert_allclose(delta, -lr * np.sign(grad), rtol=1e-4, atol=1e-9)


def test_weight_decay_mask_rule():
    mask = optimization.weight_decay_mask(_toy_params())["reader"]
    assert mask["layers_0"]["wi"] == {"kernel": True, "bias": False}
    assert mask["layers_0"]["norm"] == {"scale": False}
    assert mask["token_embedder"] == {"embedding": False}
    mask = optimization.weight_decay_mask(_toy_params(), decay_embeddings=True)["retriever"]
    assert mask["token_embedder"] == {"embedding": True}
    relpos = {"relpos_bias": {"rel_embedding": jax.ShapeDtypeStruct((32, 4), jnp.float32)}}
    assert optimization.weight_decay_mask(relpos) == {"relpos_bias": {"rel_embedding": False}}


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_only_where_masked(decay_embeddings):
    config = dataclasses.replace(CONSTANT, weight_decay=0.5, decay_embeddings=decay_embeddings)
    params = _toy_params()
    optimizer = optimization.make_optimizer(config, params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    new_params, _ = _step(optimizer, zero_grads, optimizer.init(params), params)
    for group, lr in (("reader", 1e-2), ("retriever", 1e-3)):
        new, old = new_params[group], params[group]
        np.testing.assert_allclose(new["layers_0"]["wi"]["kernel"],
                                   old["layers_0"]["wi"]["kernel"] * (1 - lr * 0.5), rtol=1e-6)
        _assert_trees_equal(new["layers_0"]["wi"]["bias"], old["layers_0"]["wi"]["bias"])
        _assert_trees_equal(new["layers_0"]["norm"], old["layers_0"]["norm"])
        embedding = old["token_embedder"]["embedding"]
        expected = embedding * (1 - lr * 0.5) if decay_embeddings else embedding
        np.testing.assert_allclose(new["token_embedder"]["embedding"], expected, rtol=1e-6)


def _reference_whole_tree(lr, clip_norm):
    """optax's own chain on the whole tree (one learning rate, one global clip)."""
    clip = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*clip, optax.adamw(lr, weight_decay=0.01, mask=lambda tree:
                                          optimization.weight_decay_mask(tree)))


def _run_steps(optimizer, params, grads_per_step):
    state = optimizer.init(params)
    for grads in grads_per_step:
        params, state = _step(optimizer, grads, state, params)
    return params


@pytest.mark.parametrize("clip_norm", [0.5, None])
def test_clipping_over_whole_tree_matches_optax_reference(clip_norm):
    config = dataclasses.replace(CONSTANT, reader_learning_rate=1e-2,
                                 retriever_learning_rate=1e-2, weight_decay=0.01,
                                 clip_norm=clip_norm)
    params = _toy_params()
    grads_per_step = []  # norms from ~1 to ~100, retriever 100x smaller than the reader
    for step in range(3):
        grads = _random_like(params, seed=10 + step, scale=10.0 ** step)
        grads["retriever"] = jax.tree.map(lambda g: 0.01 * g, grads["retriever"])
        grads_per_step.append(grads)
    ours = _run_steps(optimization.make_optimizer(config, params), params, grads_per_step)
    reference = _run_steps(_reference_whole_tree(1e-2, clip_norm), params, grads_per_step)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 ours, reference)
    if clip_norm:  # and the clip mattered
        unclipped = _run_steps(_reference_whole_tree(1e-2, None), params, grads_per_step)
        assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree.leaves(unclipped), jax.tree.leaves(ours))) > 1e-4


def test_accumulation_equals_one_step_on_mean_gradient():
    config = dataclasses.replace(CONSTANT, weight_decay=0.01, clip_norm=1.0)
    params = _toy_params()
    accumulating = optimization.make_optimizer(
        dataclasses.replace(config, accumulation_steps=3), params)
    plain = optimization.make_optimizer(config, params)
    acc_params, acc_state = params, accumulating.init(params)
    plain_params, plain_state = params, plain.init(params)
    accumulating_step = jax.jit(functools.partial(_step, accumulating))
    plain_step = jax.jit(functools.partial(_step, plain))
    for update in range(2):
        micro_grads = [_random_like(params, seed=100 + 3 * update + i) for i in range(3)]
        for i, grads in enumerate(micro_grads):
            before = acc_params
            acc_params, acc_state = accumulating_step(grads, acc_state, acc_params)
            if i < 2:
                _assert_trees_equal(acc_params, before)
        mean_grads = jax.tree.map(lambda *g: sum(g) / 3, *micro_grads)
        plain_params, plain_state = plain_step(mean_grads, plain_state, plain_params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                     acc_params, plain_params)


def test_frozen_subtree_gets_zero_update_and_no_share_of_the_clip():
    config = dataclasses.replace(CONSTANT, clip_norm=0.5, weight_decay=0.1)
    params = _toy_params(frozen=True)
    optimizer = optimization.make_optimizer(config, params)
    without_frozen = {k: v for k, v in params.items() if k != "frozen_passage_tower"}
    reference = optimization.make_optimizer(config, without_frozen)
    state, ref_state = optimizer.init(params), reference.init(without_frozen)
    assert not jax.tree.leaves(state[-1].inner_states["frozen"])  # no Adam moments
    new_params, ref_params = params, without_frozen
    for step in range(2):
        grads = _random_like(params, seed=200 + step, scale=100.0)
        new_params, state = _step(optimizer, grads, state, new_params)
        ref_grads = {k: v for k, v in grads.items() if k != "frozen_passage_tower"}
        ref_params, ref_state = _step(reference, ref_grads, ref_state, ref_params)
    _assert_trees_equal(new_params["frozen_passage_tower"], params["frozen_passage_tower"])
    _assert_trees_equal({k: new_params[k] for k in ("reader", "retriever")}, ref_params)


def test_parameter_key_convention():
    groups = optimization.parameter_groups(
        {"reader": {}, "retriever": {}, "frozen": {}, "frozen_passage_tower": {}})
    assert groups == {"reader": "reader", "retriever": "retriever", "frozen": "frozen",
                      "frozen_passage_tower": "frozen"}
    with pytest.raises(ValueError, match="'passage_tower'"):
        optimization.make_optimizer(CONSTANT, {"reader": {}, "passage_tower": {}})
    with pytest.raises(ValueError, match="must be a dict"):
        optimization.make_optimizer(CONSTANT, [jnp.zeros(3)])
    reader_only = {"reader": _toy_params()["reader"]}  # closed book: one group is enough
    optimizer = optimization.make_optimizer(CONSTANT, reader_only)
    _step(optimizer, reader_only, optimizer.init(reader_only), reader_only)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
@pytest.mark.parametrize("poison", ["loss_nan", "grad_nan", "grad_inf"])
def test_non_finite_step_is_skipped_bit_identically(poison, accumulation_steps):
    config = dataclasses.replace(CONSTANT, accumulation_steps=accumulation_steps,
                                 clip_norm=1.0, weight_decay=0.01)
    params = _toy_params()
    optimizer = optimization.make_optimizer(config, params)
    apply = jax.jit(functools.partial(optimization.apply_gradients, optimizer))
    state = optimizer.init(params)
    # One finite step first so the state is not the initial one.
    params, state, skipped = apply(_random_like(params, 1), state, params, jnp.float32(1.0))
    assert not bool(skipped)
    grads, loss = _random_like(params, 2), jnp.float32(0.5)
    if poison == "loss_nan":
        loss = jnp.float32(jnp.nan)
    else:
        bad = jnp.nan if poison == "grad_nan" else jnp.inf
        grads["retriever"]["layers_0"]["wi"]["bias"] = (
            grads["retriever"]["layers_0"]["wi"]["bias"].at[3].set(bad))
    new_params, new_state, skipped = apply(grads, state, params, loss)
    assert skipped.dtype == jnp.bool_ and bool(skipped)
    _assert_trees_equal(new_params, params)
    _assert_trees_equal(new_state, state)
    # The finite step after it proceeds normally (with accumulation 2 it completes the pair).
    new_params, _, skipped = apply(_random_like(params, 3), state, params, jnp.float32(0.5))
    assert not bool(skipped)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_params),
                                                         jax.tree.leaves(params)))


def test_non_finite_tracker():
    tracker = optimization.NonFiniteTracker(max_consecutive=3)
    for skipped in (False, True, True, jnp.bool_(False), jnp.asarray(True), True):
        tracker.record(skipped)
    assert tracker.metrics() == {"nonfinite/skipped_total": 4,
                                 "nonfinite/skipped_consecutive": 2}
    with pytest.raises(FloatingPointError, match="OptimizerConfig.max_consecutive_nonfinite"):
        tracker.record(np.True_)
    unlimited = optimization.NonFiniteTracker(max_consecutive=None)
    for _ in range(10):
        unlimited.record(True)
    assert unlimited.total_skipped == 10


def test_jit_update_on_sharded_mesh_matches_single_device():
    mesh = partitioning.create_mesh((4, 2))
    params = {"reader": {"dense": {"kernel": jnp.arange(32.0).reshape(8, 4) / 32,
                                   "bias": jnp.ones(4)}},
              "retriever": {"token_embedder": {"embedding": jnp.ones((16, 2))}},
              "frozen_passage_tower": {"kernel": jnp.ones((8, 2))}}
    specs = {"reader": {"dense": {"kernel": P("data", "model"), "bias": P("model")}},
             "retriever": {"token_embedder": {"embedding": P("data", None)}},
             "frozen_passage_tower": {"kernel": P(None, "model")}}
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    config = dataclasses.replace(CONSTANT, accumulation_steps=2, weight_decay=0.1,
                                 clip_norm=0.1)
    optimizer = optimization.make_optimizer(config, params)
    apply = jax.jit(functools.partial(optimization.apply_gradients, optimizer))
    grads = [_random_like(params, seed) for seed in (7, 8, 9, 10)]
    losses = [1.0, np.nan, 1.0, 1.0]

    def run(params, place):
        state = jax.jit(optimizer.init)(place(params))
        params, flags = place(params), []
        for step_grads, loss in zip(grads, losses):
            params, state, skipped = apply(place(step_grads), state, params, jnp.float32(loss))
            flags.append(bool(skipped))
        return params, flags

    sharded, flags = run(params, lambda tree: partitioning.shard_params(tree, shardings))
    single, single_flags = run(params, lambda tree: tree)
    assert flags == single_flags == [False, True, False, False]
    kernel = sharded["reader"]["dense"]["kernel"]
    assert kernel.sharding.is_equivalent_to(shardings["reader"]["dense"]["kernel"], 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 sharded, single)
    _assert_trees_equal(sharded["frozen_passage_tower"], params["frozen_passage_tower"])

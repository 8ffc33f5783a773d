"""The jit functions on the mesh: the train step, the optimizer state's initialisation, query /
passage embedding and greedy generation. Each takes a `state.ModelState`; the embed and
generate functions are built once per state (and its `with_params` copies)."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from atlas_jax import distributed, partitioning
from atlas_jax.models import decoding
from atlas_jax.train import joint_loss, objectives, optimization
from atlas_jax.train.state import ModelState


def _step_fn(state: ModelState, objective: objectives.ObjectiveConfig,
             optimizer: optax.GradientTransformation, n_context: int) -> Callable:
    models = state.models

    def step(params, opt_state, batch, rng, loss_scale):
        def loss_fn(p):
            loss, metrics = joint_loss.joint_loss(
                p, batch, models, objective, n_context, rng, deterministic=False,
                frozen_passage_params=p.get("frozen_passage_tower"))
            return loss * loss_scale, metrics
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_params, new_state, skipped = optimization.apply_gradients(
            optimizer, grads, opt_state, params, loss)
        metrics = dict(metrics, loss=loss, skipped=skipped, grad_norm=optax.global_norm(grads))
        return new_params, new_state, metrics
    return step


def make_train_step(state: ModelState, objective: objectives.ObjectiveConfig,
                    optimizer: optax.GradientTransformation, n_context: int,
                    opt_state: Any) -> Callable:
    """jit(step)(params, opt_state, batch, rng, loss_scale) -> (params, opt_state, metrics),
    parameters and optimizer state keeping their shardings (both donated). `n_context`: the
    passages the reader reads (1 closed-book)."""
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    jitted = jax.jit(_step_fn(state, objective, optimizer, n_context), donate_argnums=(0, 1),
                     out_shardings=(state.param_shardings, opt_shardings, None))

    def call(params, opt_state, batch, rng, loss_scale):
        with jax.set_mesh(state.mesh), nn.logical_axis_rules(state.rules):
            return jitted(params, opt_state, batch, rng, loss_scale)

    def lower(params, opt_state, batch, rng, loss_scale):  # arrays or ShapeDtypeStructs
        with jax.set_mesh(state.mesh), nn.logical_axis_rules(state.rules):
            return jitted.lower(params, opt_state, batch, rng, loss_scale)
    call.lower = lower  # atlas-jax plan compiles the step ahead of time
    return call


def opt_state_shardings(state: ModelState, optimizer: optax.GradientTransformation,
                        params: Any) -> Any:
    """AdamW's moments take their parameter's sharding (XLA would otherwise replicate them,
    zeros having no operand to follow)."""
    return partitioning.optimizer_state_shardings(
        jax.eval_shape(optimizer.init, params), state.param_shardings, state.mesh)


def init_opt_state(state: ModelState, optimizer: optax.GradientTransformation,
                   params: dict) -> Any:
    """The optimizer state, laid out like the parameters (`opt_state_shardings`)."""
    with jax.set_mesh(state.mesh):
        return jax.jit(optimizer.init, out_shardings=opt_state_shardings(
            state, optimizer, params))(params)


def make_embed_fn(state: ModelState, tower: str) -> Callable:
    """(params, ids, mask) -> (B, D) numpy, jit on the mesh, batch over 'data' (one per state
    and tower)."""
    if ("embed", tower) not in state.compiled:
        state.compiled["embed", tower] = _make_embed_fn(state, tower)
    return state.compiled["embed", tower]


def _make_embed_fn(state: ModelState, tower: str) -> Callable:
    model = state.models.retriever
    method = model.embed_queries if tower == "query" else model.embed_passages
    sharding = NamedSharding(state.mesh, PartitionSpec("data", None))

    @jax.jit
    def embed(params, ids, mask):
        return model.apply({"params": params}, ids, mask, method=method)

    data = state.mesh.shape["data"]

    def call(params, ids, mask):
        count = len(ids)
        pad = -count % data
        if pad:
            ids = np.concatenate([ids, np.zeros((pad,) + ids.shape[1:], ids.dtype)])
            mask = np.concatenate([mask, np.zeros((pad,) + mask.shape[1:], mask.dtype)])
        with jax.set_mesh(state.mesh), nn.logical_axis_rules(state.rules):
            out = embed(params, jax.device_put(ids, sharding), jax.device_put(mask, sharding))
        return distributed.host_array(out).astype(np.float32)[:count]
    return call


def make_generate_fn(state: ModelState, max_length: int) -> Callable:
    """(reader params, reader ids (B, K, L)) -> greedy tokens (B, max_length) numpy (one per
    state and length)."""
    if ("generate", max_length) not in state.compiled:
        state.compiled["generate", max_length] = _make_generate_fn(state, max_length)
    return state.compiled["generate", max_length]


def _make_generate_fn(state: ModelState, max_length: int) -> Callable:
    model = state.models.reader

    @jax.jit
    def generate(params, passage_ids):
        return decoding.generate_from_passages(model, params, passage_ids, max_length)

    def call(params, passage_ids):
        with jax.set_mesh(state.mesh), nn.logical_axis_rules(state.rules):
            out = generate(params, jax.device_put(
                passage_ids, partitioning.batch_sharding(state.mesh, 3)))
        return distributed.host_array(out)
    return call

"""The train step on the mesh and the optimizer state's initialisation, for a
`state.ModelState` (embedding and generation, which evaluation and `ask` share, are in
`atlas_jax.inference`)."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import optax

from atlas_jax import partitioning
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


def abstract_opt_state(state: ModelState, optimizer: optax.GradientTransformation,
                       params: Any) -> Any:
    """The optimizer state as ShapeDtypeStructs with the shardings `init_opt_state` gives
    (a restore target, or `plan`'s input), nothing allocated."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(optimizer.init, params),
                        opt_state_shardings(state, optimizer, params))


def init_opt_state(state: ModelState, optimizer: optax.GradientTransformation,
                   params: dict) -> Any:
    """The optimizer state, laid out like the parameters (`opt_state_shardings`)."""
    with jax.set_mesh(state.mesh):
        return jax.jit(optimizer.init, out_shardings=opt_state_shardings(
            state, optimizer, params))(params)

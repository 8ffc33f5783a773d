"""Optimisation: AdamW with separate reader / retriever learning rates, warmup + decay
schedules, global-norm clipping, gradient accumulation, and skipping of non-finite steps.

Parameter tree convention: the trained parameters are one dict keyed at the top level by
the model part they belong to.

  "reader"     the FiD reader (T5)                  -> AdamW at `reader_learning_rate`
  "retriever"  the dual encoder (trained towers)    -> AdamW at `retriever_learning_rate`
  "frozen" or "frozen_<anything>" (e.g. "frozen_passage_tower", the fixed passage tower of
               query-side training)                 -> exactly zero update, no optimizer state

Any other top-level key is a ValueError naming it. One update is:
  zero the gradients of frozen subtrees -> clip the global norm of the whole remaining tree
  (`clip_norm`) -> per-group AdamW (bias-corrected Adam, decoupled weight decay scaled by the
  learning rate, as in PyTorch's AdamW) -> wrapped in `optax.MultiSteps` when
  `accumulation_steps > 1` (the mean of k micro-batch gradients makes one update).

Weight decay (`weight_decay_mask`) applies to weight matrices only: leaves named `kernel`
and any other leaf of rank >= 2, but not to biases, norm scales (`bias`, `scale`, any rank
< 2 leaf), nor to embedding tables (leaves whose name ends in `embedding`: token, position,
segment embeddings and T5's `rel_embedding`) unless `decay_embeddings` is set: decay would
shrink the rows of rare tokens, which gradients seldom touch (and v1.0 T5 ties the table to
the output layer).

Schedules count optimizer updates (after accumulation), i.e. `total_steps` is the number of
train steps divided by `accumulation_steps`. `freeze_retriever_steps` holds the retriever's
learning rate at 0 for that many updates (Atlas's option of the same name).

`apply_gradients` skips an update whose loss or gradients are not finite (params and
optimizer state returned bit-identical, `skipped` returned as a metric); the host-side
`NonFiniteTracker` stops the run after `max_consecutive_nonfinite` skips in a row.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant")
TRAINED_GROUPS = ("reader", "retriever")
FROZEN_GROUP = "frozen"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters, schedule, clipping, accumulation and non-finite handling.

    `total_steps` (optimizer updates) is required by the decaying schedules ('linear',
    'cosine'): bind `OptimizerConfig.total_steps` (e.g. to `%TRAIN_STEPS`). `clip_norm` None or
    0 disables clipping; `max_consecutive_nonfinite` None disables the stop.
    """
    reader_learning_rate: float = 1e-4
    retriever_learning_rate: float = 1e-5
    schedule: str = "linear"
    warmup_steps: int = 0
    total_steps: int | None = None
    weight_decay: float = 0.01
    decay_embeddings: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    accumulation_steps: int = 1
    max_consecutive_nonfinite: int | None = 5
    freeze_retriever_steps: int = 0

    def __post_init__(self):
        def fail(field: str, requirement: str):
            raise ValueError(f"OptimizerConfig.{field} {requirement}, got "
                             f"{getattr(self, field)!r}")

        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.schedule != "constant" and self.total_steps is None:
            fail("total_steps", f"is required by the {self.schedule!r} schedule (bind it, "
                 "e.g. to %TRAIN_STEPS, or use schedule 'constant')")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            fail("total_steps", f"must exceed OptimizerConfig.warmup_steps "
                 f"({self.warmup_steps}) for the {self.schedule!r} schedule")
        checks = [("reader_learning_rate", 0, ">= 0"), ("retriever_learning_rate", 0, ">= 0"),
                  ("weight_decay", 0, ">= 0"), ("eps", 0, ">= 0"), ("warmup_steps", 0, ">= 0"),
                  ("clip_norm", 0, ">= 0 (None or 0 disables clipping)"),
                  ("accumulation_steps", 1, ">= 1"), ("freeze_retriever_steps", 0, ">= 0"),
                  ("max_consecutive_nonfinite", 1, ">= 1 (None disables the stop)")]
        for field, minimum, requirement in checks:
            value = getattr(self, field)
            optional = field in ("clip_norm", "max_consecutive_nonfinite")
            if not (value is None and optional) and not (value is not None and value >= minimum):
                fail(field, f"must be {requirement}")
        for field in ("b1", "b2"):
            if not 0 <= getattr(self, field) < 1:
                fail(field, "must be in [0, 1)")


def learning_rate_schedule(base_learning_rate: float, config: OptimizerConfig
                           ) -> optax.Schedule:
    """Linear warmup from 0 to `base_learning_rate` over `config.warmup_steps` updates, then
    'linear' decay to 0 at `total_steps`, 'cosine' decay to 0 at `total_steps`, or
    'constant'. After `total_steps` a decaying schedule stays at 0.

    Args:
      base_learning_rate: the peak learning rate.
      config: supplies schedule, warmup_steps, total_steps.
    Returns:
      step (int array) -> learning rate (float32 scalar).
    """
    warmup, total, kind = config.warmup_steps, config.total_steps, config.schedule

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup_factor = jnp.minimum(1.0, step / warmup) if warmup > 0 else jnp.float32(1.0)
        if kind == "constant":
            decay_factor = jnp.float32(1.0)
        else:
            progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
            decay_factor = (1.0 - progress if kind == "linear"
                            else 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return (base_learning_rate * warmup_factor * decay_factor).astype(jnp.float32)

    return schedule


def frozen_until(schedule: optax.Schedule, steps: int) -> optax.Schedule:
    """`schedule` held at 0 for the first `steps` updates (Atlas's freeze_retriever_steps:
    a zero learning rate is an exactly zero AdamW update, weight decay included)."""
    if steps <= 0:
        return schedule
    return lambda step: jnp.where(step < steps, 0.0, schedule(step)).astype(jnp.float32)


def parameter_group(top_level_key: str) -> str:
    """'reader', 'retriever' or 'frozen' for a top-level key of the params dict."""
    if top_level_key in TRAINED_GROUPS:
        return top_level_key
    if top_level_key == FROZEN_GROUP or str(top_level_key).startswith(FROZEN_GROUP + "_"):
        return FROZEN_GROUP
    raise ValueError(f"parameter subtree {top_level_key!r}: the top-level keys of the params "
                     f"dict must be 'reader', 'retriever', or 'frozen' / 'frozen_<name>' "
                     f"(zero update)")


def parameter_groups(params: Any) -> dict[str, str]:
    """Top-level key -> group ('reader' | 'retriever' | 'frozen') of a params dict; a
    prefix of `params` usable as `optax.multi_transform` labels."""
    if not isinstance(params, Mapping):
        raise ValueError("params must be a dict keyed by 'reader' / 'retriever' / "
                         f"'frozen_<name>', got {type(params).__name__}")
    return {key: parameter_group(key) for key in params}


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """Tree of bools like `params`: True where AdamW's weight decay applies (the rule in the
    module docstring: matrices yes; biases, scales, rank < 2 leaves no; embeddings only with
    `decay_embeddings`). Works on arrays and on `jax.ShapeDtypeStruct` leaves."""
    def decays(path, leaf) -> bool:
        name = _key_name(path[-1]) if path else ""
        if name.endswith("embedding"):
            return decay_embeddings
        return name not in ("bias", "scale") and len(jnp.shape(leaf)) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def _zero_frozen_gradients(groups: Mapping[str, str]) -> optax.GradientTransformation:
    """Zeroes the frozen subtrees before clipping, so they count in no global norm."""
    def zero(updates, params=None):
        del params
        return _same_mapping(updates, {
            key: jax.tree.map(jnp.zeros_like, value) if groups[key] == FROZEN_GROUP else value
            for key, value in updates.items()})
    return optax.stateless(zero)


def _same_mapping(like: Mapping, items: dict) -> Mapping:
    """`items` in the container type of `like` (dict, flax FrozenDict), so trees match."""
    return items if type(like) is dict else type(like)(items)


def make_optimizer(config: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """The training optimizer for a params dict following the module's key convention.

    Args:
      config: the optimizer settings.
      params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s; only its top-level
        keys are read).
    Returns:
      An optax GradientTransformation: frozen-zeroing, global-norm clipping over the whole
      tree, per-group AdamW, wrapped in `optax.MultiSteps` if `accumulation_steps > 1`.
    Raises:
      ValueError: a top-level key outside the convention.
    """
    groups = parameter_groups(params)
    learning_rates = {"reader": config.reader_learning_rate,
                      "retriever": config.retriever_learning_rate}
    decay_mask = lambda tree: weight_decay_mask(tree, config.decay_embeddings)  # noqa: E731
    per_group = {}
    for group in sorted(set(groups.values())):
        if group == FROZEN_GROUP:
            per_group[group] = optax.set_to_zero()
        else:
            schedule = learning_rate_schedule(learning_rates[group], config)
            if group == "retriever":
                schedule = frozen_until(schedule, config.freeze_retriever_steps)
            per_group[group] = optax.adamw(
                schedule, b1=config.b1,
                b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                mask=decay_mask)
    steps = [_zero_frozen_gradients(groups)] if FROZEN_GROUP in groups.values() else []
    if config.clip_norm:
        steps.append(optax.clip_by_global_norm(config.clip_norm))
    labels = lambda tree: _same_mapping(tree, groups)  # noqa: E731 (prefix of the tree)
    steps.append(optax.multi_transform(per_group, labels))
    optimizer = optax.chain(*steps)
    if config.accumulation_steps > 1:
        optimizer = optax.MultiSteps(
            optimizer, every_k_schedule=config.accumulation_steps).gradient_transformation()
    return optimizer


def all_finite(loss: jax.Array, grads: Any) -> jax.Array:
    """Scalar bool: every element of `loss` and of every gradient leaf is finite."""
    finite = jnp.all(jnp.isfinite(loss))
    for leaf in jax.tree.leaves(grads):
        finite = jnp.logical_and(finite, jnp.all(jnp.isfinite(leaf)))
    return finite


def apply_gradients(optimizer: optax.GradientTransformation, grads: Any, opt_state: Any,
                    params: Any, loss: jax.Array) -> tuple[Any, Any, jax.Array]:
    """One optimizer update, skipped when the loss or a gradient is not finite.

    Pure and jit-able (`jax.jit(functools.partial(apply_gradients, optimizer))`); works on
    sharded trees. A skipped step returns `params` and `opt_state` unchanged bit for bit
    (the accumulation micro-step counter included: the micro-batch is dropped).

    Args:
      optimizer: from `make_optimizer`.
      grads: gradients, same structure as `params`.
      opt_state: the optimizer state.
      params: current parameters.
      loss: the step's loss (any shape).
    Returns:
      (new params, new opt_state, skipped: scalar bool array).
    """
    finite = all_finite(loss, grads)

    def update(operands):
        current_params, current_state = operands
        updates, new_state = optimizer.update(grads, current_state, current_params)
        return optax.apply_updates(current_params, updates), new_state

    new_params, new_state = jax.lax.cond(finite, update, lambda operands: operands,
                                         (params, opt_state))
    return new_params, new_state, jnp.logical_not(finite)


class NonFiniteTracker:
    """Host-side count of skipped (non-finite) steps; raises after too many in a row.

    Call `record(skipped)` once per step with `apply_gradients`'s flag; `metrics()` gives
    the counts for logging.
    """

    def __init__(self, max_consecutive: int | None):
        self.max_consecutive = max_consecutive
        self.total_skipped = 0
        self.consecutive_skipped = 0

    def record(self, skipped: Any) -> None:
        """Counts one step. Raises FloatingPointError at the `max_consecutive`-th skip in a
        row; a finite step resets the consecutive count."""
        if not bool(skipped):
            self.consecutive_skipped = 0
            return
        self.total_skipped += 1
        self.consecutive_skipped += 1
        if self.max_consecutive is not None and self.consecutive_skipped >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive_skipped} consecutive steps had a non-finite loss or "
                f"gradient and were skipped (limit OptimizerConfig.max_consecutive_nonfinite "
                f"= {self.max_consecutive}); lower the learning rate, check the data, or "
                "raise the limit")

    def metrics(self) -> dict[str, int]:
        """{'nonfinite/skipped_total', 'nonfinite/skipped_consecutive'}."""
        return {"nonfinite/skipped_total": self.total_skipped,
                "nonfinite/skipped_consecutive": self.consecutive_skipped}

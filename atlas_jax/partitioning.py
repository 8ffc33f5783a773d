"""Device mesh, t5x logical axis rules, and shardings of parameters and batches.

Logical axis names on parameters and activations (`batch, length, embed, mlp, heads, kv,
joined_kv, vocab, relpos_buckets, ...`) are mapped onto the mesh axes ('data', 'model') by
one rules table; everything that gets placed on devices goes through `logical_to_sharding`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")
LogicalRules = Sequence[tuple[str, Any]]


@gin.configurable
def create_mesh(shape: Sequence[int] = (-1, 1), devices: Sequence[jax.Device] | None = None
                ) -> Mesh:
    """A ('data', 'model') mesh; one entry of `shape` may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 2:
        raise ValueError(f"mesh shape must be (data, model), got {tuple(shape)}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh dimension may be -1, got {tuple(shape)}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"{len(devices)} available")
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


@gin.configurable
def standard_logical_axis_rules(parameter_partitioning_dims: int = 1) -> LogicalRules:
    """t5x's standard rules: 1 = model-parallel parameters (1D), 2 = additionally shard the
    embedding dimension of parameters over 'data' (FSDP-style, t5x 2D parameter rules)."""
    if parameter_partitioning_dims not in (1, 2):
        raise ValueError("parameter_partitioning_dims must be 1 or 2, got "
                         f"{parameter_partitioning_dims}")
    rules = [
        ("batch", "data"),
        ("vocab", "model"),
        ("mlp", "model"),
        ("heads", "model"),
        ("kv", None),
        ("joined_kv", "model"),
        ("embed", "data" if parameter_partitioning_dims == 2 else None),
    ]
    replicated = ["relpos_buckets", "abspos_buckets", "segments", "length", "layers", "stack",
                  "mlp_activations"]
    return rules + [(name, None) for name in replicated]


def logical_specs(boxed_tree: Any) -> Any:
    """Logical PartitionSpecs of a tree of `nn.LogicallyPartitioned` values (e.g. the result
    of `jax.eval_shape(model.init, ...)`)."""
    return nn.get_partition_spec(boxed_tree)


def logical_to_sharding(specs: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def abstract_params(init_fn: Callable[[jax.Array], Any]) -> tuple[Any, Any]:
    """(shapes, logical specs) of `init_fn(rng)['params']` without allocating anything."""
    boxed = jax.eval_shape(init_fn, jax.random.key(0))["params"]
    return nn.meta.unbox(boxed), logical_specs(boxed)


def param_shardings(init_fn: Callable[[jax.Array], Any], mesh: Mesh,
                    rules: LogicalRules | None = None) -> Any:
    """NamedShardings of the parameters created by `init_fn(rng)` under `rules`."""
    _, specs = abstract_params(init_fn)
    return logical_to_sharding(specs, mesh, rules or standard_logical_axis_rules())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over 'data', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def shard_params(params: Any, shardings: Any) -> Any:
    """Places a host tree of parameters onto the mesh per `shardings`."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)

"""Device mesh, t5x logical axis rules, and shardings of parameters and batches.

Logical axis names on parameters and activations (`batch, length, embed, mlp, heads, kv,
joined_kv, vocab, relpos_buckets, ...`) are mapped onto the mesh axes ('data', 'model') by
one rules table; everything that gets placed on devices goes through `logical_to_sharding`.

Three partitionings, chosen in gin (gin/runs/train_defaults.gin binds the macros):

  NUM_PARTITIONS       size of the 'model' axis (t5x's name); the 'data' axis takes the rest:
                       `create_mesh.shape = (-1, %NUM_PARTITIONS)`.
  PARTITIONING_RULES   `logical_axis_rules.name`:
    'data_parallel'    every parameter (and optimizer moment) replicated, the batch split
                       over all devices; needs NUM_PARTITIONS = 1.
    'model_parallel'   t5x's 1D rules (`standard_logical_axis_rules(1)`, the default): heads,
                       mlp, vocab split over 'model', replicated over 'data'.
    'fsdp'             t5x's 2D rules (`standard_logical_axis_rules(2)`): additionally the
                       `embed` dimension of parameters and optimizer moments over 'data'
                       (parameter/optimizer sharding, ZeRO-3 / FSDP-style); XLA gathers the
                       weights where they are used.

    atlas-jax train ... --gin.NUM_PARTITIONS=4 --gin.PARTITIONING_RULES="'fsdp'"

Optimizer state follows the parameters leaf for leaf (`optimizer_state_shardings`).
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


def data_parallel_rules() -> LogicalRules:
    """Every parameter axis replicated; only the batch is split (over 'data')."""
    replicated = ["vocab", "mlp", "heads", "kv", "joined_kv", "embed", "relpos_buckets",
                  "abspos_buckets", "segments", "length", "layers", "stack", "mlp_activations"]
    return [("batch", "data")] + [(name, None) for name in replicated]


RULE_SETS = {
    "data_parallel": data_parallel_rules,
    "model_parallel": lambda: standard_logical_axis_rules(),  # gin may bind its dims
    "fsdp": lambda: standard_logical_axis_rules(2),
}


@gin.configurable
def logical_axis_rules(name: str = "model_parallel") -> LogicalRules:
    """The rules table of partitioning `name` (PARTITIONING_RULES): 'data_parallel',
    'model_parallel' (t5x 1D) or 'fsdp' (t5x 2D); see the module docstring."""
    if name not in RULE_SETS:
        raise ValueError(f"partitioning rules {name!r} unknown (PARTITIONING_RULES / "
                         f"logical_axis_rules.name): use one of {', '.join(RULE_SETS)}")
    return tuple(RULE_SETS[name]())


def rules_name(rules: LogicalRules) -> str:
    """The RULE_SETS name of a rules table ('custom' for any other table)."""
    return next((name for name, make in RULE_SETS.items() if tuple(make()) == tuple(rules)),
                "custom")


def check_rules_fit_mesh(rules: LogicalRules, mesh: Mesh) -> None:
    """Data-parallel rules on a mesh with a 'model' axis would only copy the work: refuse."""
    if mesh.shape["model"] > 1 and all(axis is None for name, axis in rules if name != "batch"):
        raise ValueError(f"'data_parallel' partitioning replicates every parameter, so the "
                         f"mesh's model axis ({mesh.shape['model']} devices) would repeat "
                         "the same work: bind NUM_PARTITIONS = 1 or use 'model_parallel' / "
                         "'fsdp' rules")


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
    shapes, specs = abstract_params(init_fn)
    shardings = logical_to_sharding(specs, mesh, rules or standard_logical_axis_rules())
    return jax.tree.map(lambda x, s: divisible_sharding(x.shape, s), shapes, shardings)


def divisible_sharding(shape: Sequence[int], sharding: NamedSharding) -> NamedSharding:
    """`sharding` with the dimensions its mesh axes do not divide left unsplit (e.g. BERT's
    30522-row vocabulary on a 4-way 'model' axis: that table is replicated over 'model'
    instead of failing; every divisible dimension keeps its split)."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for dim, axes in enumerate(spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if names and shape[dim] % int(np.prod([sharding.mesh.shape[a] for a in names])):
            spec[dim] = None
    spec = PartitionSpec(*spec[:len(sharding.spec)])
    return sharding if spec == sharding.spec else NamedSharding(sharding.mesh, spec)


def optimizer_state_shardings(abstract_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optimizer state (e.g. `jax.eval_shape(optimizer.init, params)`): a
    leaf whose key path ends with a parameter's path (AdamW's `mu[...]`, `nu[...]` copies
    of the parameter tree, inside any chain / multi_transform / MultiSteps nesting) takes
    that parameter's sharding; counters and other leaves are replicated."""
    by_path = {tuple(path): sharding for path, sharding in
               jax.tree_util.tree_flatten_with_path(params_shardings)[0]}
    longest = max(map(len, by_path), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(path, leaf):
        for start in range(max(len(path) - longest, 0), len(path)):
            sharding = by_path.get(tuple(path[start:]))
            if sharding is not None and len(sharding.spec) <= len(np.shape(leaf)):
                return sharding
        return replicated
    return jax.tree_util.tree_map_with_path(sharding_of, abstract_state)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over 'data', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def shard_params(params: Any, shardings: Any) -> Any:
    """Places a host tree of parameters onto the mesh per `shardings`."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)

"""The retriever's towers compiled on a device mesh: the one jit embedding path of the
project. Corpus embedding (`index.embedding.embed_corpus`), the trainer's query embedding and
reranking and `ask` (`inference.embed_fn`), and `Retriever.embed` all run
`embed_tokens` / `compiled_tower`: a tower compiled ahead of time per (batch, length) shape and
parameter layout, batch split over the mesh's 'data' axis."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from atlas_jax import distributed, partitioning
from atlas_jax.models import retriever as retriever_lib

TOWERS = ("query", "passage")


@functools.lru_cache(maxsize=64)
def compiled_tower(config: retriever_lib.RetrieverConfig, tower: str, mesh: Mesh, rules: tuple,
                   batch: int, length: int, param_signature: tuple, precision: Any) -> Any:
    """The passage (or query) tower compiled for ids and mask (batch, length) on `mesh`
    (`precision`: the jax_default_matmul_precision it is traced under, part of the key)."""
    model = retriever_lib.DualEncoder(config)
    treedef, leaves = param_signature
    abstract_params = jax.tree.unflatten(treedef, [
        jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for shape, dtype, sharding in leaves])
    data_sharding = NamedSharding(mesh, PartitionSpec("data", None))
    method = model.embed_passages if tower == "passage" else model.embed_queries

    def embed(params, ids, mask):  # (batch, length) x2 -> (batch, D) float32
        return model.apply({"params": params}, ids, mask, method=method)

    token_struct = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=data_sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(embed, out_shardings=data_sharding).lower(
            abstract_params, token_struct, token_struct).compile()


@functools.lru_cache(maxsize=16)
def _param_shardings(config: retriever_lib.RetrieverConfig, mesh: Mesh, rules: tuple) -> Any:
    """NamedShardings of the whole DualEncoder parameter tree under `rules`."""
    ones = jnp.ones((1, 4), jnp.int32)
    return partitioning.param_shardings(
        lambda rng: retriever_lib.DualEncoder(config).init(rng, ones, ones, ones, ones),
        mesh, rules)


def place_tower_params(config: retriever_lib.RetrieverConfig, params: Any, tower: str,
                       mesh: Mesh, rules: tuple) -> Any:
    """The subtree the tower reads (`encoder` or `{tower}_encoder`), placed on `mesh` by the
    logical axis rules (a no-op for parameters already placed that way)."""
    name = "encoder" if config.shared_towers else f"{tower}_encoder"
    params = nn.meta.unbox(params)
    if name not in params:
        raise ValueError(f"retriever parameters have no {name!r} subtree (found "
                         f"{sorted(params)}); shared_towers={config.shared_towers}")
    shardings = _param_shardings(config, mesh, rules)
    return partitioning.shard_params({name: params[name]}, {name: shardings[name]})


def param_signature(params: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype), x.sharding) for x in leaves)


def as_rules(rules: Sequence | None) -> tuple:
    """Hashable logical axis rules; default `partitioning.standard_logical_axis_rules()`."""
    return tuple(tuple(r) for r in (rules if rules is not None
                                    else partitioning.standard_logical_axis_rules()))


def local_mesh() -> Mesh:
    """A ('data', 'model') mesh over this process's devices, batch split over all of them."""
    return partitioning.create_mesh((-1, 1), jax.local_devices())


def embed_tokens(config: retriever_lib.RetrieverConfig, params: Any, ids: np.ndarray,
                 mask: np.ndarray, tower: str = "query", mesh: Mesh | None = None,
                 rules: Sequence | None = None) -> np.ndarray:
    """Token ids and attention mask (N, L) -> float32 embeddings (N, D) on the host. `params`:
    the retriever's parameter tree (host arrays, or already placed by `rules` on `mesh`); the
    rows are padded to a multiple of the 'data' axis (default mesh: `local_mesh()`)."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be 'query' or 'passage', got {tower!r}")
    mesh = mesh if mesh is not None else local_mesh()
    rules = as_rules(rules)
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    count = len(ids)
    pad = -count % mesh.shape["data"]
    if pad or not count:
        pad = pad or mesh.shape["data"]
        ids = np.concatenate([ids, np.zeros((pad,) + ids.shape[1:], np.int32)])
        mask = np.concatenate([mask, np.zeros((pad,) + mask.shape[1:], np.int32)])
    placed = place_tower_params(config, params, tower, mesh, rules)
    compiled = compiled_tower(config, tower, mesh, rules, len(ids), ids.shape[1],
                              param_signature(placed), jax.config.jax_default_matmul_precision)
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    out = compiled(placed, jax.device_put(ids, sharding), jax.device_put(mask, sharding))
    return distributed.host_array(out).astype(np.float32)[:count]

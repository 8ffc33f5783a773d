"""Per-layer <-> stacked (scanned) parameter layouts, and the remat policies by name.

A stack of N identical layers is stored either per layer (t5x's and Hugging Face's names)

    encoder/layers_0/attention/query/kernel   (embed, joined_kv)
    ...
    encoder/layers_{N-1}/attention/query/kernel

or, when the model scans over its layers (`T5Config.scan_layers`, `RetrieverConfig.scan_layers`;
`nn.scan`, one compiled layer body however deep the model), stacked on a leading `layers` axis

    encoder/layers/attention/query/kernel     (layers, embed, joined_kv)

`stack_layers` and `unstack_layers` convert any tree between the two (parameters, optimizer
moments that mirror them, `jax.ShapeDtypeStruct`s): every dict holding `layers_0 .. layers_{N-1}`
becomes one holding `layers`, and back. Every loader reads the per-layer layout and the gin
builders convert to the configured one (`to_layout`), so a Hugging Face, t5x or Atlas
checkpoint loads into either; every exporter writes the per-layer layout.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

LAYER_KEY = re.compile(r"layers_(\d+)")
STACKED = "layers"


def _stack_leaves(*leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
    if isinstance(first, jax.Array):
        return jax.numpy.stack(leaves)
    return np.stack([np.asarray(x) for x in leaves])


def _unstack_leaf(leaf, index: int):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
    return leaf[index]


def _layer_indices(tree: dict) -> list[int]:
    return sorted(int(m[1]) for key in tree if (m := LAYER_KEY.fullmatch(str(key))))


def _each_dict(fn: Callable[[dict], Any], tree: Any) -> Any:
    """fn on every outermost dict of a non-dict tree (e.g. an optax state of NamedTuples)."""
    return jax.tree.map(lambda x: fn(x) if isinstance(x, dict) else x, tree,
                        is_leaf=lambda x: isinstance(x, dict))


def stack_layers(tree: Any) -> Any:
    """Per-layer -> stacked: `layers_0 .. layers_{N-1}` (consecutive, same structure) -> `layers`
    with a leading axis of N. Trees already stacked are returned unchanged."""
    if not isinstance(tree, dict):
        return _each_dict(stack_layers, tree)
    indices = _layer_indices(tree)
    out = {key: stack_layers(value) for key, value in tree.items()
           if not LAYER_KEY.fullmatch(str(key))}
    if indices:
        if indices != list(range(len(indices))):
            raise ValueError(f"layers {indices} are not 0..{len(indices) - 1}: cannot stack")
        if STACKED in out:
            raise ValueError("a tree with both 'layers' and 'layers_N' cannot be stacked")
        per_layer = [tree[f"layers_{i}"] for i in indices]
        structure = jax.tree.structure(per_layer[0])
        for i, layer in enumerate(per_layer):
            if jax.tree.structure(layer) != structure:
                raise ValueError(f"layers_{i} differs in structure from layers_0: cannot stack")
        out[STACKED] = jax.tree.map(_stack_leaves, *per_layer)
    return out


def unstack_layers(tree: Any) -> Any:
    """Stacked -> per-layer: `layers` (leading axis N) -> `layers_0 .. layers_{N-1}`. Trees
    already per layer are returned unchanged."""
    if not isinstance(tree, dict):
        return _each_dict(unstack_layers, tree)
    out = {}
    for key, value in tree.items():
        if key == STACKED and isinstance(value, dict):
            leaves = jax.tree.leaves(value)
            depth = leaves[0].shape[0] if leaves else 0
            for i in range(depth):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: _unstack_leaf(x, i), value)
        else:
            out[key] = unstack_layers(value)
    return out


def is_stacked(tree: Any) -> bool:
    """Whether any dict of `tree` holds a stacked `layers` entry."""
    if not isinstance(tree, dict):
        return any(is_stacked(x) for x in jax.tree.leaves(
            tree, is_leaf=lambda x: isinstance(x, dict)) if isinstance(x, dict))
    return any((key == STACKED and isinstance(value, dict)) or is_stacked(value)
               for key, value in tree.items())


def to_layout(tree: Any, scanned: bool) -> Any:
    """`tree` in the stacked layout when `scanned`, else per layer (from either)."""
    return stack_layers(unstack_layers(tree)) if scanned else unstack_layers(tree)


def init_params(model_cls, config: Any, rng: jax.Array, *args) -> Any:
    """Unboxed parameters of `model_cls(config)` in `config`'s layout, initialised as the
    per-layer model's: a seed gives the same weights scanned or not (nn.scan would otherwise
    split the layers' keys differently)."""
    per_layer = model_cls(dataclasses.replace(config, scan_layers=False))
    params = nn.meta.unbox(per_layer.init(rng, *args)["params"])
    return to_layout(params, config.scan_layers)


# ----------------------------------------------------------------------------- remat

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")


def remat_policy(remat: bool | str) -> tuple[bool, Callable | None]:
    """(rematerialise?, jax checkpoint policy) for a config's `remat`:

      False / 'none'        keep every activation for the backward pass (fastest, most memory)
      True / 'full'         keep only each layer's input; recompute the layer (least memory)
      'save_dots'           keep the outputs of every matmul, recompute the rest (norms,
                            activations, softmax): most of the saving of 'full' at a fraction
                            of its recompute
      'save_dots_no_batch'  keep the matmuls without batch dimensions (the projections, not
                            the attention scores); t5x's / maxtext's 'minimal'
    """
    name = {False: "none", True: "full"}.get(remat, remat) if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat = {remat!r}: use one of {list(REMAT_POLICIES)} (or True/False)")
    policies = jax.checkpoint_policies
    return name != "none", {
        "none": None, "full": policies.nothing_saveable, "save_dots": policies.checkpoint_dots,
        "save_dots_no_batch": policies.dots_with_no_batch_dims_saveable}[name]


def layer_stack(layer_cls, *, remat: bool | str, scan: bool, length: int,
                static_argnums: tuple[int, ...], broadcast_args: int):
    """The layer class a stack instantiates: `layer_cls` rematerialised under the `remat`
    policy, and when `scan`, wrapped in `nn.scan` over `length` layers (parameters, cache and
    sown intermediates stacked on a leading axis named 'layers' in the logical axis rules; the
    carry is the first argument, the other `broadcast_args` are shared by every layer).
    With `scan` one instance is the whole stack, named `layers`; else one per layer."""
    enabled, policy = remat_policy(remat)
    cls = layer_cls
    if enabled:
        # In a scan, XLA cannot CSE across the loop body: prevent_cse only costs (t5x).
        cls = nn.remat(cls, policy=policy, static_argnums=static_argnums, prevent_cse=not scan)
    if scan:
        cls = nn.scan(cls, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * broadcast_args, length=length,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return cls

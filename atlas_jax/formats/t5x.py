"""t5x checkpoints -> this project's T5 reader, without t5x.

Native layout (t5x/checkpoints.py, versions 2 and 3): `checkpoint_N/checkpoint`, a msgpack
file written by flax.serialization of {"version", "optimizer": {"target": params, "state":
...}} (a file without "version" is the state dict itself). Each array is either inline (flax's
msgpack ext type 1: [shape, dtype name, C-order bytes]) or a tensorstore spec {"driver":
"zarr", "kvstore": {"path": "target.encoder.layers_0.attention.query.kernel"}, ...} naming a
zarr v2 folder beside the file (`.zarray` + compressed chunks). Version 2 stored bfloat16 as
uint16 bits; version 3 as tensorstore's native bfloat16.

Orbax layout (newer t5x): `checkpoint_N/state/`, one zarr folder per leaf with the same
dotted names (and `_METADATA`); params are `target.*`.

Parameter names are ours already (t5x's T5 1.1 network: `token_embedder/embedding`,
`encoder/layers_i/attention/query/kernel`, `encoder/relpos_bias/rel_embedding` (heads,
buckets), `mlp/wi_0, wi_1, wo` or `mlp/wi`, `decoder/logits_dense/kernel` when untied), so the
config is read off the shapes. Only `target` is read: optimizer slots stay on disk.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

from atlas_jax.formats.hf import (CheckpointError, flat_shapes, t5_abstract_params,
                                  t5_config_from_sizes, unflatten)
from atlas_jax.models import t5

_TS_KEYS = {"driver", "kvstore", "metadata"}


def _is_msgpack_map(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError:
        return False
    return bool(first) and (0x80 <= first[0] <= 0x8f or first[0] in (0xde, 0xdf))


def _native_file(path: Path) -> Path | None:
    if path.is_file() and path.name == "checkpoint" and _is_msgpack_map(path):
        return path
    if path.is_dir() and (path / "checkpoint").is_file() and _is_msgpack_map(path / "checkpoint"):
        return path / "checkpoint"
    return None


def _orbax_state(path: Path) -> Path | None:
    for folder in (path / "state", path):
        if folder.is_dir() and (folder / "_METADATA").is_file():
            return folder
    return None


def _orbax_leaves(state: Path) -> list[tuple[str, ...]]:
    """The leaves' key paths listed in an orbax PyTree `_METADATA`."""
    source = state / "_METADATA"
    try:
        tree = json.loads(source.read_text()).get("tree_metadata")
        leaves = [tuple(str(k["key"]) for k in entry["key_metadata"])
                  for entry in tree.values()]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{source}: not a readable orbax tree metadata file "
                              f"({type(e).__name__}: {e})") from None
    if not any(keys and keys[0] == "target" for keys in leaves):
        raise CheckpointError(f"{source}: no 'target' parameters in this orbax checkpoint")
    return leaves


def is_t5x_checkpoint(path: Path) -> bool:
    return _native_file(path) is not None or (path.is_dir() and _orbax_state(path) is not None)


# ----------------------------------------------------------------------------- reading arrays

def _dtype(name: bytes | str):
    name = name.decode() if isinstance(name, bytes) else name
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _ext_hook(code: int, data: bytes):
    if code in (1, 3):   # flax: ndarray / numpy scalar as [shape, dtype name, bytes]
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        array = np.frombuffer(buffer, dtype=_dtype(dtype)).reshape(shape)
        return array[()] if code == 3 else array
    if code == 2:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _read_msgpack(path: Path) -> dict:
    try:
        tree = msgpack.unpackb(path.read_bytes(), ext_hook=_ext_hook, raw=False,
                               strict_map_key=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError,
            TypeError) as e:
        raise CheckpointError(f"{path}: not a readable t5x msgpack checkpoint "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: holds a msgpack {type(tree).__name__}, not a t5x "
                              "checkpoint map")
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}; a tensorstore spec or a chunked array is a leaf."""
    if isinstance(tree, dict) and not _is_spec(tree) and "__msgpack_chunked_array__" not in tree:
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    return {prefix[:-1]: tree}


def _is_spec(value: Any) -> bool:
    return isinstance(value, dict) and _TS_KEYS <= set(value)


def _unchunk(value: dict) -> np.ndarray:
    chunks = [value["chunks"][str(i)] for i in range(len(value["chunks"]))]
    shape = [value["shape"][str(i)] for i in range(len(value["shape"]))]
    return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)


def read_zarr(folder: Path, name: str) -> np.ndarray:
    """A zarr v2 array folder (gzip, zstd, ... chunks; missing chunks are the fill value),
    read through tensorstore; errors name the array."""
    import tensorstore as ts
    if not (folder / ".zarray").is_file():
        raise CheckpointError(f"{folder}: array folder of {name} missing (no .zarray)")
    try:
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder)}},
                        open=True, read=True).result()
        return np.asarray(store.read().result())
    except Exception as e:  # tensorstore raises ValueError subclasses with long messages
        raise CheckpointError(f"{folder}: array {name} is unreadable (truncated or corrupt "
                              f"chunk?): {' '.join(str(e).split())[:240]}") from None


def _leaf(value: Any, name: str, base: Path, source: Path) -> np.ndarray:
    if _is_spec(value):
        kvstore = value.get("kvstore") or {}
        relative = str(kvstore.get("path") or value.get("path") or "").rstrip("/")
        if not relative:
            raise CheckpointError(f"{source}: array {name}: tensorstore spec without a path")
        array = read_zarr(base / Path(relative).name, name)
    elif isinstance(value, dict) and "__msgpack_chunked_array__" in value:
        array = _unchunk(value)
    elif isinstance(value, np.ndarray):
        array = value
    else:
        raise CheckpointError(f"{source}: array {name} is a {type(value).__name__}, not an array")
    if array.dtype == np.uint16:     # version 2: bfloat16 saved as its bits
        array = array.view(ml_dtypes.bfloat16)
    return np.asarray(array, dtype=np.float32)


def read_target(path: Path) -> tuple[dict[str, np.ndarray], Path]:
    """{'encoder/layers_0/...': float32 array} of a t5x checkpoint's `target`."""
    native = _native_file(path)
    if native is not None:
        tree = _read_msgpack(native)
        version = tree.get("version", 0)
        if "version" in tree:
            if not isinstance(version, int) or version < 2:
                raise CheckpointError(f"{native}: t5x checkpoint version {version!r}; versions "
                                      "2 and 3 are supported")
            tree = tree.get("optimizer")
        target = tree.get("target") if isinstance(tree, dict) else None
        if not isinstance(target, dict):
            raise CheckpointError(f"{native}: no optimizer.target parameter tree")
        return {name: _leaf(value, name, native.parent, native)
                for name, value in _flatten(target).items()}, native
    state = _orbax_state(path)
    if state is None:
        raise CheckpointError(f"{path}: not a t5x checkpoint (no msgpack 'checkpoint' file, no "
                              "orbax state/ folder)")
    _orbax_leaves(state)   # a readable _METADATA that lists target leaves
    import jax
    tree = restore_orbax_subtree(state, "target")
    arrays = {"/".join(str(k.key) for k in keys): np.asarray(leaf)
              for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return {name: (array.view(ml_dtypes.bfloat16) if array.dtype == np.uint16 else array
                   ).astype(np.float32) for name, array in arrays.items()}, state


def restore_orbax_subtree(state: Path, key: str) -> Any:
    """One top-level subtree (`target`, `params`) of an orbax PyTree checkpoint as numpy
    arrays, through orbax (per-array zarr folders or OCDBT alike); nothing else is read."""
    import jax
    import orbax.checkpoint as ocp
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(state)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        item = {key: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[key])}
        restored = checkpointer.restore(state, args=ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)))
    except Exception as e:  # orbax and tensorstore raise many types, with long messages
        raise CheckpointError(f"{state}: orbax checkpoint unreadable ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:240]})") from None
    return restored[key]


# ----------------------------------------------------------------------------- T5

def flatten_heads(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """3-D attention kernels ((embed, heads, kv) and out (heads, kv, embed)) -> 2-D."""
    out = {}
    for name, array in arrays.items():
        if array.ndim == 3 and name.endswith(("query/kernel", "key/kernel", "value/kernel")):
            array = array.reshape(array.shape[0], -1)
        elif array.ndim == 3 and name.endswith("out/kernel"):
            array = array.reshape(-1, array.shape[-1])
        out[name] = array
    return out


def config_from_arrays(arrays: dict[str, np.ndarray], source: Path,
                       max_distance: int | None = None) -> t5.T5Config:
    def shape(name):
        if name not in arrays:
            raise CheckpointError(f"{source}: array {name} is missing from target (not a T5 "
                                  "encoder-decoder?)")
        return arrays[name].shape

    if any(name.startswith(("encoder/layers/", "decoder/layers/")) for name in arrays):
        raise CheckpointError(f"{source}: scanned-layer (scalable_t5) checkpoints are not "
                              "supported; unscanned t5x T5 checkpoints are")
    vocab, emb = shape("token_embedder/embedding")
    heads, buckets = shape("encoder/relpos_bias/rel_embedding")
    gated = "encoder/layers_0/mlp/wi_0/kernel" in arrays

    def count(stack):
        return len({n.split("/")[1] for n in arrays if n.startswith(f"{stack}/layers_")})

    return t5_config_from_sizes(
        vocab_size=vocab, emb_dim=emb, num_heads=heads, num_buckets=buckets,
        head_dim=shape("encoder/layers_0/attention/query/kernel")[1] // heads,
        mlp_dim=shape("encoder/layers_0/mlp/" + ("wi_0" if gated else "wi") + "/kernel")[1],
        num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"), gated=gated,
        tied="decoder/logits_dense/kernel" not in arrays, max_distance=max_distance)


def load_t5(path: Path, max_distance: int | None = None) -> tuple[t5.T5Config, dict]:
    """(config, params) of a t5x T5 checkpoint, every array checked against the config."""
    arrays, source = read_target(path)
    arrays = flatten_heads(arrays)
    if "projection_layer/kernel" in arrays:
        raise CheckpointError(f"{source}: a t5x_retrieval dual encoder, not a T5 "
                              "encoder-decoder: load it with load_retriever")
    config = config_from_arrays(arrays, source, max_distance)
    check_arrays(arrays, flat_shapes(t5_abstract_params(config)), source,
                 "a T5 of the inferred config")
    return config, unflatten(arrays)


def check_arrays(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                 source: Path, what: str) -> None:
    """Every expected array present with its shape, nothing else; one line naming the first
    array at fault otherwise."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source}: target does not fit {what} (missing {missing[:4]}, "
                              f"unexpected {extra[:4]})")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: array {name} has shape {arrays[name].shape}, "
                                  f"{what} implies {tuple(shape)}")

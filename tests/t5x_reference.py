"""t5x checkpoints written the way t5x writes them (t5x/checkpoints.py), from a transformers
T5's weights, for the import tests: msgpack via flax.serialization holding
{"version", "optimizer": {"target", "state"}}, each array a tensorstore zarr v2 folder with
gzip chunks named by its dotted tree path (or inline in the msgpack), bfloat16 natively
(version 3) or as uint16 bits (version 2); and the orbax layout (checkpoint_N/state/)."""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np

from atlas_jax.formats.hf import unflatten


def t5x_params_from_hf(state_dict: dict, gated: bool, untied: bool) -> dict[str, np.ndarray]:
    """t5x's T5 parameter names (flat, '/'-joined) from a transformers state dict: the
    inverse of transformers' convert_t5x_checkpoint_to_pytorch (kernels are weight.T)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in state_dict.items()}
    out = {"token_embedder/embedding": sd["shared.weight"]}
    for side in ("encoder", "decoder"):
        out[f"{side}/relpos_bias/rel_embedding"] = sd[
            f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T
        out[f"{side}/{side}_norm/scale"] = sd[f"{side}.final_layer_norm.weight"]
        layers = {int(k.split(".")[2]) for k in sd if k.startswith(f"{side}.block.")}
        for i in sorted(layers):
            hf = f"{side}.block.{i}.layer"
            ours = f"{side}/layers_{i}"
            attention = ([("attention", 0, "SelfAttention", "pre_attention_layer_norm")]
                         if side == "encoder" else
                         [("self_attention", 0, "SelfAttention", "pre_self_attention_layer_norm"),
                          ("encoder_decoder_attention", 1, "EncDecAttention",
                           "pre_cross_attention_layer_norm")])
            for name, j, hf_name, norm in attention:
                for t5x_name, short in (("query", "q"), ("key", "k"), ("value", "v"),
                                        ("out", "o")):
                    out[f"{ours}/{name}/{t5x_name}/kernel"] = sd[f"{hf}.{j}.{hf_name}.{short}.weight"].T
                out[f"{ours}/{norm}/scale"] = sd[f"{hf}.{j}.layer_norm.weight"]
            j = len(attention)
            out[f"{ours}/pre_mlp_layer_norm/scale"] = sd[f"{hf}.{j}.layer_norm.weight"]
            for name in (["wi_0", "wi_1"] if gated else ["wi"]) + ["wo"]:
                out[f"{ours}/mlp/{name}/kernel"] = sd[f"{hf}.{j}.DenseReluDense.{name}.weight"].T
    if untied:
        out["decoder/logits_dense/kernel"] = sd["lm_head.weight"].T
    return out


def write_zarr(folder: Path, array: np.ndarray, dtype: str, compressor: str = "gzip") -> dict:
    """One array as t5x writes it through tensorstore; returns the spec t5x stores."""
    import tensorstore as ts
    chunks = [max(1, (s + 1) // 2) for s in array.shape] or [1]   # edge chunks get cropped
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder)},
            "metadata": {"compressor": {"id": compressor}, "shape": list(array.shape),
                         "chunks": chunks, "dtype": dtype}}
    store = ts.open(spec, create=True, delete_existing=True).result()
    store.write(array).result()
    return {"driver": "zarr", "dtype": "bfloat16" if dtype == "bfloat16" else "float32",
            "kvstore": {"driver": "file", "path": folder.name + "/"},
            "metadata": {"chunks": chunks, "compressor": {"id": compressor},
                         "shape": list(array.shape)}}


def write_t5x_native(folder: Path, params: dict[str, np.ndarray], *, version: int = 3,
                     bfloat16: tuple[str, ...] = (), inline: tuple[str, ...] = (),
                     zstd: tuple[str, ...] = ()) -> Path:
    """`folder/checkpoint` (msgpack) + one zarr folder per array, optimizer slots included."""
    from flax import serialization
    folder.mkdir(parents=True, exist_ok=True)
    target, slots = {}, {}
    for name, array in params.items():
        if name in inline:
            target[name] = array
            continue
        dotted = "target." + name.replace("/", ".")
        if name in bfloat16:
            value = array.astype(ml_dtypes.bfloat16)
            if version == 2:
                target[name] = write_zarr(folder / dotted, value.view(np.uint16), "<u2")
            else:
                target[name] = write_zarr(folder / dotted, value, "bfloat16")
        else:   # newer jax writes zstd chunks
            target[name] = write_zarr(folder / dotted, array, "<f4",
                                      "zstd" if name in zstd else "gzip")
        if array.ndim == 2:   # Adafactor's factored second moments, as t5x keeps them
            row = "state.param_states." + name.replace("/", ".") + ".v_row"
            slots[name + "/v_row"] = write_zarr(folder / row, np.ones(array.shape[0], np.float32),
                                                "<f4")
    state = {"step": np.int32(100), "param_states": unflatten(slots)}
    data = serialization.to_bytes({"version": version,
                                   "optimizer": {"target": unflatten(target), "state": state}})
    (folder / "checkpoint").write_bytes(data)
    return folder


def write_t5x_orbax(folder: Path, params: dict[str, np.ndarray], ocdbt: bool = False) -> Path:
    """checkpoint_N/state/ as t5x's orbax checkpoint manager writes it (one folder per leaf;
    `ocdbt`: orbax's newer default single-store layout)."""
    import orbax.checkpoint as ocp
    state = {"target": unflatten(params),
             "state": {"step": np.int32(100),
                       "param_states": unflatten({k + "/v": np.ones_like(v)
                                              for k, v in list(params.items())[:3]})}}
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt))
    checkpointer.save(folder / "state", state)
    return folder


def write_t5x_retrieval(folder: Path, encoder, projection: np.ndarray, gated: bool) -> Path:
    """A t5x_retrieval dual-encoder checkpoint (flaxformer DualEncoder target: token_embedder,
    encoder/..., projection_layer/kernel) from a transformers T5EncoderModel's weights."""
    sd = dict(encoder.state_dict())
    out = {"token_embedder/embedding": sd["shared.weight"].detach().numpy().astype(np.float32),
           **_encoder_params(sd, gated)}
    out["projection_layer/kernel"] = projection.astype(np.float32)
    return write_t5x_native(folder, out)


def _encoder_params(sd: dict, gated: bool) -> dict[str, np.ndarray]:
    arrays = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
    out = {"encoder/relpos_bias/rel_embedding":
           arrays["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T,
           "encoder/encoder_norm/scale": arrays["encoder.final_layer_norm.weight"]}
    layers = {int(k.split(".")[2]) for k in arrays if k.startswith("encoder.block.")}
    for i in sorted(layers):
        hf, ours = f"encoder.block.{i}.layer", f"encoder/layers_{i}"
        for t5x_name, short in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
            out[f"{ours}/attention/{t5x_name}/kernel"] = arrays[f"{hf}.0.SelfAttention.{short}.weight"].T
        out[f"{ours}/pre_attention_layer_norm/scale"] = arrays[f"{hf}.0.layer_norm.weight"]
        out[f"{ours}/pre_mlp_layer_norm/scale"] = arrays[f"{hf}.1.layer_norm.weight"]
        for name in (["wi_0", "wi_1"] if gated else ["wi"]) + ["wo"]:
            out[f"{ours}/mlp/{name}/kernel"] = arrays[f"{hf}.1.DenseReluDense.{name}.weight"].T
    return out

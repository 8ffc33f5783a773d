"""T5-encoder retriever towers as Hugging Face / sentence-transformers folders (the layout of
sentence-transformers' own GTR ports): config.json + model.safetensors of a T5EncoderModel,
modules.json, 1_Pooling (mean), 2_Dense (the projection, no bias:
2_Dense/model.safetensors `linear.weight` (out, in)), 3_Normalize when L2-normalised,
sentence_bert_config.json (max length), and the SentencePiece model as spiece.model when
known. `save_tower` writes one, `load_tower` reads one back (and sentence-transformers'
GTR folders)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax import fileio
from atlas_jax.formats import hf
from atlas_jax.models import retriever as retriever_lib

DENSE = "2_Dense"


def _encoder_mapping(config: retriever_lib.RetrieverConfig) -> dict:
    t5_config = dataclasses.replace(config.t5_config(), logits_via_embedding=True)
    return {ours: value for ours, value in hf.t5_hf_mapping(t5_config).items()
            if ours.startswith(("encoder/", "token_embedder/"))}


def is_tower_folder(folder: Path) -> bool:
    if not (folder / "config.json").is_file() or not (folder / "modules.json").is_file():
        return False
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type == "t5"


def save_tower(retriever, folder: Path, tower: str = "query") -> Path:
    from safetensors.numpy import save as save_bytes
    config = retriever.config
    flat = hf.tower_arrays(retriever.params, tower)
    tensors = {theirs: np.ascontiguousarray(transform(flat[ours]))
               for ours, (theirs, transform) in _encoder_mapping(config).items()}
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = hf.t5_hf_config(config.t5_config()) | {
        "architectures": ["T5EncoderModel"], "num_decoder_layers": 0}
    fileio.atomic_write_json(folder / "config.json", hf_config)
    fileio.atomic_write_bytes(folder / "model.safetensors",
                              save_bytes(tensors, metadata={"format": "pt"}))
    (folder / DENSE).mkdir(exist_ok=True)
    kernel = flat["projection_layer/kernel"]
    fileio.atomic_write_json(folder / DENSE / "config.json", {
        "in_features": int(kernel.shape[0]), "out_features": int(kernel.shape[1]),
        "bias": False, "activation_function": "torch.nn.modules.linear.Identity"})
    fileio.atomic_write_bytes(folder / DENSE / "model.safetensors", save_bytes(
        {"linear.weight": np.ascontiguousarray(kernel.T)}, metadata={"format": "pt"}))
    hf.write_sentence_transformers(folder, config, dense=DENSE)
    spiece = getattr(retriever.tokenizer, "path", None)
    if spiece is not None:
        fileio.atomic_write_bytes(folder / "spiece.model", Path(spiece).read_bytes())
    return folder


def load_tower(folder: Path) -> tuple[retriever_lib.RetrieverConfig, dict, Any]:
    """(config, {"encoder": tower}, tokenizer or None) of a T5-encoder tower folder."""
    from atlas_jax.formats import t5x_retrieval
    config_path = folder / "config.json"
    tensors = hf.read_safetensors(folder)
    t5 = hf.t5_config_from_hf(hf.read_config(config_path), tensors, config_path)
    modules = hf.read_json(folder / "modules.json")
    dense = [m for m in modules if str(m.get("type", "")).endswith("Dense")]
    if len(dense) != 1:
        raise hf.CheckpointError(f"{folder / 'modules.json'}: a T5 retriever folder needs one "
                                 "Dense (projection) module")
    dense_folder = folder / dense[0]["path"]
    dense_tensors = hf.read_safetensors(dense_folder)
    if "linear.weight" not in dense_tensors or "linear.bias" in dense_tensors:
        raise hf.CheckpointError(f"{dense_folder / 'model.safetensors'}: needs linear.weight "
                                 "and no bias (t5x_retrieval's projection has none)")
    projection = dense_tensors["linear.weight"][0]
    max_length = 512
    if (folder / "sentence_bert_config.json").is_file():
        max_length = int(hf.read_json(folder / "sentence_bert_config.json").get(
            "max_seq_length", max_length))
    config = retriever_lib.RetrieverConfig(
        scan_layers=False, remat=False,  # every format is per layer (stacking.py)
        architecture="t5", vocab_size=t5.vocab_size, hidden_size=t5.emb_dim,
        num_layers=t5.num_encoder_layers, num_heads=t5.num_heads, head_dim=t5.head_dim,
        mlp_dim=t5.mlp_dim, mlp_activations=tuple(t5.mlp_activations),
        relative_attention_num_buckets=t5.relative_attention_num_buckets,
        relative_attention_max_distance=t5.relative_attention_max_distance,
        layer_norm_epsilon=t5.layer_norm_epsilon, projection_dim=int(projection.shape[0]),
        pooling="mean", normalize=any(str(m.get("type", "")).endswith("Normalize")
                                      for m in modules),
        max_length=max_length, max_position_embeddings=max_length)
    tower = hf.assemble(tensors, folder, _encoder_mapping(config),
                        {k: v for k, v in hf.flat_shapes(t5x_retrieval.abstract_tower(config))
                         .items() if k != "projection_layer/kernel"})
    tower["projection_layer"] = {"kernel": np.ascontiguousarray(projection.T)}
    tokenizer = None
    if (folder / "spiece.model").is_file():
        tokenizer = t5x_retrieval.SentencePieceTokenizer(folder / "spiece.model", max_length)
    elif (folder / "tokenizer.json").is_file():
        tokenizer = hf.tokenizer_from_file(folder / "tokenizer.json", max_length)
    return config, {"encoder": tower}, tokenizer

"""The Atlas reference's checkpoints (`checkpoint/step-N/model.pth.tar`).

The file is `torch.save` of {"step", "model": state_dict, "opt": argparse.Namespace,
"optimizer", "scheduler", "retr_optimizer", "retr_scheduler"}; it is read through
`torch_pickle` (an allow-list unpickler: nothing in the file runs, and the optimizer states are
never read). State-dict keys:
  reader.*                         Hugging Face T5 names (Atlas's FiD adds no nesting)
  retriever.contriever.*           tied Contriever (BERT, mean pooling, no normalisation)
  retriever.query_contriever.*     untied (query-side training), with
  retriever.passage_contriever.*
optionally with `module.` after the first component (fairscale / DDP wrappers), and BERT's
`embeddings.position_ids` buffer (ignored). Configs are inferred from the shapes; Contriever's
head size is 64 unless `head_dim` is given.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax.formats import torch_pickle
from atlas_jax.formats.hf import (CheckpointError, bert_params, t5_config_from_hf_shapes,
                                  t5_params)
from atlas_jax.models import retriever as retriever_lib, t5

_TOWERS = ("contriever", "query_contriever", "passage_contriever")


def is_torch_file(path: Path) -> bool:
    """A torch.save zip archive or a pickle (protocol 2+)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


class _Tensors(collections.abc.Mapping):
    """name -> (float32 array, file), read from the archive only when asked for."""

    def __init__(self, lazy: dict[str, torch_pickle.LazyTensor], path: Path):
        self._lazy, self._path = lazy, path

    def __getitem__(self, key):
        return self._lazy[key].numpy().astype(np.float32), self._path

    def __iter__(self):
        return iter(self._lazy)

    def __len__(self):
        return len(self._lazy)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self._lazy.items()}


def _strip_module(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "module":
        parts = parts[1:]
    if len(parts) > 1 and parts[1] == "module":
        parts = parts[:1] + parts[2:]
    return ".".join(parts)


def state_dict(path: Path) -> tuple[_Tensors, Any]:
    """The model's tensors (`module.` removed) and the pickled options (or None)."""
    obj = torch_pickle.load(path)
    if isinstance(obj, dict) and "model" in obj:
        model, opt = obj["model"], obj.get("opt")
    elif isinstance(obj, dict):
        model, opt = obj, None
    else:
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not an Atlas checkpoint "
                              "dict with a 'model' state dict")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(model).__name__}, not a state dict")
    lazy = {}
    for key, value in model.items():
        if not isinstance(value, torch_pickle.LazyTensor):
            raise CheckpointError(f"{path}: state dict entry {key!r} is a "
                                  f"{type(value).__name__}, not a tensor")
        lazy[_strip_module(str(key))] = value
    return _Tensors(lazy, path), opt


def load_reader_params(path: Path, max_distance: int | None = None
                       ) -> tuple[t5.T5Config, dict]:
    tensors, _ = state_dict(path)
    shapes = tensors.shapes()
    if not any(k.startswith("reader.") for k in shapes):
        raise CheckpointError(f"{path}: no 'reader.*' tensors in the state dict")
    head = "reader.lm_head.weight"
    if head in shapes and shapes[head] == shapes.get("reader.shared.weight") and np.array_equal(
            tensors[head][0], tensors["reader.shared.weight"][0]):
        del shapes[head]   # T5 1.0: the head is the embedding
    config = t5_config_from_hf_shapes(shapes, path, "reader.", max_distance)
    return config, t5_params(config, tensors, path, "reader.")


def _bert_config(shapes: dict, prefix: str, path: Path, head_dim: int,
                 max_length: int | None) -> retriever_lib.RetrieverConfig:
    def shape(name):
        if prefix + name not in shapes:
            raise CheckpointError(f"{path}: tensor {prefix + name!r} is missing")
        return shapes[prefix + name]

    vocab, hidden = shape("embeddings.word_embeddings.weight")
    start = prefix + "encoder.layer."
    layers = len({k[len(start):].split(".")[0] for k in shapes if k.startswith(start)})
    if hidden % head_dim:
        raise CheckpointError(f"{path}: hidden size {hidden} is not a multiple of head_dim "
                              f"{head_dim}; pass head_dim")
    positions = shape("embeddings.position_embeddings.weight")[0]
    return retriever_lib.RetrieverConfig(
        scan_layers=False, remat=False,  # every format is per layer (stacking.py)
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=hidden // head_dim,
        mlp_dim=shape("encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=positions,
        type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
        pooling="mean", normalize=False, max_length=min(max_length or positions, positions))


def load_retriever_params(path: Path, head_dim: int = 64
                          ) -> tuple[retriever_lib.RetrieverConfig, dict]:
    """(config, params) of the Contriever: tied ({"encoder"}) or untied ({"query_encoder",
    "passage_encoder"}), as the checkpoint holds it."""
    tensors, opt = state_dict(path)
    shapes = tensors.shapes()
    present = [t for t in _TOWERS if f"retriever.{t}.embeddings.word_embeddings.weight" in shapes]
    max_length = getattr(opt, "passage_maxlength", None) or getattr(opt, "text_maxlength", None)
    if present == ["contriever"]:
        prefix = "retriever.contriever."
        config = _bert_config(shapes, prefix, path, head_dim, max_length)
        return config, {"encoder": bert_params(config, tensors, path, prefix)}
    if set(present) == {"query_contriever", "passage_contriever"}:
        config = _bert_config(shapes, "retriever.query_contriever.", path, head_dim, max_length)
        params = {f"{side}_encoder": bert_params(config, tensors, path,
                                                 f"retriever.{side}_contriever.")
                  for side in ("query", "passage")}
        return dataclasses.replace(config, shared_towers=False), params
    raise CheckpointError(f"{path}: no retriever in the state dict (expected "
                          "retriever.contriever.* or retriever.query_contriever.* and "
                          f"retriever.passage_contriever.*; found towers {present})")

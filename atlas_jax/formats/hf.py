"""Hugging Face checkpoint folders: safetensors + config.json for T5 and BERT (and the
sentence-transformers pooling files), mapped onto this project's parameter trees.

Only safetensors and JSON are read: nothing is unpickled. The parameter names on our side
are t5x's (`encoder/layers_0/attention/query/kernel`, ...), so the t5x reader
(`formats/t5x.py`) needs no mapping and the Atlas reader (`formats/atlas.py`) reuses the one
here.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from atlas_jax.models import fid, retriever as retriever_lib, stacking, t5


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model."""


# ----------------------------------------------------------------------------- files

def resolve_path(path: str | Path) -> Path:
    """A folder path, or `package:NAME`: a reader or retriever shipped with atlas-jax
    (`atlas_jax/readers/NAME`, `atlas_jax/retrievers/NAME`, e.g. `package:ledger_t5`,
    `package:ledger_minilm`), else a checkpoint shipped inside
    a Python package (its folder, or its `model/` subfolder when that holds the config)."""
    text = str(path)
    if text.startswith("package:"):
        name = text[len("package:"):]
        for kind in ("readers", "retrievers"):     # the package's own readers, retrievers
            shipped = Path(__file__).parents[1] / kind / name
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


def assemble(tensors: dict[str, tuple[np.ndarray, Path]], folder: Path,
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
    return unflatten(flat)


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
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
        scan_layers=False, remat=False,  # every format is per layer (stacking.py)
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
        copy_head=bool(hf.get("atlas_jax_copy_head", False)),
        copy_skip_through_id=_optional_id(hf.get("atlas_jax_copy_skip_through_id")))


def _optional_id(value):
    """A token id of config.json, or None; anything else is refused by name."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"config.json: atlas_jax_copy_skip_through_id = {value!r} is not a "
                         "token id")
    return value


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
        scan_layers=False, remat=False,  # every format is per layer (stacking.py)
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


def load_tokenizer(folder: Path, max_length: int):
    """The tokenizer of a BERT folder: tokenizer.json, else vocab.txt (lower-cased unless
    tokenizer_config.json says otherwise)."""
    if (folder / "tokenizer.json").exists():
        return tokenizer_from_file(folder / "tokenizer.json", max_length)
    if (folder / "vocab.txt").exists():
        lower = True
        if (folder / "tokenizer_config.json").exists():
            lower = read_json(folder / "tokenizer_config.json").get("do_lower_case", True)
        return tokenizer_from_file(folder / "vocab.txt", max_length, lower)
    raise CheckpointError(f"{folder / 'tokenizer.json'}: file not found (nor vocab.txt)")


def tokenizer_from_file(path: Path, max_length: int, lowercase: bool = True):
    """A `tokenizers` tokenizer from a tokenizer.json, or a BERT WordPiece vocab.txt (any other
    name: read as a WordPiece vocabulary)."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        if path.suffix == ".json":
            tokenizer = Tokenizer.from_file(str(path))
        else:
            tokenizer = BertWordPieceTokenizer(str(path), lowercase=lowercase)
    except Exception as e:  # tokenizers raises bare Exception for a broken file
        raise CheckpointError(f"{path}: not a readable tokenizer "
                              f"({' '.join(str(e).split())})") from None
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def bert_abstract_params(config: retriever_lib.RetrieverConfig) -> Any:
    abstract = jax.eval_shape(
        lambda r: retriever_lib.BertEncoder(config).init(r, jnp.ones((1, 4), jnp.int32),
                                                         jnp.ones((1, 4), jnp.int32)),
        jax.random.key(0))["params"]
    return flax.linen.meta.unbox(abstract)


def t5_params(config: t5.T5Config, tensors: dict[str, tuple[np.ndarray, Path]],
              source: Path, prefix: str = "") -> dict:
    """Our T5 parameter tree from HF-named tensors (`prefix` + HF name), shapes checked."""
    mapping = {ours: (prefix + theirs, transform)
               for ours, (theirs, transform) in t5_hf_mapping(config).items()}
    return assemble(tensors, source, mapping, flat_shapes(t5_abstract_params(config)))


def bert_params(config: retriever_lib.RetrieverConfig, tensors: dict[str, tuple[np.ndarray, Path]],
                source: Path, prefix: str = "") -> dict:
    """One BERT tower's parameter tree from HF-named tensors, shapes checked."""
    return assemble(tensors, source, bert_hf_mapping(config, prefix),
                    flat_shapes(bert_abstract_params(config)))


def t5_config_from_sizes(*, vocab_size: int, emb_dim: int, num_heads: int, num_buckets: int,
                         head_dim: int, mlp_dim: int, num_encoder_layers: int,
                         num_decoder_layers: int, gated: bool, tied: bool,
                         max_distance: int | None = None) -> t5.T5Config:
    """A T5Config for weights whose config is only implied by their shapes: gated-GELU with
    untied logits is T5 1.1 (no output scaling); ReLU with tied logits is T5 1.0 (scaled)."""
    return t5.T5Config(
        scan_layers=False, remat=False,  # every format is per layer (stacking.py)
        vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads, head_dim=head_dim,
        mlp_dim=mlp_dim, num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        mlp_activations=("gelu", "linear") if gated else ("relu",),
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance or 128,
        logits_via_embedding=tied, scale_decoder_outputs=tied)


def t5_config_from_hf_shapes(shapes: dict[str, tuple[int, ...]], source: Path,
                             prefix: str = "", max_distance: int | None = None) -> t5.T5Config:
    """A T5Config inferred from HF-named tensor shapes (`prefix` + name)."""
    def shape(name: str) -> tuple[int, ...]:
        if prefix + name not in shapes:
            raise CheckpointError(f"{source}: tensor {prefix + name!r} is missing (not a T5 "
                                  "state dict?)")
        return shapes[prefix + name]

    def count(stack: str) -> int:
        start = f"{prefix}{stack}.block."
        return len({k[len(start):].split(".")[0] for k in shapes if k.startswith(start)})

    vocab, emb = shape("shared.weight")
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    mlp = shape("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi")
                + ".weight")[0]
    return t5_config_from_sizes(
        vocab_size=vocab, emb_dim=emb, num_heads=heads, num_buckets=buckets,
        head_dim=inner // heads, mlp_dim=mlp, num_encoder_layers=count("encoder"),
        num_decoder_layers=count("decoder"), gated=gated,
        tied=prefix + "lm_head.weight" not in shapes, max_distance=max_distance)


_ACTIVATIONS_TO_HF = {("relu",): "relu", ("gelu", "linear"): "gated-gelu",
                      ("gelu_exact",): "gelu", ("relu", "linear"): "gated-relu",
                      ("silu", "linear"): "gated-silu", ("silu",): "silu"}


def t5_hf_config(config) -> dict:
    """The Hugging Face `config.json` of a `T5Config` (transformers' T5 fields).

    A reader with `copy_head` adds `"atlas_jax_copy_head": true` (and its
    `copy_skip_through_id` as `"atlas_jax_copy_skip_through_id"`) and three tensors named
    `atlas_jax.copy_head.*`: `load_reader` restores them; transformers loads the T5 part and
    drops them (with its unused-weights warning), which is a different model.
    """
    activations = tuple(config.mlp_activations)
    if activations not in _ACTIVATIONS_TO_HF:
        raise ValueError(f"T5Config.mlp_activations {activations} has no Hugging Face name")
    extra = {"atlas_jax_copy_head": True} if config.copy_head else {}
    if config.copy_head and config.copy_skip_through_id is not None:
        extra["atlas_jax_copy_skip_through_id"] = int(config.copy_skip_through_id)
    return extra | {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
        "d_ff": config.mlp_dim, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "feed_forward_proj": _ACTIVATIONS_TO_HF[activations],
        "is_gated_act": len(activations) > 1,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon, "dropout_rate": 0.0,
        "tie_word_embeddings": bool(config.logits_via_embedding),
        "scale_decoder_outputs": bool(config.scale_decoder_outputs),
        "pad_token_id": config.pad_id, "eos_token_id": config.eos_id,
        "decoder_start_token_id": config.decoder_start_id,
    }


def tower_arrays(params: dict, tower: str = "query") -> dict[str, np.ndarray]:
    """{'layers_0/...': float32 array} of one retriever tower (the shared one when tied);
    `params` may still carry its logical-axis boxes (straight from `model.init`)."""
    params = stacking.unstack_layers(flax.linen.meta.unbox(params))
    tree = params["encoder"] if "encoder" in params else params[f"{tower}_encoder"]
    return {"/".join(k.key for k in path): np.asarray(leaf, np.float32) for path, leaf in
            jax.tree_util.tree_flatten_with_path(tree)[0]}


def write_sentence_transformers(folder: Path, config: retriever_lib.RetrieverConfig,
                                dense: str | None = None) -> None:
    """modules.json (Transformer, Pooling[, Dense at `dense`][, Normalize]),
    1_Pooling/config.json and sentence_bert_config.json: the files `retriever_config_from_hf`
    and sentence-transformers read pooling, projection, normalisation and max length from."""
    from atlas_jax import fileio
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling")] + (
        [(dense, "Dense")] if dense else [])
    if config.normalize:
        kinds.append((f"{len(kinds)}_Normalize", "Normalize"))
    modules = [{"idx": i, "name": str(i), "path": path,
                "type": f"sentence_transformers.models.{kind}"}
               for i, (path, kind) in enumerate(kinds)]
    for path, _ in kinds[1:]:
        (folder / path).mkdir(exist_ok=True)
    fileio.atomic_write_json(folder / "modules.json", modules)
    fileio.atomic_write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": config.pooling == "cls",
        "pooling_mode_mean_tokens": config.pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
    fileio.atomic_write_json(folder / "sentence_bert_config.json",
                             {"max_seq_length": config.max_length, "do_lower_case": False})

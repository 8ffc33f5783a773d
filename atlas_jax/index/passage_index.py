"""`PassageIndex`: a passage store, its embeddings and a search backend (docs/design.md §3).

On disk (a directory, written atomically: built in a sibling temp dir, then renamed):

  manifest.json           format, count, dim, dtype, shards, retriever checkpoint + step,
                          passages file sha256, backend name + config, deleted ids file
  passages.jsonl          the passages (a copy: the index is self-contained and hot-swappable)
  embeddings/shard_NNNNN.npy   (rows, dim) float16 / bfloat16 (stored as uint16) / float32 /
                          int8 (+ embeddings/scale.npy, per-dimension)
  tokens/retriever.{ids,lengths}.npy   pre-tokenized retriever text (for refreshes)
  deleted.npy             bool (count,) tombstones
  bm25/                   the BM25 index (bm25s arrays + JSON vocabulary) for hybrid search
  scann/                  the ScaNN searcher (backend 'scann'), without ScaNN's docids pickle

Every .npy is read with allow_pickle=False; nothing in an index executes code on load.
Embeddings are saved host-side without any mesh layout, so an index saved on one mesh shape
loads on any other.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import gin
import numpy as np

from atlas_jax import fileio
from atlas_jax.index import base, device, filters as filters_lib, hybrid as hybrid_lib
from atlas_jax.index import passages as passages_lib

FORMAT = "atlas-jax-index"
FORMAT_VERSION = 1
SAVE_DTYPES = ("float16", "bfloat16", "float32", "int8")
BACKENDS = ("device", "scann")
SHARD_ROWS = 1 << 18
OUTPUT_KIND = "index"          # the kind in the folder's .atlas-jax.json marker (fileio)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Index choices a run gin makes (gin/index/*.gin): the backend ('device' or 'scann'; its
    own options live in DeviceIndexConfig / ScannConfig), the saved embedding dtype, hybrid
    BM25 fusion (HybridConfig) and the refresh schedule (RefreshSchedule.parse syntax)."""
    backend: str = "device"
    save_dtype: str = "float16"
    hybrid: bool = False
    refresh_schedule: str = "-1"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"IndexConfig.backend = {self.backend!r}: use one of {BACKENDS}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"IndexConfig.save_dtype = {self.save_dtype!r}: use one of "
                             f"{SAVE_DTYPES}")


class IndexLoadError(ValueError):
    """An index directory that does not load; the message names the file."""


def _make_backend(name: str, embeddings: np.ndarray, mesh=None, config: Any = None):
    if name == "device":
        return device.DeviceBackend(embeddings, mesh=mesh, config=config)
    if name == "scann":
        from atlas_jax.index import scann_backend
        return scann_backend.ScannBackend.build(embeddings, config=config)
    raise ValueError(f"unknown index backend {name!r}: use one of {BACKENDS}")


@dataclasses.dataclass
class PassageIndex:
    """Passages + (count, dim) embeddings + a backend. Build with `build` or `load`."""
    store: passages_lib.PassageStore
    embeddings: np.ndarray                       # (count, dim) float16/float32 host copy
    backend: Any
    deleted: np.ndarray                          # (count,) bool
    retriever_checkpoint: str | None = None
    retriever_step: int | None = None
    tokens: passages_lib.TokenArray | None = None

    bm25_directory: Path | None = None               # a saved BM25 index to load lazily

    def __post_init__(self):
        self._metadata_table = None
        self._bm25 = None

    # --------------------------------------------------------------- construction
    @classmethod
    def from_embeddings(cls, store: passages_lib.PassageStore, embeddings: np.ndarray,
                        backend: str | None = None, mesh=None, backend_config: Any = None,
                        **kwargs) -> "PassageIndex":
        """An index over `store` from precomputed (count, dim) embeddings (row i = passage i);
        `backend` defaults to gin's `IndexConfig.backend`."""
        backend = backend or IndexConfig().backend
        embeddings = np.asarray(embeddings)
        if len(embeddings) != len(store):
            raise ValueError(f"{len(embeddings)} embeddings for {len(store)} passages")
        return cls(store, embeddings, _make_backend(backend, embeddings, mesh, backend_config),
                   np.zeros(len(store), bool), **kwargs)

    @classmethod
    def build(cls, store: passages_lib.PassageStore, retriever: Any, backend: str | None = None,
              mesh=None, backend_config: Any = None, batch_size: int = 256,
              params: Any = None, progress: bool = True,
              retriever_step: int | None = None) -> "PassageIndex":
        """Tokenizes and embeds every passage with the passage tower, then builds `backend`."""
        from atlas_jax.index import embedding
        tokens = tokenize_store(store, retriever)
        run = embedding.embed_corpus(retriever, tokens.token_ids, tokens.lengths, mesh=mesh,
                                     batch_size=batch_size, params=params, progress=progress)
        path = getattr(retriever, "path", None)
        return cls.from_embeddings(store, run.embeddings, backend, mesh, backend_config,
                                   retriever_checkpoint=str(path) if path else None,
                                   retriever_step=retriever_step, tokens=tokens)

    def reembed(self, retriever: Any, params: Any = None, mesh=None, batch_size: int = 256,
                progress: bool = False, retriever_step: int | None = None) -> "PassageIndex":
        """A new index over the same passages, embedded with `params` (e.g. the passage tower
        being trained) and the same backend kind and options; this one is left untouched, so
        `HotSwapIndex.refresh(lambda old: old.reembed(...))` swaps it in atomically."""
        from atlas_jax.index import embedding
        tokens = self.tokens if self.tokens is not None else tokenize_store(self.store,
                                                                             retriever)
        run = embedding.embed_corpus(retriever, tokens.token_ids, tokens.lengths, mesh=mesh,
                                     batch_size=batch_size, params=params, progress=progress)
        mesh = mesh if mesh is not None else getattr(self.backend, "mesh", None)
        new = PassageIndex.from_embeddings(
            self.store, run.embeddings, self.backend.name, mesh, self.backend.config,
            retriever_checkpoint=self.retriever_checkpoint, retriever_step=retriever_step,
            tokens=tokens)
        if self.deleted.any():
            new.backend.delete(np.flatnonzero(self.deleted))
            new.deleted = self.deleted.copy()
        return new

    def add_passages(self, records: Sequence[dict], retriever: Any,
                     params: Any = None, batch_size: int = 256) -> np.ndarray:
        """Embeds only the new passages (passage tower, `params` or the retriever's; batches
        of `batch_size`) and appends them (see `add`); returns their dense ids."""
        from atlas_jax.index import embedding
        texts = [passages_lib.retriever_text(r.get("title", ""), r.get("text", ""))
                 for r in records]
        token_ids, lengths = embedding.tokenize_for_retriever(retriever, texts)
        run = embedding.embed_corpus(retriever, token_ids, lengths, params=params,
                                     mesh=getattr(self.backend, "mesh", None), progress=False,
                                     batch_size=batch_size)
        return self.add(records, run.embeddings)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def metadata_table(self) -> filters_lib.MetadataTable:
        if self._metadata_table is None:
            self._metadata_table = filters_lib.MetadataTable(self.store.metadata)
        return self._metadata_table

    @property
    def bm25(self) -> hybrid_lib.BM25Index:
        if self._bm25 is None and self.bm25_directory is not None:
            try:
                self._bm25 = hybrid_lib.BM25Index.load(self.bm25_directory)
            except (ValueError, EOFError, OSError, KeyError, TypeError) as e:
                raise IndexLoadError(f"{self.bm25_directory}: BM25 index unreadable "
                                     f"(truncated or corrupt? {' '.join(str(e).split())}); "
                                     "rebuild the index") from None
        if self._bm25 is None or self._bm25.size != len(self.store):
            self._bm25 = hybrid_lib.BM25Index(self.store.retriever_texts())
        return self._bm25

    # --------------------------------------------------------------- search
    def filter_mask(self, where: Sequence[str | Any] | np.ndarray | None) -> np.ndarray | None:
        """`--where` expressions (or parsed conditions, or a ready mask) -> (count,) bool."""
        if where is None or (not isinstance(where, np.ndarray) and len(where) == 0):
            return None
        if isinstance(where, np.ndarray):
            return where
        conditions = [filters_lib.parse_where(w) if isinstance(w, str) else w for w in where]
        return self.metadata_table.mask(conditions)

    def search(self, query_embeddings: np.ndarray, k: int,
               where: Sequence[str] | np.ndarray | None = None,
               query_texts: Sequence[str] | None = None, hybrid: bool = False,
               hybrid_config: hybrid_lib.HybridConfig | None = None) -> base.SearchResult:
        """Best k passages per query among those satisfying `where` (ANDed), dense or, with
        `hybrid`, dense fused with BM25 on `query_texts` by reciprocal rank."""
        mask = self.filter_mask(where)
        if not hybrid:
            return self.backend.search(query_embeddings, k, mask)
        if query_texts is None:
            raise ValueError("hybrid search needs the query texts for BM25")
        if self.deleted.any():
            mask = ~self.deleted if mask is None else mask & ~self.deleted
        return hybrid_lib.hybrid_search(self.backend.search, self.bm25, query_embeddings,
                                        list(query_texts), k, mask,
                                        hybrid_config or hybrid_lib.HybridConfig())

    def hits(self, result: base.SearchResult, query: int = 0) -> list[dict]:
        """One dict per hit of query row `query`: rank, id, score, title, text, metadata."""
        return [{"rank": rank, "id": self.store.ids[row], "score": float(score),
                 "title": self.store.titles[row], "text": self.store.texts[row],
                 "metadata": self.store.metadata[row]}
                for rank, (row, score) in enumerate(zip(result.ids[query],
                                                        result.scores[query]), 1) if row >= 0]

    # --------------------------------------------------------------- updates
    def add(self, records: Sequence[dict], new_embeddings: np.ndarray) -> np.ndarray:
        """Appends passages with their embeddings without re-embedding the others; returns
        their dense ids. Not thread-safe on its own: go through `HotSwapIndex.update`."""
        new_embeddings = np.asarray(new_embeddings)
        if new_embeddings.shape[1:] != (self.dim,) or len(new_embeddings) != len(records):
            raise ValueError(f"{new_embeddings.shape} embeddings for {len(records)} new "
                             f"passages of dimension {self.dim}")
        ids = self.store.extend(records)
        if hasattr(self.backend, "upsert"):
            self.backend.upsert(ids, new_embeddings)
        else:
            self.backend.add(new_embeddings)
        self.embeddings = np.concatenate([self.embeddings,
                                          new_embeddings.astype(self.embeddings.dtype)])
        self.deleted = np.concatenate([self.deleted, np.zeros(len(ids), bool)])
        self.tokens = None
        self._metadata_table = self._bm25 = self.bm25_directory = None
        return ids

    def delete(self, passage_ids: Sequence[str]) -> None:
        """Removes passages (by string id) from search results."""
        rows = self.store.index_of(passage_ids)
        rows = np.unique(rows[~self.deleted[rows]])
        if len(rows):
            self.backend.delete(rows)
        self.deleted[rows] = True

    # --------------------------------------------------------------- save / load
    def save(self, directory: str | Path, dtype: str = "float16",
             include_bm25: bool = True) -> Path:
        """Writes the index atomically (a reader of `directory` sees the old or the new
        index, never a mix), with its BM25 index for hybrid search unless `include_bm25` is
        False; returns the directory."""
        if dtype not in SAVE_DTYPES:
            raise ValueError(f"index dtype {dtype!r} is not one of {SAVE_DTYPES}")
        return write_atomically(directory, lambda staging: self._write(staging, dtype,
                                                                       include_bm25))

    def _write(self, out: Path, dtype: str, include_bm25: bool) -> None:
        (out / "embeddings").mkdir()
        self.store.write_jsonl(out / "passages.jsonl")
        rows = np.asarray(self.embeddings, np.float32)
        if dtype == "int8":
            rows, scale = device.quantize(rows, 8)
            np.save(out / "embeddings" / "scale.npy", scale)
        elif dtype == "bfloat16":
            import ml_dtypes
            rows = rows.astype(ml_dtypes.bfloat16).view(np.uint16)
        else:
            rows = rows.astype(dtype)
        shards = []
        for number, start in enumerate(range(0, max(len(rows), 1), SHARD_ROWS)):
            name = f"embeddings/shard_{number:05d}.npy"
            np.save(out / name, rows[start:start + SHARD_ROWS])
            shards.append({"file": name, "rows": int(len(rows[start:start + SHARD_ROWS]))})
        np.save(out / "deleted.npy", self.deleted)
        if self.tokens is not None:
            (out / "tokens").mkdir()
            np.save(out / "tokens" / "retriever.ids.npy", np.asarray(self.tokens.token_ids))
            np.save(out / "tokens" / "retriever.lengths.npy", np.asarray(self.tokens.lengths))
        backend = {"name": self.backend.name,
                   "config": dataclasses.asdict(self.backend.config)
                   if dataclasses.is_dataclass(getattr(self.backend, "config", None)) else {}}
        if self.backend.name == "scann":
            self.backend.save(out / "scann")
        if include_bm25:
            self.bm25.save(out / "bm25")
        write_manifest(out, count=len(self.store), dim=self.dim, dtype=dtype, shards=shards,
                       retriever={"checkpoint": self.retriever_checkpoint,
                                  "step": self.retriever_step},
                       backend=backend, tokens="tokens/retriever" if self.tokens is not None
                       else None, bm25="bm25" if include_bm25 else None)

    @classmethod
    def load(cls, directory: str | Path, mesh=None, backend: str | None = None,
             backend_config: Any = None, passages: str | Path | None = None,
             retriever_dim: int | None = None) -> "PassageIndex":
        """Loads an index saved by `save`, onto any mesh.

        Args:
          directory: the index directory.
          mesh: mesh for the device backend (default: all devices).
          backend: override the saved backend ('device' or 'scann'; a saved ScaNN searcher
            is reused when the backend is unchanged and no config is given).
          passages: a passages jsonl the index must have been built from (sha256 checked).
          retriever_dim: the dimension of the retriever that will query it.
        Raises IndexLoadError naming the file at fault.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        passages_file = directory / manifest["passages"]["file"]
        _require(passages_file)
        digest = passages_lib.file_sha256(passages_file)
        if digest != manifest["passages"]["sha256"]:
            raise IndexLoadError(f"{passages_file} does not match {directory}/manifest.json "
                                 "(sha256 differs): the passages changed after the index was "
                                 "built; rebuild the index")
        if passages is not None and passages_lib.file_sha256(passages) != digest:
            raise IndexLoadError(f"index {directory} was built from other passages than "
                                 f"{passages} (sha256 differs); rebuild it with "
                                 "`atlas-jax index build`")
        if retriever_dim is not None and retriever_dim != manifest["dim"]:
            raise IndexLoadError(f"index {directory} holds {manifest['dim']}-dimensional "
                                 f"embeddings (manifest.json) but the retriever produces "
                                 f"{retriever_dim}-dimensional ones")
        store = passages_lib.PassageStore.from_jsonl(passages_file)
        if len(store) != manifest["count"]:
            raise IndexLoadError(f"{passages_file} has {len(store)} passages, "
                                 f"{directory}/manifest.json says {manifest['count']}")
        embeddings = _read_embeddings(directory, manifest)
        deleted = _load_npy(directory / manifest["deleted"], (manifest["count"],))
        tokens = (_load_tokens(directory / manifest["tokens"], manifest["count"])
                  if manifest.get("tokens") else None)
        saved_backend = manifest["backend"]["name"]
        name = backend or saved_backend
        if name == "scann" and saved_backend == "scann" and backend_config is None:
            from atlas_jax.index import scann_backend
            backend_obj = scann_backend.ScannBackend.load(directory / "scann")
        else:
            if backend_config is None and name == saved_backend == "device":
                backend_config = device.DeviceIndexConfig(**manifest["backend"]["config"])
            backend_obj = _make_backend(name, embeddings, mesh, backend_config)
            if deleted.any():
                backend_obj.delete(np.flatnonzero(deleted))
        bm25_directory = directory / manifest["bm25"] if manifest.get("bm25") else None
        return cls(store, embeddings, backend_obj, deleted.astype(bool),
                   manifest["retriever"]["checkpoint"], manifest["retriever"]["step"], tokens,
                   bm25_directory)


def write_atomically(directory: str | Path, write: Any) -> Path:
    """`fileio.write_folder` for an index: a reader of `directory` sees the old or the new
    index, never a mix. Replacing is only safe for a folder this project wrote as an index:
    anything else is refused (fileio.OutputFolderError) and left untouched."""
    return fileio.write_folder(directory, OUTPUT_KIND, write, legacy=is_legacy_index,
                               fault="index_save")


def write_manifest(out: Path, *, count: int, dim: int, dtype: str, shards: list[dict],
                   retriever: dict, backend: dict, tokens: str | None, bm25: str | None,
                   passages_file: str = "passages.jsonl", deleted: str = "deleted.npy") -> None:
    """manifest.json of an index folder whose other files are written."""
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "count": count, "dim": dim,
        "dtype": dtype, "shards": shards, "retriever": retriever,
        "passages": {"file": passages_file,
                     "sha256": passages_lib.file_sha256(out / passages_file)},
        "backend": backend, "deleted": deleted, "tokens": tokens, "bm25": bm25,
    }
    fileio.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def tokenize_store(store: passages_lib.PassageStore, retriever: Any,
                   path: str | Path | None = None) -> passages_lib.TokenArray:
    """The store's retriever texts, tokenized with the retriever's tokenizer and truncated to
    its max length (memory-mapped under `path` when given)."""
    from atlas_jax.index import embedding
    encode_batch, limit = embedding.retriever_encoder(retriever)
    return passages_lib.TokenArray.build(store.retriever_texts(), encode_batch, limit, path)


def read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    _require(path)
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise IndexLoadError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise IndexLoadError(f"{path}: not readable JSON text ({e})") from None
    if not isinstance(manifest, dict):
        raise IndexLoadError(f"{path}: holds a JSON {type(manifest).__name__}, not the "
                             "manifest object")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise IndexLoadError(f"{path} is not an {FORMAT} v{FORMAT_VERSION} manifest "
                             f"(format={manifest.get('format')!r}, "
                             f"version={manifest.get('version')!r})")
    missing = [key for key in ("count", "dim", "dtype", "shards", "passages", "backend",
                               "deleted", "retriever") if key not in manifest]
    if missing:
        raise IndexLoadError(f"{path} lacks {missing}")
    shards, backend, passages = manifest["shards"], manifest["backend"], manifest["passages"]
    if not (isinstance(manifest["count"], int) and isinstance(manifest["dim"], int)
            and isinstance(shards, list) and all(
                isinstance(x, dict) and isinstance(x.get("file"), str)
                and isinstance(x.get("rows"), int) for x in shards)
            and isinstance(passages, dict) and isinstance(passages.get("file"), str)
            and isinstance(backend, dict) and isinstance(backend.get("name"), str)
            and isinstance(manifest["deleted"], str) and isinstance(manifest["retriever"], dict)
            and manifest["dtype"] in SAVE_DTYPES):
        raise IndexLoadError(f"{path}: count, dim, dtype, shards, passages, backend, deleted or "
                             "retriever has the wrong type (a damaged manifest); rebuild the "
                             "index")
    return manifest


def _require(path: Path) -> None:
    if not path.exists():
        raise IndexLoadError(f"{path} is missing: not a complete atlas-jax index")


def _load_npy(path: Path, shape: tuple | None = None, mmap: bool = False) -> np.ndarray:
    _require(path)
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, EOFError, OSError) as e:  # truncated, empty, garbled or pickled
        raise IndexLoadError(f"{path}: not a readable .npy array (truncated or corrupt? "
                             f"{' '.join(str(e).split())})") from None
    if shape is not None and array.shape != shape:
        raise IndexLoadError(f"{path} has shape {array.shape}, expected {shape}")
    return array


def _load_tokens(path: Path, count: int) -> passages_lib.TokenArray:
    """The pre-tokenized retriever text (`path`.ids.npy, `path`.lengths.npy) of `count`
    passages; IndexLoadError naming the file when one is missing, truncated or garbled."""
    ids = _load_npy(Path(f"{path}.ids.npy"), mmap=True)
    lengths = _load_npy(Path(f"{path}.lengths.npy"), (count,), mmap=True)
    if ids.ndim != 2 or len(ids) != count:
        raise IndexLoadError(f"{path}.ids.npy has shape {ids.shape}, expected ({count}, L)")
    return passages_lib.TokenArray(ids, lengths)


def _read_embeddings(directory: Path, manifest: dict) -> np.ndarray:
    """Concatenated shards as float32 (dequantised for int8)."""
    dim, dtype = manifest["dim"], manifest["dtype"]
    stored_dtype = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32,
                    "int8": np.int8}[dtype]
    parts = []
    for shard in manifest["shards"]:
        array = _load_npy(directory / shard["file"], (shard["rows"], dim), mmap=True)
        if array.dtype != stored_dtype:
            raise IndexLoadError(f"{directory / shard['file']} holds {array.dtype}, "
                                 f"manifest.json says {dtype}")
        parts.append(array)
    rows = np.concatenate(parts) if parts else np.zeros((0, dim), stored_dtype)
    if len(rows) != manifest["count"]:
        raise IndexLoadError(f"{directory}/embeddings hold {len(rows)} rows, manifest.json "
                             f"says {manifest['count']}")
    if dtype == "bfloat16":
        import ml_dtypes
        return rows.view(ml_dtypes.bfloat16).astype(np.float32)
    if dtype == "int8":
        return rows.astype(np.float32) * _load_npy(directory / "embeddings" / "scale.npy",
                                                   (dim,))
    return rows.astype(np.float32)


def is_legacy_index(folder: Path) -> bool:
    """An index written before output markers existed: its manifest names our format."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT

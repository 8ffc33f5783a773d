"""The Atlas reference's saved passage index -> an atlas-jax index folder.

The reference (src/index.py, DistributedIndex.save_index) writes, per shard k:
  embeddings.{k}.pt   torch.save of a float16 tensor stored as [dim, n_k] (passages are columns)
  passages.{k}.pt     a plain pickle (pickle.dump, despite the suffix) of a list of dicts with
                      "id", "title", "text" and optionally "section" (the reference shows it as
                      "title: section", and so do we) plus any other fields (kept as metadata).
Shards are streamed one at a time (memory ~ one shard), kept float16, and written as this
project's index format (passage_index.py) atomically; pickles go through torch_pickle's
allow-list, so nothing in them runs. The embeddings are Contriever's, unnormalised: search
the imported index with the query tower of the same checkpoint (`load_atlas`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax.formats import torch_pickle
from atlas_jax.formats.hf import CheckpointError
from atlas_jax.index import device, passage_index

_SHARD = re.compile(r"embeddings\.(\d+)\.pt$")


def saved_shards(folder: Path) -> list[int]:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: saved index folder not found")
    shards = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SHARD.match(p.name)))
    if not shards:
        raise CheckpointError(f"{folder}: no embeddings.<k>.pt shards (not an Atlas saved "
                              "index?)")
    missing = [k for k in range(shards[-1] + 1) if k not in shards]
    if missing:
        raise CheckpointError(f"{folder}: embeddings shards {missing} are missing")
    for k in shards:
        if not (folder / f"passages.{k}.pt").is_file():
            raise CheckpointError(f"{folder / f'passages.{k}.pt'}: file not found (embeddings."
                                  f"{k}.pt has no passages)")
    return shards


def _records(path: Path) -> list[dict]:
    passages = torch_pickle.load(path)
    if not isinstance(passages, list):
        raise CheckpointError(f"{path}: holds a {type(passages).__name__}, not a list of "
                              "passage dicts")
    out = []
    for number, item in enumerate(passages):
        if not isinstance(item, dict) or "id" not in item or "text" not in item:
            raise CheckpointError(f"{path}: passage {number} is not a dict with 'id' and "
                                  "'text'")
        title, section = str(item.get("title", "") or ""), item.get("section")
        if section:
            title = f"{title}: {section}"
        metadata = {k: v for k, v in item.items() if k not in ("id", "title", "text", "section")
                    and isinstance(v, (str, int, float, bool))}
        out.append({"id": str(item["id"]), "title": title, "text": str(item["text"]),
                    "metadata": metadata})
    return out


def _rows(path: Path, count: int, dim: int | None) -> np.ndarray:
    """(n, dim) float16 rows of one embeddings shard (a [dim, n] tensor)."""
    tensor = torch_pickle.load(path)
    if not isinstance(tensor, torch_pickle.LazyTensor) or len(tensor.shape) != 2:
        raise CheckpointError(f"{path}: holds no 2-D embeddings tensor")
    if tensor.shape[1] != count:
        raise CheckpointError(f"{path}: {tensor.shape[1]} embeddings (a [{tensor.shape[0]}, n] "
                              f"tensor) for {count} passages")
    if dim is not None and tensor.shape[0] != dim:
        raise CheckpointError(f"{path}: embeddings of dimension {tensor.shape[0]}, earlier "
                              f"shards have {dim}")
    transposed = torch_pickle.LazyTensor(tensor.storage, tensor.offset, tensor.shape[::-1],
                                         tensor.stride[::-1])
    return transposed.numpy().astype(np.float16, copy=False)


def import_index(saved: str | Path, out: str | Path, backend: str = "device",
                 checkpoint: str | None = None) -> dict:
    """Streams an Atlas saved index into `out`; returns {passages, dim, shards, seconds}."""
    saved, start = Path(saved), time.perf_counter()
    shards = saved_shards(saved)
    stats: dict[str, Any] = {}

    def write(staging: Path) -> None:
        (staging / "embeddings").mkdir()
        seen: set[str] = set()
        written, dim, count = [], None, 0
        with open(staging / "passages.jsonl", "w", encoding="utf-8") as lines:
            for k in shards:
                records = _records(saved / f"passages.{k}.pt")
                rows = _rows(saved / f"embeddings.{k}.pt", len(records), dim)
                dim = rows.shape[1]
                for number, record in enumerate(records):
                    if record["id"] in seen:
                        raise CheckpointError(f"{saved / f'passages.{k}.pt'}: passage {number} "
                                              f"repeats id {record['id']!r}")
                    seen.add(record["id"])
                    lines.write(json.dumps(record, ensure_ascii=False) + "\n")
                name = f"embeddings/shard_{k:05d}.npy"
                np.save(staging / name, rows)
                written.append({"file": name, "rows": len(rows)})
                count += len(rows)
                del rows, records
        np.save(staging / "deleted.npy", np.zeros(count, bool))
        backend_entry = {"name": backend, "config": dataclasses.asdict(device.DeviceIndexConfig())}
        if backend == "scann":
            embeddings = np.concatenate([np.load(staging / s["file"], mmap_mode="r")
                                         for s in written]).astype(np.float32)
            searcher = passage_index._make_backend("scann", embeddings)
            searcher.save(staging / "scann")
            backend_entry["config"] = dataclasses.asdict(searcher.config)
        passage_index.write_manifest(
            staging, count=count, dim=dim, dtype="float16", shards=written,
            retriever={"checkpoint": checkpoint, "step": None}, backend=backend_entry,
            tokens=None, bm25=None)
        stats.update(passages=count, dim=dim, shards=len(shards))

    passage_index.write_atomically(out, write)
    stats["seconds"] = round(time.perf_counter() - start, 2)
    return stats


"""On-disk layout of a ScaNN index (`scann_backend.ScannBackend.save` / `load`), without pickle.

A saved index is a directory holding
  scann/                 ScaNN's native artifacts (protobufs and .npy, relative paths; the
                         Python wrapper's `scann_docids.pkl` is never written nor read),
  scann_row_ids.npy      (rows,) int64, ScaNN row -> passage id,
  scann_vectors.npy      (num_slots, D) float16, live embeddings by id (zeros elsewhere),
  scann_manifest.json    format, dim, num_slots, num_rows and the ScannConfig fields.
Reading checks every file against the manifest and names the file at fault; arrays are read
with `np.load(allow_pickle=False)` and ScaNN's searcher is rebuilt from its asset list.
This module knows nothing of ScannBackend: it writes and reads the backend's parts.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = "atlas_jax.scann/1"
MANIFEST, ROW_IDS, VECTORS, ARTIFACTS = (
    "scann_manifest.json", "scann_row_ids.npy", "scann_vectors.npy", "scann")


def save(directory: str | Path, native_searcher, row_ids: np.ndarray, vectors: np.ndarray,
         num_slots: int, config) -> None:
    """Writes an index into `directory` (created; an existing `scann/` inside it is replaced).

    Args:
      native_searcher: the ScaNN native searcher (ScannSearcher.searcher).
      row_ids: (rows,) int64, ScaNN row -> id.
      vectors: (>= num_slots, D) float16 by id; the first num_slots rows are written.
      num_slots: number of id slots.
      config: the resolved ScannConfig (a dataclass), stored in the manifest.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    artifacts = directory / ARTIFACTS
    if artifacts.exists():
        shutil.rmtree(artifacts)
    artifacts.mkdir()
    # The native serializer writes protobufs + .npy; the Python wrapper's serialize would
    # add scann_docids.pkl, which we replace by scann_row_ids.npy.
    native_searcher.serialize(str(artifacts), True)
    np.save(directory / ROW_IDS, row_ids)
    np.save(directory / VECTORS, vectors[:num_slots])
    manifest = {"format": FORMAT, "dim": vectors.shape[1], "num_slots": num_slots,
                "num_rows": len(row_ids), "config": dataclasses.asdict(config)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def load(directory: str | Path, config_type: type, scann_ops: Callable[[], Any]
         ) -> tuple[Any, np.ndarray, np.ndarray, int, Any]:
    """Reads an index written by `save` without unpickling anything.

    Args:
      config_type: the config dataclass, called with the manifest's config fields.
      scann_ops: returns ScaNN's scann_ops_pybind module (called only once the files
        have been checked, as importing ScaNN is slow).
    Returns:
      (searcher, row_ids, vectors, num_slots, config): a ScannSearcher whose docids are
      str(row_ids), (rows,) int64 row ids, (num_slots, D) float16 vectors, the slot count and
      the config.
    Raises:
      FileNotFoundError: a file of the layout is missing (named).
      ValueError: a file is unreadable or inconsistent with the manifest (named).
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"ScaNN index manifest not found: {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
        dim, num_slots, num_rows = (int(manifest[key]) for key in ("dim", "num_slots",
                                                                   "num_rows"))
        config = config_type(**manifest["config"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path}: not a valid ScaNN index manifest ({error})")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, "
                         f"expected {FORMAT!r}")
    row_ids = _load_npy(directory / ROW_IDS, np.int64, (num_rows,))
    vectors = _load_npy(directory / VECTORS, np.float16, (num_slots, dim))
    if len(row_ids) and (row_ids.min() < 0 or row_ids.max() >= num_slots
                         or len(np.unique(row_ids)) != len(row_ids)):
        raise ValueError(f"{directory / ROW_IDS}: ids must be unique and < {num_slots}")
    searcher = _load_artifacts(directory / ARTIFACTS, row_ids, scann_ops)
    if searcher.size() != num_rows:
        raise ValueError(f"{directory / ARTIFACTS}: ScaNN holds {searcher.size()} rows, "
                         f"{manifest_path} says {num_rows}")
    return searcher, row_ids, vectors, num_slots, config


def _load_npy(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """np.load without pickle, checked against the expected dtype and shape."""
    if not path.is_file():
        raise FileNotFoundError(f"ScaNN index file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: unreadable .npy ({error})") from error
    if array.dtype != dtype or array.shape != shape:
        raise ValueError(f"{path}: {array.dtype} {array.shape}, expected "
                         f"{np.dtype(dtype)} {shape}")
    return array


def _load_artifacts(artifacts: Path, row_ids: np.ndarray, scann_ops: Callable[[], Any]):
    """ScaNN searcher from its native artifacts (never reading a docids pickle), wrapped in
    a ScannSearcher whose docids are str(row_ids)."""
    assets_path = artifacts / "scann_assets.pbtxt"
    if not assets_path.is_file():
        raise FileNotFoundError(f"ScaNN assets list not found: {assets_path}")
    assets = assets_path.read_text()
    for name in re.findall(r'asset_path:\s*"([^"]*)"', assets) + ["scann_config.pb"]:
        if Path(name).is_absolute() or Path(name).name != name:
            raise ValueError(f"{assets_path}: asset {name!r} is not a file inside {artifacts}")
        if not (artifacts / name).is_file():
            raise FileNotFoundError(f"ScaNN asset listed in {assets_path} not found: "
                                    f"{artifacts / name}")
    ops = scann_ops()
    try:
        native = ops.scann_pybind.ScannNumpy(str(artifacts), assets)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{artifacts}: ScaNN could not load its artifacts ({error})") from error
    return ops.ScannSearcher(native, docids=[str(i) for i in row_ids])

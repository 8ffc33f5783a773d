"""Reads `torch.save` files and plain pickles without torch and without running them.

    obj = load("model.pth.tar")          # dicts, lists, numbers, strings, LazyTensor leaves
    array = obj["model"]["reader.shared.weight"].numpy()

The unpickler resolves only an allow-list of globals: torch's tensor and parameter rebuild
functions, its typed storages, `collections.OrderedDict`, `argparse.Namespace`,
`torch.device` and `_codecs.encode` (protocol-2 bytes). Any other global (e.g. `os.system`)
stops the load with one line naming the file and the global, before anything is called.
Tensors stay lazy: a `LazyTensor` reads its bytes from the archive (memory-mapped when the
member is stored uncompressed, as torch writes it) only when `.numpy()` is called, so an
optimizer state that is never asked for is never read.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from atlas_jax.formats.hf import CheckpointError


class UnsafePickleError(CheckpointError):
    """The pickle names a global outside the allow-list; nothing from it was run."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: Any


@dataclasses.dataclass
class _Storage:
    archive: "_Archive"
    key: str
    dtype: Any
    numel: int


@dataclasses.dataclass
class LazyTensor:
    """A tensor of a torch file: dtype, shape and where its bytes are; `.numpy()` reads them."""
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self):
        return np.dtype(self.storage.dtype)

    def numpy(self) -> np.ndarray:
        """The tensor as a numpy array in its own dtype (a copy, C-contiguous)."""
        flat = self.storage.archive.storage_array(self.storage)
        itemsize = flat.dtype.itemsize
        if self.shape and max((s - 1) * st for s, st in zip(self.shape, self.stride)
                              if s) + self.offset >= flat.size:
            raise CheckpointError(f"{self.storage.archive.path}: tensor in storage "
                                  f"{self.storage.key} reaches past its end (truncated file?)")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.shape,
            strides=tuple(st * itemsize for st in self.stride), writeable=False)
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _device(*args):
    return ":".join(str(a) for a in args)


def _encode(text, encoding="latin1"):
    return str(text).encode(encoding)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "device"): _device,
    ("_codecs", "encode"): _encode,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, archive: "_Archive | None"):
        super().__init__(file)
        self._path, self._archive = path, archive

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED if self._archive is not None else {}
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise UnsafePickleError(
            f"{self._path}: refused: the pickle names the global {module}.{name}, which is not "
            "on the allow-list of tensors, storages and plain containers (nothing was run)")

    def persistent_load(self, pid):
        if self._archive is None or not (isinstance(pid, tuple) and len(pid) == 5
                                         and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._path}: refused: unexpected persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise UnsafePickleError(f"{self._path}: refused: storage type {kind!r}")
        return _Storage(self._archive, str(key), kind.dtype, int(numel))


class _Archive:
    """A torch zip archive: `<prefix>/data.pkl` and the storages `<prefix>/data/<key>`."""

    def __init__(self, path: Path, zf: zipfile.ZipFile):
        self.path, self._zip = path, zf
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a zip file but not a torch.save archive "
                                  "(no single data.pkl)")
        self.pickle_name = pickles[0]
        self.prefix = self.pickle_name[:-len("data.pkl")]
        byteorder = self.prefix + "byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
            raise CheckpointError(f"{path}: big-endian torch archives are not supported")
        self._arrays: dict[str, np.ndarray] = {}

    def storage_array(self, storage: _Storage) -> np.ndarray:
        if storage.key not in self._arrays:
            name = f"{self.prefix}data/{storage.key}"
            try:
                info = self._zip.getinfo(name)
            except KeyError:
                raise CheckpointError(f"{self.path}: storage {name!r} is missing (truncated "
                                      "file?)") from None
            dtype = np.dtype(storage.dtype)
            if info.file_size < storage.numel * dtype.itemsize:
                raise CheckpointError(f"{self.path}: storage {name!r} holds {info.file_size} "
                                      f"bytes, {storage.numel} x {dtype} expected")
            self._arrays[storage.key] = self._map(info, dtype, storage.numel)
        return self._arrays[storage.key]

    def _map(self, info: zipfile.ZipInfo, dtype, count: int) -> np.ndarray:
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:   # the member's data starts after its local header
                f.seek(info.header_offset)
                header = f.read(30)
                if header[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{self.path}: corrupt zip entry {info.filename!r}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if start + count * dtype.itemsize > self.path.stat().st_size:
                raise CheckpointError(f"{self.path}: storage {info.filename!r} is cut short "
                                      "(truncated file)")
            if count == 0:
                return np.zeros((0,), dtype)
            return np.memmap(self.path, dtype=dtype, mode="r", offset=start, shape=(count,))
        return np.frombuffer(self._zip.read(info), dtype=dtype, count=count)


def load(path: str | Path) -> Any:
    """Loads a `torch.save` zip archive (tensors as `LazyTensor`) or a plain pickle (builtin
    types only: no global at all is resolved)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: not a readable zip archive ({e})") from None
        archive = _Archive(path, zf)
        data = zf.read(archive.pickle_name)
        return _unpickle(io.BytesIO(data), path, archive)
    with open(path, "rb") as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0x80:
            raise CheckpointError(f"{path}: neither a torch.save archive nor a pickle")
        f.seek(0)
        obj = _unpickle(f, path, None)
        if isinstance(obj, int) and f.read(1):   # torch's pre-1.6 format: a magic number first
            raise CheckpointError(f"{path}: legacy torch.save format (PyTorch < 1.6) is not "
                                  "supported; re-save it with a recent torch")
        return obj


def _unpickle(file, path: Path, archive: _Archive | None) -> Any:
    try:
        return _Unpickler(file, path, archive).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None

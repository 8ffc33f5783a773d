"""Passage store: the passages jsonl of docs/design.md §4, dense ids, and pre-tokenized arrays.

A passage line is `{"id": str, "title": str, "text": str, "metadata": {...}}`; `id` and `text`
are required, `title` defaults to "" and `metadata` to {}. Row i of the store is dense id i;
string ids map to dense ids through `index_of`. Tokenized texts live in `TokenArray`s
(int32 ids padded with 0 + lengths, memory-mapped .npy), so gathering a batch of passages is
an array index, not a tokenizer call.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

EncodeBatch = Callable[[list[str]], Sequence[Sequence[int]]]


class PassageFileError(ValueError):
    """A passages file that cannot be read; the message names the file and line."""


def retriever_text(title: str, text: str) -> str:
    """Atlas's retriever passage format."""
    return f"{title} {text}".strip()


def reader_text(title: str, text: str) -> str:
    """Atlas's reader passage format (the question is prepended per example)."""
    return f"title: {title} context: {text}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_record(record: Any, where: str) -> tuple[str, str, str, dict]:
    if not isinstance(record, dict):
        raise PassageFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("id", "text"):
        if field not in record:
            raise PassageFileError(f"{where}: missing required field {field!r} "
                                   f"(a passage needs 'id' and 'text')")
    passage_id, title = record["id"], record.get("title", "")
    text, metadata = record["text"], record.get("metadata") or {}
    if not isinstance(passage_id, (str, int)) or isinstance(passage_id, bool):
        raise PassageFileError(f"{where}: 'id' must be a string, got {passage_id!r}")
    if not isinstance(title, str) or not isinstance(text, str):
        raise PassageFileError(f"{where}: 'title' and 'text' must be strings")
    if not isinstance(metadata, dict):
        raise PassageFileError(f"{where}: 'metadata' must be an object, got {metadata!r}")
    return str(passage_id), title, text, metadata


@dataclasses.dataclass
class PassageStore:
    """Passages by dense id. Use `from_jsonl` / `from_records`; `extend` appends."""
    ids: list[str] = dataclasses.field(default_factory=list)
    titles: list[str] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)
    metadata: list[dict] = dataclasses.field(default_factory=list)
    source: str = "<records>"

    def __post_init__(self):
        self._index = {}
        for row, passage_id in enumerate(self.ids):
            self._check_new(passage_id, f"{self.source}: passage {row}")
            self._index[passage_id] = row

    def __len__(self) -> int:
        return len(self.ids)

    def _check_new(self, passage_id: str, where: str) -> None:
        if passage_id in self._index:
            raise PassageFileError(f"{where}: duplicate passage id {passage_id!r} (first seen "
                                   f"as dense id {self._index[passage_id]})")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "PassageStore":
        """Reads a passages jsonl; blank lines are skipped. Raises PassageFileError naming
        the file and line for malformed JSON, missing fields or duplicate ids."""
        store = cls(source=str(path))
        store.extend_jsonl(path)
        return store

    @classmethod
    def from_records(cls, records: Iterable[dict], source: str = "<records>") -> "PassageStore":
        store = cls(source=source)
        store.extend(records, source)
        return store

    def extend_jsonl(self, path: str | Path) -> np.ndarray:
        """Appends the passages of a jsonl file; returns their dense ids."""
        def records():
            with open(path, "rb") as f:
                for line_number, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise PassageFileError(
                            f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[e.start]:02x} "
                            f"at column {e.start + 1}); passages files are UTF-8 jsonl"
                        ) from None
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line), f"{path}:{line_number}"
                    except json.JSONDecodeError as e:
                        raise PassageFileError(f"{path}:{line_number}: malformed JSON: {e.msg} "
                                               f"(column {e.colno})") from None
        return self._extend(records())

    def extend(self, records: Iterable[dict], source: str = "<records>") -> np.ndarray:
        """Appends passage dicts; returns their dense ids. All-or-nothing: a bad record
        leaves the store unchanged."""
        return self._extend((record, f"{source}: record {i}") for i, record in
                            enumerate(records))

    def _extend(self, located_records) -> np.ndarray:
        parsed, seen = [], {}
        for record, where in located_records:
            passage_id, title, text, metadata = _parse_record(record, where)
            self._check_new(passage_id, where)
            if passage_id in seen:
                raise PassageFileError(f"{where}: duplicate passage id {passage_id!r} (also "
                                       f"at {seen[passage_id]})")
            seen[passage_id] = where
            parsed.append((passage_id, title, text, metadata))
        start = len(self.ids)
        for row, (passage_id, title, text, metadata) in enumerate(parsed, start):
            self.ids.append(passage_id)
            self.titles.append(title)
            self.texts.append(text)
            self.metadata.append(metadata)
            self._index[passage_id] = row
        return np.arange(start, len(self.ids), dtype=np.int64)

    def index_of(self, passage_ids: Iterable[str]) -> np.ndarray:
        """String ids -> dense ids; KeyError naming the first unknown id."""
        try:
            return np.array([self._index[str(p)] for p in passage_ids], np.int64)
        except KeyError as e:
            raise KeyError(f"passage id {e.args[0]!r} is not in {self.source}") from None

    def retriever_texts(self, rows: Iterable[int] | None = None) -> list[str]:
        rows = range(len(self)) if rows is None else rows
        return [retriever_text(self.titles[r], self.texts[r]) for r in rows]

    def reader_texts(self, rows: Iterable[int] | None = None) -> list[str]:
        rows = range(len(self)) if rows is None else rows
        return [reader_text(self.titles[r], self.texts[r]) for r in rows]

    def record(self, row: int) -> dict:
        return {"id": self.ids[row], "title": self.titles[row], "text": self.texts[row],
                "metadata": self.metadata[row]}

    def write_jsonl(self, path: str | Path) -> None:
        from atlas_jax import fileio
        fileio.atomic_write_lines(path, (json.dumps(self.record(row), ensure_ascii=False)
                                         for row in range(len(self))))


@dataclasses.dataclass
class TokenArray:
    """Pre-tokenized texts: `token_ids` (N, max_length) int32 padded with 0 and `lengths`
    (N,) int32, both memory-mapped when loaded from disk."""
    token_ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def build(cls, texts: Sequence[str], encode_batch: EncodeBatch, max_length: int,
              path: str | Path | None = None, chunk: int = 4096) -> "TokenArray":
        """Tokenizes `texts` in chunks (truncating to `max_length`) into `path`.ids.npy /
        `path`.lengths.npy (memory-mapped) or, without `path`, into memory."""
        shape = (len(texts), max_length)
        if path is None:
            token_ids, lengths = np.zeros(shape, np.int32), np.zeros(len(texts), np.int32)
        else:
            token_ids = np.lib.format.open_memmap(f"{path}.ids.npy", "w+", np.int32, shape)
            lengths = np.lib.format.open_memmap(f"{path}.lengths.npy", "w+", np.int32,
                                                (len(texts),))
        for start in range(0, len(texts), chunk):
            for row, ids in enumerate(encode_batch(list(texts[start:start + chunk])), start):
                ids = list(ids)[:max_length]
                token_ids[row, :len(ids)] = ids
                lengths[row] = len(ids)
        if path is not None:
            token_ids.flush()
            lengths.flush()
            return cls.load(path)
        return cls(token_ids, lengths)

    @classmethod
    def load(cls, path: str | Path) -> "TokenArray":
        token_ids = np.load(f"{path}.ids.npy", mmap_mode="r", allow_pickle=False)
        lengths = np.load(f"{path}.lengths.npy", mmap_mode="r", allow_pickle=False)
        if token_ids.ndim != 2 or lengths.shape != token_ids.shape[:1]:
            raise ValueError(f"{path}.ids.npy {token_ids.shape} and {path}.lengths.npy "
                             f"{lengths.shape} do not describe the same passages")
        return cls(token_ids, lengths)

    def gather(self, rows: np.ndarray, pad_to_multiple: int = 8) -> tuple[np.ndarray,
                                                                            np.ndarray]:
        """Dense ids (any shape S) -> (ids S + (L,), mask S + (L,)) int32, L the longest
        selected passage rounded up to `pad_to_multiple` (at most max_length)."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        lengths = np.asarray(self.lengths[flat])
        longest = int(lengths.max(initial=1))
        width = min(-(-longest // pad_to_multiple) * pad_to_multiple, self.token_ids.shape[1])
        ids = np.asarray(self.token_ids[flat, :width])
        mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
        return ids.reshape(rows.shape + (width,)), mask.reshape(rows.shape + (width,))

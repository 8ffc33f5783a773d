"""A SeqIO data source over jsonl files: one JSON object per line, parsed in Python.

Each split maps to a file pattern; files are read lazily (one `tf.data` generator per file,
so a corpus larger than memory streams), interleaved by seqio's `FileDataSource` (which also
shards files across hosts and shuffles them). A record is checked against a schema of
`JsonlField`s, and a bad line raises an error naming the file and line.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import seqio
import tensorflow as tf

STRING = "string"            # a str (numbers are accepted and written as text)
STRING_LIST = "string_list"  # a list of str (a bare str becomes a one-element list)
JSON = "json"                # any JSON value, kept as its canonical JSON text

RecordFn = Callable[[Any, str, int], Any]


@dataclasses.dataclass(frozen=True)
class JsonlField:
    """One field of a jsonl record.

    Attributes:
      name: the JSON key, also the feature name.
      kind: STRING, STRING_LIST or JSON.
      required: a missing key is an error; otherwise `default` is used.
      default: value for a missing key: a constant, or `(path, line_number) -> value`.
      non_empty: a STRING_LIST that must hold at least one string.
    """
    name: str
    kind: str = STRING
    required: bool = True
    default: Any = None
    non_empty: bool = False

    def spec(self) -> tf.TensorSpec:
        return tf.TensorSpec([None] if self.kind == STRING_LIST else [], tf.string)


def line_id(path: str, line_number: int) -> str:
    """Default example id: `{file stem}-{line number}` (stable across runs)."""
    return f"{Path(path).stem}-{line_number}"


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def parse_record(record: Any, fields: Sequence[JsonlField], path: str, line_number: int
                 ) -> dict[str, Any]:
    """Checks one decoded JSON line against `fields` and converts it to feature values.

    Returns:
      {field name: str or list[str]}.

    Raises:
      ValueError: naming `path:line_number` and the offending field.
    """
    where = f"{path}:{line_number}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    values = {}
    for field in fields:
        if field.name not in record or record[field.name] is None:
            if field.required:
                raise ValueError(f"{where}: missing field {field.name!r}")
            default = field.default
            value = default(path, line_number) if callable(default) else default
            values[field.name] = [] if value is None and field.kind == STRING_LIST else (
                "" if value is None else value)
            continue
        value = record[field.name]
        if field.kind == JSON:
            values[field.name] = json.dumps(value, sort_keys=True, ensure_ascii=False)
        elif field.kind == STRING:
            text = _as_text(value)
            if text is None:
                raise ValueError(f"{where}: field {field.name!r} must be a string, "
                                 f"got {json.dumps(value)[:80]}")
            values[field.name] = text
        else:
            items = [value] if isinstance(value, str) else value
            texts = [_as_text(item) for item in items] if isinstance(items, list) else [None]
            if any(text is None for text in texts):
                raise ValueError(f"{where}: field {field.name!r} must be a list of strings, "
                                 f"got {json.dumps(value)[:80]}")
            if field.non_empty and not texts:
                raise ValueError(f"{where}: field {field.name!r} is empty")
            values[field.name] = texts
    return values


def read_jsonl(path: str, fields: Sequence[JsonlField], record_fn: RecordFn | None = None):
    """Yields `parse_record` of each non-blank line of `path`, after `record_fn` if given
    (errors name file:line)."""
    with tf.io.gfile.GFile(path, "r") as lines:
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({e})") from None
            if record_fn is not None:
                record = record_fn(record, path, line_number)
            yield parse_record(record, fields, path, line_number)


class JsonlDataSource(seqio.FileDataSource):
    """`seqio.FileDataSource` over jsonl files whose records follow `fields`.

    The dataset's features are the fields (tf.string scalars, or (n,) tf.string vectors for
    STRING_LIST), plus `split` (the split name) when `add_split` is set.
    """

    def __init__(self, split_to_filepattern: Mapping[str, str | Sequence[str]],
                 fields: Sequence[JsonlField], add_split: bool = False,
                 record_fn: RecordFn | None = None, **kwargs):
        """Args:
          split_to_filepattern: split name -> file pattern(s) (globs allowed).
          fields: the record schema.
          add_split: add a scalar string feature `split` (for split-dependent preprocessing).
          record_fn: `(record, path, line_number) -> record` applied to each decoded line
            before the schema check (reshapes a format; raises ValueError naming path:line).
          **kwargs: passed to `seqio.FileDataSource` (e.g. `num_input_examples`).
        """
        self._fields = tuple(fields)
        self._add_split = add_split
        self._record_fn = record_fn
        signature = {field.name: field.spec() for field in self._fields}

        @tf.autograph.experimental.do_not_convert
        def read_file_fn(file_path: tf.Tensor) -> tf.data.Dataset:
            def generate(path: bytes):
                yield from read_jsonl(path.decode(), self._fields, self._record_fn)
            return tf.data.Dataset.from_generator(generate, args=(file_path,),
                                                  output_signature=signature)

        super().__init__(read_file_fn=read_file_fn,
                         split_to_filepattern=dict(split_to_filepattern), **kwargs)

    @property
    def fields(self) -> tuple[JsonlField, ...]:
        return self._fields

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
        """As `FileDataSource.get_dataset`, with an error naming the split and pattern when
        no file matches."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; this source has {list(self.splits)}")
        files = self.list_shards(split)  # a pattern without wildcards is listed as is
        if not files or not all(tf.io.gfile.exists(path) for path in files):
            raise FileNotFoundError(f"split {split!r}: no file matches "
                                    f"{self._split_to_filepattern[split]!r}")
        dataset = super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
        if self._add_split:
            dataset = dataset.map(lambda features: {**features, "split": tf.constant(split)})
        return dataset

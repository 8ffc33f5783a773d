"""Metadata filters: `--where` expressions evaluated as boolean masks over dense passage ids.

A passage's `metadata` is a dict (docs/design.md §4), e.g.
`{"date": "2023-04-01", "accounts": ["Expenses:Food:Groceries", "Assets:Bank:Checking"],
"payee": "Whole Foods", "amount": 42.5}`. Nested dicts are addressed with dotted names
(`{"a": {"b": 1}}` is field `a.b`).

Semantics of one condition `field OP value`:
  * a list-valued field matches if ANY of its elements matches;
  * if both the element and `value` are numbers (`42`, `-1.5`, `3e2`; not `nan`/`inf`), they
    compare numerically, otherwise as strings (code point order). ISO dates (`YYYY-MM-DD`) are
    not numbers, so they compare as strings, which orders them chronologically;
  * `=` is exact and case-sensitive (`==` is accepted as a synonym); `^=` is a string prefix;
  * a passage without the field (or with None, or an empty list) never matches, except for
    `!=`, which is defined as the exact complement of `=`: `accounts!=X` keeps the passages
    none of whose accounts is X, including those that have no accounts at all;
  * booleans are the strings `true` / `false`; floats beyond 2**53 lose integer precision.

`MetadataTable` stores, per field, one entry per (row, element): the owning row, a float
column (NaN where not numeric) and an int code into the sorted list of distinct strings. Every
operator is then a vectorised numpy comparison plus one scatter into the row mask; string
equality, prefix and order become code ranges found by bisecting the sorted distinct strings.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import re
from array import array
from typing import Any, Iterable, Sequence

import numpy as np

OPERATORS = ("=", "!=", "^=", ">=", "<=", ">", "<")
ACCEPTED_FORMS = ("field=value, field!=value, field^=prefix, field>=value, field<=value, "
                  "field>value, field<value (field: letters, digits, '_' and '.', not starting "
                  "with a digit)")
_WHERE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(==|!=|\^=|>=|<=|=|>|<)\s*(.*?)\s*$",
                       re.DOTALL)
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_MAX_CHAR = "\U0010ffff"


@dataclasses.dataclass(frozen=True)
class Condition:
    """One parsed `--where` condition: `field op value`, `op` one of `OPERATORS`."""
    field: str
    op: str
    value: str

    def __post_init__(self):
        if self.op not in OPERATORS:
            raise ValueError(f"unknown filter operator {self.op!r}; accepted: {ACCEPTED_FORMS}")

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value}"


def parse_where(expression: str) -> Condition:
    """Parse one `--where` expression such as `date>=2023-01-01` or `payee=Whole Foods`.

    Args:
      expression: `field OP value`; whitespace around the operator and the value is dropped
        and one pair of matching surrounding quotes ('...' or "...") is removed from the value.

    Returns:
      The `Condition`.

    Raises:
      ValueError quoting the expression and listing the accepted forms.
    """
    match = _WHERE_RE.match(expression) if isinstance(expression, str) else None
    if match is None:
        raise ValueError(f"cannot parse filter expression {expression!r}: "
                         f"expected one of {ACCEPTED_FORMS}")
    field, op, value = match.groups()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    elif value == "":
        raise ValueError(f"filter expression {expression!r} has no value after {op!r}: "
                         f"expected one of {ACCEPTED_FORMS}")
    return Condition(field, "=" if op == "==" else op, value)


def _as_number(text: str) -> float | None:
    return float(text) if _NUMBER_RE.match(text) else None


def _flatten(metadata: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted field, scalar) pairs; lists expand into several pairs, None is dropped."""
    for key, value in metadata.items():
        name = f"{prefix}{key}"
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, dict):
                yield from _flatten(item, name + ".")
            elif item is not None:
                yield name, item


def _as_text(value: Any) -> str:
    """The string form of a scalar; its numeric value, if any, is `_as_number` of it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)          # str() of an int or float round-trips through float()


class _FieldColumn:
    """Entries of one field: append-only builders plus lazily built numpy columns."""

    def __init__(self):
        self.owners = array("q")          # row of each entry
        self.first_seen = array("q")      # code of each entry's string, in first-seen order
        self.string_ids: dict[str, int] = {}
        self._built: tuple | None = None

    def add(self, row: int, text: str) -> None:
        self.owners.append(row)
        self.first_seen.append(self.string_ids.setdefault(text, len(self.string_ids)))
        self._built = None

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(owners int64, numbers float64 NaN where not numeric, sorted string codes int64,
        sorted distinct strings)."""
        if self._built is None:
            distinct = sorted(self.string_ids)
            rank = np.empty(len(distinct), np.int64)
            rank[np.fromiter((self.string_ids[s] for s in distinct), np.int64,
                             len(distinct))] = np.arange(len(distinct))
            codes = rank[np.frombuffer(self.first_seen, np.int64)]
            parsed = (_as_number(s) for s in distinct)
            distinct_numbers = np.fromiter((math.nan if x is None or not math.isfinite(x)
                                            else x for x in parsed), np.float64, len(distinct))
            self._built = (np.frombuffer(self.owners, np.int64).copy(),
                           distinct_numbers[codes], codes, distinct)
        return self._built


def _entry_matches(column: _FieldColumn, op: str, value: str) -> np.ndarray:
    """Bool per entry of `column` for `op` in =, ^=, >=, <=, >, < (not !=)."""
    _, numbers, codes, distinct = column.columns()
    if op == "^=":
        lo = bisect.bisect_left(distinct, value)
        hi = bisect.bisect_left(distinct, value + _MAX_CHAR)
        return (codes >= lo) & (codes < hi)
    if op == "=":
        pos = bisect.bisect_left(distinct, value)
        by_string = codes == pos if pos < len(distinct) and distinct[pos] == value \
            else np.zeros(len(codes), bool)
    else:
        # Code ranges of the strings satisfying the order relation against `value`.
        left, right = bisect.bisect_left(distinct, value), bisect.bisect_right(distinct, value)
        by_string = {">=": codes >= left, ">": codes >= right,
                     "<=": codes < right, "<": codes < left}[op]
    number = _as_number(value)
    if number is None:
        return by_string
    with np.errstate(invalid="ignore"):
        by_number = {"=": numbers == number, ">=": numbers >= number, ">": numbers > number,
                     "<=": numbers <= number, "<": numbers < number}[op]
    return np.where(np.isnan(numbers), by_string, by_number)


class MetadataTable:
    """Column store of passage metadata, one row per dense passage id, for fast filter masks.

    Args:
      metadatas: one metadata dict per dense id, in id order; None or {} for none.
    """

    def __init__(self, metadatas: Sequence[dict | None] = ()):
        self._fields: dict[str, _FieldColumn] = {}
        self._num_rows = 0
        self.append(metadatas)

    def __len__(self) -> int:
        return self._num_rows

    @property
    def fields(self) -> list[str]:
        """Sorted names of the fields seen so far (dotted for nested dicts)."""
        return sorted(self._fields)

    def append(self, metadatas: Sequence[dict | None]) -> None:
        """Add rows for the next dense ids (`len(self)`, `len(self) + 1`, ...).

        Raises:
          ValueError if an entry is neither a dict nor None, naming its dense id.
        """
        for metadata in metadatas:
            row = self._num_rows
            if metadata is not None and not isinstance(metadata, dict):
                raise ValueError(f"metadata of passage {row} must be a dict or None, "
                                 f"got {type(metadata).__name__}")
            for field, value in _flatten(metadata or {}):
                column = self._fields.get(field)
                if column is None:
                    column = self._fields[field] = _FieldColumn()
                column.add(row, _as_text(value))
            self._num_rows += 1

    def condition_mask(self, condition: Condition | str) -> np.ndarray:
        """Bool (num_rows,) mask of the rows satisfying one condition (or `--where` string)."""
        if isinstance(condition, str):
            condition = parse_where(condition)
        column = self._fields.get(condition.field)
        if column is None:
            known = self.fields
            shown = ", ".join(known[:50]) + (f", ... ({len(known)} in all)" if len(known) > 50
                                             else "")
            raise ValueError(f"unknown metadata field {condition.field!r} in filter "
                             f"{str(condition)!r}; known fields: {shown or '(none)'}")
        op = "=" if condition.op == "!=" else condition.op
        owners = column.columns()[0]
        mask = np.zeros(self._num_rows, bool)
        mask[owners[_entry_matches(column, op, condition.value)]] = True
        return ~mask if condition.op == "!=" else mask

    def mask(self, conditions: Sequence[Condition | str]) -> np.ndarray:
        """Bool (num_rows,) mask, True where a passage satisfies ALL conditions.

        Args:
          conditions: `Condition`s or `--where` strings; an empty list allows every row.

        Raises:
          ValueError for an unknown field (naming it and listing the known fields) or an
          unparsable expression.
        """
        result = np.ones(self._num_rows, bool)
        for condition in conditions:
            result &= self.condition_mask(condition)
        return result

"""Index refresh: Atlas's refresh schedule, and a hot-swappable index holder.

Schedule syntax (Atlas's `--refresh_index`): `"start-end:every,start-end:every"` refreshes
every `every` steps counted from `start`, for start <= step < end; a plain integer N means
every N steps from step 0; -1 means never (only the index built before training is used).
As in Atlas, a retriever that is not trained is refreshed at step 0 only, and steps before
`freeze_retriever_steps` (other than 0) never refresh.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, Callable

import gin

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*:\s*(\d+)\s*$")
NEVER = "-1"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RefreshSchedule:
    """Parsed refresh schedule; build with `RefreshSchedule.parse(spec)`."""
    ranges: tuple[tuple[int, int, int], ...] = ()     # (start, end, every), end exclusive
    train_retriever: bool = True
    freeze_retriever_steps: int = 0
    spec: str = NEVER

    @classmethod
    def parse(cls, spec: str | int, train_retriever: bool = True,
              freeze_retriever_steps: int = 0) -> "RefreshSchedule":
        """Parses `spec`; ValueError quoting the spec and the bad part."""
        text = str(spec).strip()
        kwargs = dict(train_retriever=train_retriever,
                      freeze_retriever_steps=freeze_retriever_steps, spec=text)
        if text == NEVER:
            return cls((), **kwargs)
        if text.isdigit():
            every = int(text)
            if every <= 0:
                raise ValueError(f"refresh schedule {text!r}: the interval must be positive "
                                 "(use -1 to never refresh)")
            return cls(((0, 2 ** 62, every),), **kwargs)
        ranges = []
        for part in text.split(","):
            match = _RANGE.match(part)
            if not match:
                raise ValueError(
                    f"refresh schedule {text!r}: cannot parse {part.strip()!r}; expected "
                    "'start-end:every' parts joined by commas, an integer N (every N steps) "
                    "or -1 (never)")
            start, end, every = map(int, match.groups())
            if end <= start or every <= 0:
                raise ValueError(f"refresh schedule {text!r}: {part.strip()!r} needs "
                                 "start < end and every > 0")
            ranges.append((start, end, every))
        ranges.sort()
        for (_, end, _), (next_start, _, _) in zip(ranges, ranges[1:]):
            if next_start < end:
                raise ValueError(f"refresh schedule {text!r}: ranges overlap at step "
                                 f"{next_start}")
        return cls(tuple(ranges), **kwargs)

    def should_refresh(self, step: int) -> bool:
        """Whether the index is re-embedded before training step `step`."""
        if not self.train_retriever and step != 0:
            return False
        if step != 0 and step < self.freeze_retriever_steps:
            return False
        for start, end, every in self.ranges:
            if start <= step < end:
                return (step - start) % every == 0
        return False

    def steps(self, until: int) -> list[int]:
        """The refresh steps in [0, until)."""
        return [step for step in range(until) if self.should_refresh(step)]


class HotSwapIndex:
    """Holds the live index; a search always runs against exactly one version.

    Searches and swaps serialise on one lock, so a search never sees a half-replaced index;
    the expensive part of a refresh (re-embedding, building the new backend) happens outside
    the lock, and only the pointer swap (or a backend's in-place upsert) happens inside.
    """

    def __init__(self, index: Any):
        self._index = index
        self._version = 0
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._version

    @property
    def current(self) -> Any:
        return self._index

    def search(self, *args, **kwargs):
        """`index.search(...)` on the current version; returns (version, result)."""
        with self._lock:
            return self._version, self._index.search(*args, **kwargs)

    def swap(self, new_index: Any) -> int:
        """Atomically replaces the index; returns the new version number."""
        with self._lock:
            self._index = new_index
            self._version += 1
            return self._version

    def refresh(self, rebuild: Callable[[Any], Any]) -> int:
        """Builds `rebuild(current_index)` outside the lock (e.g. re-embedding the corpus
        with the current passage tower), then swaps it in; returns the new version."""
        return self.swap(rebuild(self._index))

    def update(self, mutate: Callable[[Any], None]) -> int:
        """Applies an in-place `mutate(index)` (incremental add / delete) under the lock, so
        no search overlaps it; returns the new version."""
        with self._lock:
            mutate(self._index)
            self._version += 1
            return self._version

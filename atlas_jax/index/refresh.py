"""Index refresh: Atlas's refresh schedule, and a hot-swappable index holder.

Schedule syntax (Atlas's `--refresh_index`): `"start-end:every,start-end:every"` refreshes
every `every` steps counted from `start`, for start <= step < end; a plain integer N means
every N steps from step 0; -1 means never (only the index built before training is used).
As in Atlas, a retriever that is not trained is refreshed at step 0 only, and steps before
`freeze_retriever_steps` (other than 0) never refresh.

`HotSwapIndex` holds the live index under concurrent searches, updates (`update`: add /
delete) and refreshes (`refresh`: re-embed and swap). Guarantees:

- A search runs against exactly one published version and returns its number; versions only
  grow, each update / refresh / swap publishes one.
- Searches do not wait for writers: they take a lock only to read the published
  (version, index) pointer. An update first moves searches to a fork of the current version
  (`fork_index`: new store lists and deletion masks, shared arrays; no embedding, BM25 or
  device work), waits for the searches still on the live object to finish, mutates it in
  place, rebuilds the caches the mutation invalidated (BM25 index, filter metadata table) and
  publishes it. The caller's index object stays the live one (`holder.current is index`).
- A refresh forks a snapshot of the version it starts from, rebuilds from it outside every
  lock, then replays the updates made since (in order) onto the result and publishes it: no
  update is lost and none makes the refresh fail. A `swap` during a refresh makes the refresh
  raise RefreshConflict (publishing it would undo the swap).
- An update that raises publishes nothing; a half-applied mutation is never visible.
- Writers serialise on one writer lock. Indexes without a cheap fork (a ScaNN backend, whose
  upsert changes its searcher in place; objects without `copy()`) fall back to the old
  behaviour: searches wait while an update mutates, updates wait while a refresh rebuilds
  (which then must not call the holder's update / swap), and an update that raises half way
  leaves what it changed. Versions are still never mixed and updates never lost.
"""
from __future__ import annotations

import contextlib
import copy
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


class RefreshConflict(RuntimeError):
    """A refresh finished after `HotSwapIndex.swap` replaced the index it was rebuilt from;
    nothing was published (publishing it would silently undo the swap)."""


def fork_index(index: Any) -> Any | None:
    """A copy of `index` that no later update of `index` touches, or None without a cheap one.

    The index's own `copy()` is used when it has one. A `PassageIndex` is forked from what
    its updates change in place: `add` appends to the PassageStore's lists and id map and
    replaces every array it touches (embeddings, deleted, the device backend's tables, the
    tokens and the cached BM25 index / metadata table); `delete` writes the `deleted` mask and
    the device backend's alive mask in place. So a fork gets its own store lists, id map and
    those two masks and shares the rest: O(passages) pointer and bool copies, no embedding,
    BM25 or device work. A backend that updates an opaque searcher in place (ScaNN's upsert)
    has no cheap copy: None.
    """
    own_copy = getattr(index, "copy", None)
    if callable(own_copy):
        return own_copy()
    from atlas_jax.index import passage_index
    if not isinstance(index, passage_index.PassageIndex):
        return None
    backend = _fork_backend(index.backend)
    if backend is None:
        return None
    fork = copy.copy(index)
    fork.store = copy.copy(index.store)
    for name in ("ids", "titles", "texts", "metadata"):
        setattr(fork.store, name, list(getattr(index.store, name)))
    fork.store._index = dict(index.store._index)
    fork.deleted = index.deleted.copy()
    fork.backend = backend
    return fork


def _fork_backend(backend: Any) -> Any | None:
    own_copy = getattr(backend, "copy", None)
    if callable(own_copy):
        return own_copy()
    from atlas_jax.index import device
    if isinstance(backend, device.DeviceBackend):
        fork = copy.copy(backend)
        fork._alive = backend._alive.copy()        # `delete` writes it in place
        return fork
    return None


_CACHES = (("_metadata_table", "metadata_table"), ("_bm25", "bm25"))
_RECENT_SEARCHES = 4         # distinct search signatures an update replays to warm up


def _caches_in_use(*indexes: Any) -> set[str]:
    """The lazily built search structures (filter metadata table, BM25) any of `indexes`
    has built, i.e. that searches use."""
    return {prop for index in indexes for attr, prop in _CACHES
            if getattr(index, attr, None) is not None}


def _warm(index: Any, caches: set[str], searches: list[tuple[tuple, dict]]) -> None:
    """Builds `caches` on `index` and runs `searches` (args, kwargs) on it, on the writer's
    side before it is published, so that no search pays for what the update invalidated:
    the BM25 index, the metadata table, a device search compiled for the new table shape.
    Best effort: a replayed search that fails (e.g. an explicit mask of the old size) is
    skipped."""
    for prop in sorted(caches):
        getattr(index, prop)
    for args, kwargs in searches:
        try:
            index.search(*args, **kwargs)
        except Exception:                      # noqa: BLE001 - warming only
            pass


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What decides the compiled search and the caches it needs: argument shapes, scalars
    (k, hybrid), the kinds of the other arguments."""
    def key(value):
        if hasattr(value, "shape"):
            return ("shape", tuple(value.shape))
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return type(value).__name__
    return tuple(map(key, args)), tuple(sorted((name, key(v)) for name, v in kwargs.items()))


class _Published:
    """One published (version, index) pair and the number of searches running on it."""
    __slots__ = ("version", "index", "readers")

    def __init__(self, version: int, index: Any):
        self.version, self.index, self.readers = version, index, 0


class HotSwapIndex:
    """Holds the live index; see the module docstring for the guarantees.

    Searches take the published (version, index) pair under a lock held only to read the
    pointer and count themselves in, and never wait for an update or a refresh (except for an
    index without a cheap `fork_index`: then they wait while an update mutates it). Writers
    (`update`, `swap`, the start and the end of `refresh`) serialise on a writer lock.
    """

    def __init__(self, index: Any):
        self._published = _Published(0, index)
        self._master = index            # what `update` mutates; the published one otherwise
        self._readers = threading.Condition(threading.Lock())
        self._closed = False            # searches wait (an update of an unforkable index)
        self._writer = threading.Lock()
        self._logs: dict[object, list[Callable[[Any], Any]]] = {}   # per refresh in flight
        self._swaps = 0
        self._recent: dict[tuple, tuple[tuple, dict]] = {}   # search signature -> arguments

    @property
    def version(self) -> int:
        return self._published.version

    @property
    def current(self) -> Any:
        """The index searches run against now (during an update: a frozen copy of the
        version before it). Read it only; mutate through `update`."""
        return self._published.index

    @contextlib.contextmanager
    def pinned(self):
        """`with holder.pinned() as (version, index):` one version, which no update changes
        until the block exits (e.g. to map a result's ids to passages). Do not call
        `update` inside it: the update would wait for the block."""
        entry = self._enter()
        try:
            yield entry.version, entry.index
        finally:
            self._leave(entry)

    def search(self, *args, **kwargs):
        """`index.search(...)` on the current version; returns (version, result)."""
        entry = self._enter((_signature(args, kwargs), args, kwargs))
        try:
            return entry.version, entry.index.search(*args, **kwargs)
        finally:
            self._leave(entry)

    def swap(self, new_index: Any) -> int:
        """Atomically replaces the index; returns the new version number. A refresh in
        flight then raises RefreshConflict instead of publishing."""
        with self._writer:
            self._swaps += 1
            return self._publish_next(new_index)

    def refresh(self, rebuild: Callable[[Any], Any]) -> int:
        """Publishes `rebuild(snapshot)` (e.g. `lambda old: old.reembed(...)`, re-embedding
        the corpus with the current passage tower); returns the new version.

        `snapshot` is a fork of the current version that no update touches; the rebuild runs
        outside every lock, while searches and updates go on. The updates made meanwhile
        are replayed, in order, onto the rebuilt index before it is published, so none is
        lost. `rebuild` must build from its argument only. Without a cheap fork (e.g. a
        ScaNN backend) the rebuild reads the live index under the writer lock: updates wait
        for it, and it must not call this holder's `update` / `swap`.
        Raises what `rebuild` or a replayed update raises (nothing published then), or
        RefreshConflict if `swap` replaced the index meanwhile.
        """
        with self._writer:
            snapshot = fork_index(self._master)
            if snapshot is None:
                new = rebuild(self._master)
                _warm(new, _caches_in_use(self._master), self._recent_searches())
                return self._publish_next(new)
            token, log, swaps = object(), [], self._swaps
            self._logs[token] = log
        try:
            new = rebuild(snapshot)
        except BaseException:
            with self._writer:
                del self._logs[token]
            raise
        with self._writer:
            del self._logs[token]
            if self._swaps != swaps:
                raise RefreshConflict("the index was swapped while this refresh rebuilt the "
                                      "previous one; its result was not published")
            for mutate in log:
                mutate(new)
            _warm(new, _caches_in_use(self._master), self._recent_searches())
            return self._publish_next(new)

    def update(self, mutate: Callable[[Any], Any]) -> int:
        """Applies `mutate(index)` (an incremental add / delete, in place) as one new version;
        returns its number.

        Searches move to a fork of the current version first and are not held up; the
        mutation (and the rebuild of the BM25 index / metadata table it invalidates) runs on
        the live index object once no search runs on it, which is then published. If
        `mutate` raises, nothing is published and the fork becomes the live index (a half
        applied mutation is never visible). A refresh in flight replays `mutate` on its
        result, so `mutate` must only act through its argument.
        """
        with self._writer:
            entry, master = self._published, self._master
            shadow = fork_index(master)
            if shadow is None:                    # no cheap copy: searches wait meanwhile
                with self._readers:
                    self._closed = True
                try:
                    self._drain(entry)
                    caches = _caches_in_use(master)
                    mutate(master)
                    _warm(master, caches, self._recent_searches())
                except BaseException:
                    with self._readers:
                        self._closed = False
                        self._readers.notify_all()
                    raise
            else:
                self._set_published(_Published(entry.version, shadow))
                self._drain(entry)                # now no search runs on `master`
                try:
                    caches = _caches_in_use(master, shadow)
                    mutate(master)
                    _warm(master, caches, self._recent_searches())
                except BaseException:
                    self._master = shadow
                    raise
            for log in self._logs.values():
                log.append(mutate)
            version = entry.version + 1
            self._set_published(_Published(version, master))
            return version

    # ------------------------------------------------------------------ internals
    def _publish_next(self, index: Any) -> int:
        """Under the writer lock: publishes `index` as the next version."""
        version = self._published.version + 1
        self._master = index
        self._set_published(_Published(version, index))
        return version

    def _set_published(self, entry: _Published) -> None:
        with self._readers:
            self._published = entry
            self._closed = False
            self._readers.notify_all()

    def _recent_searches(self) -> list[tuple[tuple, dict]]:
        with self._readers:
            return list(self._recent.values())

    def _enter(self, search: tuple | None = None) -> _Published:
        with self._readers:
            while self._closed:
                self._readers.wait()
            entry = self._published
            entry.readers += 1
            if search is not None and search[0] not in self._recent:
                if len(self._recent) >= _RECENT_SEARCHES:
                    del self._recent[next(iter(self._recent))]
                self._recent[search[0]] = search[1:]
            return entry

    def _leave(self, entry: _Published) -> None:
        with self._readers:
            entry.readers -= 1
            if not entry.readers and (self._closed or entry is not self._published):
                self._readers.notify_all()        # a writer may be draining it

    def _drain(self, entry: _Published) -> None:
        """Waits until no search runs on `entry` (no new one can start on it)."""
        with self._readers:
            while entry.readers:
                self._readers.wait()

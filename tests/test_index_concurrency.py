"""HotSwapIndex under concurrent searches, updates (add / delete) and refreshes: no refresh
fails because of an update, no update is lost, no search sees a mixed version, searches do
not wait on writers (docs/robustness.md, "Hot-swap index under concurrent updates")."""
import threading
import time
import zlib

import numpy as np
import pytest

from atlas_jax.index import base, passage_index, passages, refresh

DIM, START, K = 16, 64, 8
MIN_RUN_S, MAX_RUN_S = 1.0, 30.0      # concurrent phase: until enough happened, capped
QUERY = np.random.default_rng(0).normal(size=(1, DIM)).astype(np.float32)
FILTER = ["group=0"]


def embedding(passage_id: str) -> np.ndarray:
    """A deterministic embedding per passage id (the 'passage tower' of these tests)."""
    rng = np.random.default_rng(zlib.crc32(passage_id.encode()))
    return rng.normal(size=DIM).astype(np.float32)


def group(passage_id: str) -> int:
    return zlib.crc32(passage_id.encode()) % 2


def record(passage_id: str) -> dict:
    return {"id": passage_id, "title": f"title {passage_id}",
            "text": f"passage {passage_id} about topic {zlib.crc32(passage_id.encode()) % 5}",
            "metadata": {"group": group(passage_id)}}


class UnforkableBackend(base.HostBackend):
    """Like a ScaNN backend: no cheap copy, so HotSwapIndex falls back to exclusive updates
    and refreshes that hold the writer lock."""
    name, copy = "unforkable", None


def index_over(store, rows, backend: str) -> passage_index.PassageIndex:
    if backend == "device":
        return passage_index.PassageIndex.from_embeddings(store, rows, "device")
    backend_class = base.HostBackend if backend == "host" else UnforkableBackend
    return passage_index.PassageIndex(store, rows, backend_class(rows),
                                      np.zeros(len(rows), bool))


def make_index(backend: str = "device") -> passage_index.PassageIndex:
    ids = [f"p{i}" for i in range(START)]
    store = passages.PassageStore.from_records([record(p) for p in ids])
    return index_over(store, np.stack([embedding(p) for p in ids]), backend)


def slow_rebuild(old: passage_index.PassageIndex) -> passage_index.PassageIndex:
    """What `PassageIndex.reembed` does (a new index over the same store, deletions carried
    over), with a pause where the passage tower would run so that updates land mid-refresh."""
    rows = np.stack([embedding(p) for p in old.store.ids[:len(old.store)]])
    time.sleep(0.05)
    if len(rows) != len(old.store):          # what from_embeddings checks
        raise ValueError(f"{len(rows)} embeddings for {len(old.store)} passages")
    new = index_over(old.store, rows, old.backend.name)
    if old.deleted.any():
        new.backend.delete(np.flatnonzero(old.deleted))
        new.deleted = old.deleted.copy()
    return new


@pytest.mark.parametrize("backend", ["device", "host", "unforkable"])
def test_search_update_refresh_concurrently(backend):
    holder = refresh.HotSwapIndex(make_index(backend))
    holder.search(QUERY, K, where=FILTER)                 # filters in use: cached table
    holder.search(QUERY, K, query_texts=["warm up"], hybrid=True)    # BM25 built, compiled
    stop, errors = threading.Event(), []
    searches = [[] for _ in range(2)]          # per thread: (version, kind, ids)
    events = []                                # (version, op, passage id, dense ids)
    refreshes = []                             # (version before, version after)

    def guarded(body):
        def run():
            try:
                body()
            except BaseException as e:         # noqa: BLE001 - reported below
                errors.append(repr(e))
                stop.set()
        return run

    def searcher(seen):
        turn = 0
        while not stop.is_set():
            turn += 1
            if turn % 3 == 0:
                version, result = holder.search(QUERY, K, where=FILTER)
                seen.append((version, "filtered", tuple(result.ids[0])))
            elif turn % 3 == 1:
                version, result = holder.search(QUERY, K)
                seen.append((version, "dense", tuple(result.ids[0])))
            else:
                version, result = holder.search(QUERY, K, query_texts=["passage topic 3"],
                                                hybrid=True)
                seen.append((version, "hybrid", tuple(result.ids[0])))

    def updater():
        rng, live, number = np.random.default_rng(1), [], 0
        while not stop.is_set():
            passage_id = f"n{number}"
            number += 1
            out = {}
            version = holder.update(lambda index, p=passage_id, o=out: o.setdefault(
                "ids", index.add([record(p)], embedding(p)[None])))
            events.append((version, "add", passage_id, out["ids"].tolist()))
            live.append(passage_id)
            if number % 3 == 0:
                victim = live.pop(int(rng.integers(len(live))))
                version = holder.update(lambda index, p=victim: index.delete([p]))
                events.append((version, "delete", victim, None))
            if backend == "device":           # every add reshapes the device table: a
                time.sleep(0.01)              # search after it compiles; let searches run

    def refresher():
        while not stop.is_set():
            before = holder.version
            refreshes.append((before, holder.refresh(slow_rebuild)))

    threads = [threading.Thread(target=guarded(lambda s=s: searcher(s))) for s in searches]
    threads += [threading.Thread(target=guarded(updater)),
                threading.Thread(target=guarded(refresher))]
    def enough():                             # at least MIN_RUN_S and some of everything
        overlapped = backend == "unforkable" or any(
            after > before + 1 for before, after in refreshes)
        return (len(events) >= 12 and len(refreshes) >= 3 and overlapped
                and min(len(seen) for seen in searches) >= 20)

    start = time.monotonic()
    for thread in threads:
        thread.start()
    while not stop.is_set() and time.monotonic() - start < MAX_RUN_S and not (
            time.monotonic() - start >= MIN_RUN_S and enough()):
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []                                       # no refresh (or search) failed

    # Every version was published exactly once, by one update or one refresh.
    final = holder.version
    published = sorted([e[0] for e in events] + [after for _, after in refreshes])
    assert published == list(range(1, final + 1))
    assert refreshes
    if backend != "unforkable":               # there, updates wait for refreshes
        assert any(after > before + 1 for before, after in refreshes), \
            "no update landed during a refresh: the race was not exercised"

    # The passages of each version, from the writers' own record.
    order = [f"p{i}" for i in range(START)]
    deleted: set[int] = set()
    by_version = {e[0]: e for e in events}
    state = {0: (len(order), frozenset())}
    for version in range(1, final + 1):
        event = by_version.get(version)
        if event is not None and event[1] == "add":
            assert event[3] == [len(order)]                   # dense ids in append order
            order.append(event[2])
        elif event is not None:
            deleted.add(order.index(event[2]))
        state[version] = (len(order), frozenset(deleted))

    rows = np.stack([embedding(p) for p in order])
    groups = np.array([group(p) for p in order])
    expected = {}

    def reference(version, kind):
        if (version, kind) not in expected:
            count, gone = state[version]
            alive = np.ones(count, bool)
            alive[list(gone)] = False
            if kind == "filtered":
                alive &= groups[:count] == 0
            expected[version, kind] = (
                tuple(base.exact_search(rows[:count], QUERY, K, alive).ids[0]), alive)
        return expected[version, kind]

    for seen in searches:
        assert seen
        versions = [version for version, _, _ in seen]
        assert versions == sorted(versions)                   # monotonic per reader
        for version, kind, ids in seen:
            exact, alive = reference(version, kind)
            if kind == "hybrid":                              # only passages of that version
                assert all(alive[i] for i in ids if i >= 0), (version, ids)
            else:                                             # exactly that version's top k
                assert ids == exact, (version, kind)

    # Nothing lost: the final version holds every add and every delete.
    index = holder.current
    assert index.store.ids == order
    np.testing.assert_array_equal(np.flatnonzero(index.deleted), sorted(deleted))
    everything = holder.search(QUERY, len(order))[1].ids[0]
    assert set(everything[everything >= 0].tolist()) == set(range(len(order))) - deleted


def test_search_does_not_wait_for_an_update():
    holder = refresh.HotSwapIndex(make_index())
    inside, release = threading.Event(), threading.Event()
    results = []

    def slow_add(index):
        index.add([record("slow")], embedding("slow")[None])
        inside.set()
        release.wait(10)

    writer = threading.Thread(target=lambda: holder.update(slow_add))
    writer.start()
    try:
        assert inside.wait(10)
        reader = threading.Thread(target=lambda: results.append(holder.search(QUERY, K)))
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive(), "a search waited for an update in progress"
        version, result = results[0]
        assert version == 0
        assert result.ids[0].tolist() == list(
            base.exact_search(make_index().embeddings, QUERY, K).ids[0])
    finally:
        release.set()
        writer.join()
    assert holder.version == 1 and holder.current.store.ids[-1] == "slow"


def test_failed_update_publishes_nothing():
    holder = refresh.HotSwapIndex(make_index())

    def add_then_fail(index):
        index.add([record("half")], embedding("half")[None])
        raise RuntimeError("mutation failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        holder.update(add_then_fail)
    assert holder.version == 0 and len(holder.current.store) == START
    assert "half" not in holder.current.store.ids
    holder.update(lambda index: index.add([record("whole")], embedding("whole")[None]))
    assert holder.version == 1 and holder.current.store.ids[-1] == "whole"
    assert holder.search(QUERY, START + 1)[1].ids.max() == START


def test_update_keeps_the_callers_index_object():
    """Callers that hold the index they wrapped (tests/test_index_cli.py, demo.py) see the
    updates on it, as before."""
    index = make_index()
    holder = refresh.HotSwapIndex(index)
    holder.update(lambda idx: idx.add([record("mine")], embedding("mine")[None]))
    holder.update(lambda idx: idx.delete(["p0"]))
    assert holder.current is index and index.store.ids[-1] == "mine" and index.deleted[0]


def test_unforkable_index_has_no_fork():
    assert refresh.fork_index(make_index("unforkable")) is None
    assert refresh.fork_index(object()) is None


def test_fork_is_not_touched_by_later_updates():
    index = make_index()
    index.search(QUERY, K, where=FILTER)
    fork = refresh.fork_index(index)
    before = fork.search(QUERY, START).ids.copy()
    index.add([record("later")], embedding("later")[None])
    index.delete(["p1", "p2"])
    assert len(fork.store) == START and "later" not in fork.store.ids
    assert not fork.deleted.any() and fork.store.index_of(["p1"])[0] == 1
    np.testing.assert_array_equal(fork.search(QUERY, START).ids, before)
    assert fork.filter_mask(FILTER).shape == (START,)
    assert index.search(QUERY, START + 1).ids.max() == START


def test_swap_during_refresh_is_a_conflict():
    holder = refresh.HotSwapIndex(make_index())
    swapped = make_index()

    def rebuild(old):
        holder.swap(swapped)
        return slow_rebuild(old)

    with pytest.raises(refresh.RefreshConflict):
        holder.refresh(rebuild)
    assert holder.current is swapped and holder.version == 1

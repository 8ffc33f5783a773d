"""Refresh schedule parser (Atlas syntax) and atomic hot swap."""
import threading

import numpy as np
import pytest

from atlas_jax.index import base, refresh
from atlas_jax.index.refresh import RefreshSchedule


def test_ranges():
    schedule = RefreshSchedule.parse("0-100:10,100-1000:500")
    assert schedule.ranges == ((0, 100, 10), (100, 1000, 500))
    assert schedule.steps(1200) == list(range(0, 100, 10)) + [100, 600]


def test_plain_integer_and_never():
    assert RefreshSchedule.parse("250").steps(1000) == [0, 250, 500, 750]
    assert RefreshSchedule.parse(250).should_refresh(10 ** 9)
    assert RefreshSchedule.parse("-1").steps(1000) == []
    assert RefreshSchedule.parse(-1).steps(10) == []


def test_frozen_and_untrained_retriever():
    assert RefreshSchedule.parse("10", freeze_retriever_steps=25).steps(60) == [0, 30, 40, 50]
    assert RefreshSchedule.parse("10", train_retriever=False).steps(60) == [0]


def test_unordered_ranges_and_spaces():
    schedule = RefreshSchedule.parse(" 50-60:5 , 0-50:25 ")
    assert schedule.steps(70) == [0, 25, 50, 55]


@pytest.mark.parametrize("spec, message", [
    ("0-100", "cannot parse '0-100'"), ("abc", "cannot parse 'abc'"),
    ("100-0:5", "start < end"), ("0-10:0", "every > 0"), ("0", "must be positive"),
    ("0-100:10,50-200:10", "overlap at step 50"), ("-5", "cannot parse"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        RefreshSchedule.parse(spec)


class _Constant:
    """An index whose every hit is its own version number (to detect mixing)."""

    def __init__(self, version):
        self.version = version

    def search(self, queries, k):
        ids = np.full((len(queries), k), self.version)
        return base.SearchResult(ids, ids.astype(np.float32))


def test_hot_swap_never_mixes_versions():
    holder = refresh.HotSwapIndex(_Constant(0))
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            version, result = holder.search(np.zeros((4, 2)), 8)
            seen.append((version, np.unique(result.ids).tolist()))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for version in range(1, 30):
        assert holder.refresh(lambda old, v=version: _Constant(v)) == version
    stop.set()
    for t in threads:
        t.join()
    assert seen and all(ids == [version] for version, ids in seen)
    assert holder.version == 29 and holder.current.version == 29

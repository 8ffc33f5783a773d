"""How well `atlas-jax ask`'s grounding flag separates right answers from wrong ones, on a
finished demo run's predictions (no model is run).

For each prediction of a system, the evidence is the passages the reader read (the first
`n_context` retrieved); an answer is *grounded* when `ledger_checks.grounding` finds an evidence entry
that states it, else `ask` flags it low-confidence. Prints EM of grounded and flagged
answers per system and split, and writes JSON.

    python -m bench.ask_grounding --run demo_out [--out bench/results/ask_grounding.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench import emit

PREDICTIONS = ("joint_hybrid_test", "joint_test", "frozen_retriever_test",
               "joint_hybrid_new_refreshed")


def measure(run_dir: Path, n_context: int) -> dict:
    from atlas_jax.ledger.checks import grounding
    from atlas_jax.evaluation import exact_match
    texts = {}
    with (run_dir / "ledger" / "passages.jsonl").open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            texts[record["id"]] = record["text"]
    out = {}
    for name in PREDICTIONS:
        path = run_dir / "predictions" / f"{name}.jsonl"
        if not path.is_file():
            continue
        grounded, flagged = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            evidence = [{"id": i, "text": texts[i]} for i in record["retrieved"][:n_context]]
            correct = exact_match(record["prediction"], record["answers"])
            (grounded if grounding(record["prediction"], evidence) else flagged).append(correct)
        out[name] = {"grounded": len(grounded), "grounded_em": float(np.mean(grounded or [0])),
                     "flagged": len(flagged), "flagged_em": float(np.mean(flagged or [0])),
                     "right_answers_flagged": int(sum(flagged)),
                     "wrong_answers_flagged": int(len(flagged) - sum(flagged))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished `atlas-jax demo` folder")
    parser.add_argument("--n_context", type=int, default=4, help="passages the reader read")
    parser.add_argument("--out", default="bench/results/ask_grounding.json")
    args = parser.parse_args()
    report = {"run": args.run, "n_context": args.n_context,
              "systems": measure(Path(args.run), args.n_context)}
    if not report["systems"]:
        raise SystemExit(f"{args.run}/predictions: no demo predictions found")
    print("| predictions | grounded | EM grounded | flagged | EM flagged |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in report["systems"].items():
        print(f"| {name} | {row['grounded']} | {row['grounded_em']:.3f} | {row['flagged']} | "
              f"{row['flagged_em']:.3f} |")
    emit(report, args.out)


if __name__ == "__main__":
    main()

"""`atlas-jax serve` as a Beancount user meets it: latency cold, warm and during a sync, time
until a saved edit is searchable, sync time per added entry, and the answers' checks.

Generates a ledger with a seed used nowhere else (default 6161, 2024-2025), starts the server
in process on a finished demo run (`LedgerQA` + `LedgerService` + the HTTP server, on a free
port), and over HTTP:
  1. the first sync (every entry of the new ledger embedded) and the first answer (cold);
  2. every non-aggregate `test` question of that ledger, `--rounds` times (warm);
  3. `--edits` saves, each appending one new transaction while 2 clients keep asking:
     latency during the sync and seconds from the save until the entry is the top evidence;
  4. syncs of 1, 10 and 100 appended entries (seconds per added entry).
Prints a table and a JSON result; exact match and "wrong answers flagged" come along.

    python -m bench.serve_latency --run demo_out [--seed 6161] [--rounds 2] [--edits 3]
        [--out bench/results/serve_latency.json]
"""
from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench import emit


def _post(url: str, question: str) -> tuple[float, dict]:
    request = urllib.request.Request(url + "/ask", data=json.dumps(
        {"question": question}).encode(), headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        body = json.loads(response.read().decode())
    return time.perf_counter() - began, body


def _entry(day: int, amount: float, payee: str) -> str:
    return (f'\n2025-12-{day:02d} * "{payee}" "bench edit"\n'
            f"  Expenses:Food:Restaurant  {amount:.2f} USD\n"
            f"  Expenses:Food:Groceries  -{amount:.2f} USD\n")


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    array = np.asarray(values)
    return {"n": len(values), "p50": float(np.median(array)),
            "p95": float(np.percentile(array, 95)), "max": float(array.max())}


def _edits(url: str, ledger: Path, count: int, question_pool: list[str]) -> dict:
    """Saves `count` edits while two clients ask; latency during syncs, time to searchable."""
    during, visible = [], []
    for number in range(count):
        payee = f"Benchmark Bakery {chr(65 + number)}"
        stop, latencies = threading.Event(), []

        def client():
            i = 0
            while not stop.is_set():
                latencies.append(_post(url, question_pool[i % len(question_pool)])[0])
                i += 1
        clients = [threading.Thread(target=client) for _ in range(2)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        latencies.clear()
        with ledger.open("a") as f:
            f.write(_entry(10 + number, 50.0 + number, payee))
        saved = time.perf_counter()
        question = f"How much did I pay {payee} on 2025-12-{10 + number:02d}?"
        while time.perf_counter() - saved < 60:
            _, body = _post(url, question)
            if body["evidence"] and payee in body["evidence"][0]["text"]:
                visible.append(time.perf_counter() - saved)
                break
        stop.set()
        for thread in clients:
            thread.join()
        during += latencies
    return {"during_sync": _stats(during), "searchable_after_s": visible}


def measure(run_dir: Path, ledger_dir: Path, rounds: int, edits: int) -> dict:
    from atlas_jax.ledger import serve
    from atlas_jax.evaluation import exact_match
    from atlas_jax.ledger.qa import LedgerQA
    from atlas_jax_tasks import ledger_query
    began = time.perf_counter()
    qa = LedgerQA.load(run_dir)
    load_s = time.perf_counter() - began
    ledger = ledger_dir / "served.beancount"
    ledger.write_text((ledger_dir / "ledger.beancount").read_text())
    service = serve.LedgerService(qa, ledger, poll_seconds=0.5)
    first_sync = service.sync()
    cold = service.warm_up()
    server = serve.make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    service.start_watching()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    questions = [json.loads(line) for line in
                 (ledger_dir / "qa_test.jsonl").read_text().splitlines()]
    questions = [q for q in questions if q["kind"] != "monthly_total"]
    warm, rows = [], []
    for round_ in range(rounds):
        for q in questions:
            seconds, body = _post(url, q["question"])
            warm.append(seconds)
            if round_ == 0:
                rows.append({"kind": q["kind"], "em": exact_match(body["answer"], q["answers"]),
                             "flagged": body["low_confidence"],
                             "wrong_type_confident": not body["low_confidence"]
                             and not ledger_query.answer_fits(body["answer_type"],
                                                              body["answer"])})
    edit = _edits(url, ledger, edits, [q["question"] for q in questions])
    per_entry = {}
    for count in (1, 10, 100):
        service.stop()                                    # syncs below are timed directly
        with ledger.open("a") as f:
            f.write("".join(_entry(1 + i % 28, 1000.0 + i, f"Bulk Payee {count} {i}")
                            for i in range(count)))
        report = service.sync()
        per_entry[count] = {"seconds": report["seconds"], "embed_s": report["embed_seconds"],
                            "parse_s": report["parse_seconds"],
                            "per_added_entry_s": report["seconds"] / report["added"]}
    server.shutdown()
    wrong = [r for r in rows if not r["em"]]
    return {"load_s": load_s, "first_sync": {k: first_sync[k] for k in (
                "entries", "added", "removed", "kept", "seconds", "embed_seconds")},
            "cold_s": cold, "warm": _stats(warm), **edit, "sync_per_entry": per_entry,
            "em": float(np.mean([r["em"] for r in rows])), "questions": len(rows),
            "wrong_flagged": float(np.mean([r["flagged"] for r in wrong] or [0])),
            "right_flagged": float(np.mean([r["flagged"] for r in rows if r["em"]] or [0])),
            "wrong_type_confident": int(sum(r["wrong_type_confident"] for r in rows))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished `atlas-jax demo` folder")
    parser.add_argument("--seed", type=int, default=6161)
    parser.add_argument("--start", default="2024-01-01")
    parser.add_argument("--end", default="2025-11-30")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--out", default="bench/results/serve_latency.json")
    args = parser.parse_args()
    from atlas_jax_tasks import ledger
    ledger_dir = Path(args.run) / f"unseen_{args.seed}"
    if not (ledger_dir / "qa_test.jsonl").is_file():
        ledger.generate(ledger_dir, seed=args.seed, start=args.start, end=args.end)
    result = {"run": args.run, "ledger": {"seed": args.seed, "start": args.start,
                                          "end": args.end},
              **measure(Path(args.run), ledger_dir, args.rounds, args.edits)}
    print("| measure | value |\n| --- | --- |")
    print(f"| model load | {result['load_s']:.1f} s |")
    print(f"| first sync ({result['first_sync']['added']} entries embedded) | "
          f"{result['first_sync']['seconds']:.1f} s |")
    print(f"| cold /ask (first answer, compiles) | {result['cold_s']:.2f} s |")
    for name in ("warm", "during_sync"):
        s = result[name]
        print(f"| {name} /ask p50 / p95 / max (n={s['n']}) | {s.get('p50', 0):.3f} / "
              f"{s.get('p95', 0):.3f} / {s.get('max', 0):.3f} s |")
    print(f"| edit searchable after | {', '.join(f'{s:.1f}' for s in result['searchable_after_s'])} s |")
    for count, s in result["sync_per_entry"].items():
        print(f"| sync of {count} added entries | {s['seconds']:.2f} s ({s['per_added_entry_s']:.3f}"
              f" s per entry; parse {s['parse_s']:.2f} s, embed {s['embed_s']:.2f} s) |")
    print(f"| EM on {result['questions']} test questions | {result['em']:.3f} |")
    print(f"| wrong answers flagged / right answers flagged | {result['wrong_flagged']:.3f} / "
          f"{result['right_flagged']:.3f} |")
    print(f"| wrong-type answers presented as confident | {result['wrong_type_confident']} |")
    emit(result, args.out)


if __name__ == "__main__":
    main()

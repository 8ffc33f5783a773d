"""`atlas-jax ledger sync`: keep a run's index in step with a Beancount ledger."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="ledger_command", required=True)
    sync = commands.add_parser(
        "sync", help="sync a demo run's index with a ledger: embed added or changed entries, "
        "drop removed ones, save it (RUN/synced/)")
    sync.add_argument("--run", dest="run_dir", required=True,
                      help="the folder `atlas-jax demo --out` wrote")
    sync.add_argument("--ledger", required=True, help="the Beancount file (includes follow)")
    sync.add_argument("--json", action="store_true", help="print the report as JSON")
    sync.set_defaults(run=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    from atlas_jax.ledger import qa as ledger_qa
    try:
        qa = ledger_qa.LedgerQA.load(args.run_dir)
        report = qa.sync(args.ledger)
    except (ValueError, OSError) as e:   # LedgerError, LedgerQAError, IndexLoadError, I/O
        print(f"atlas-jax ledger sync: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['ledger']}: {report['entries']} entries; added {report['added']}, "
          f"removed {report['removed']}, kept {report['kept']} "
          f"({report['seconds']:.2f} s, embedding {report['embed_seconds']:.2f} s)")
    if report.get("persisted"):
        print(f"index written to {report['persisted']}")
    return 0

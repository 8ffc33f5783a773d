"""`atlas-jax data list|ledger`: the SeqIO tasks, and the Beancount ledger QA generator."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from atlas_jax_tasks import ledger
    commands = parser.add_subparsers(dest="data_command", required=True)
    listing = commands.add_parser("list", help="the SeqIO tasks atlas-jax registers")
    listing.set_defaults(run=run_list)
    ledger.add_arguments(commands.add_parser(
        "ledger", help="generate a Beancount ledger, its passages and QA splits"))


def run_list(args: argparse.Namespace) -> int:
    """Prints one line per task: name, then what it reads (flag / gin macro)."""
    import atlas_jax_tasks
    descriptions = atlas_jax_tasks.describe_tasks()
    width = max(map(len, descriptions))
    for name, description in descriptions.items():
        print(f"{name:<{width}}  {description}")
    return 0

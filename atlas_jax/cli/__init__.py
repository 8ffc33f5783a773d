"""`atlas-jax` command line (docs/design.md §5).

`main` dispatches to one module per command group (`cli/train.py`, `cli/index.py`, ...; the
demo, serve, convert and plan modules).

Subcommands are imported only when they run: `index` pulls in JAX and ScaNN, `data` pulls in
TensorFlow and SeqIO, and neither should slow the other down.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module with add_arguments(parser) setting `run`, one-line help)
COMMANDS = {
    "demo": ("atlas_jax.demo", "few-shot QA over a generated Beancount ledger, end to end "
             "(report.json / report.md / plots)"),
    "ask": ("atlas_jax.cli.ask", "answer a ledger question with a trained demo run, with evidence"),
    "serve": ("atlas_jax.ledger.serve", "ledger QA over HTTP (/ask, a page, /health, /metrics) with "
              "the index kept in sync with the ledger file"),
    "ledger": ("atlas_jax.cli.ledger", "sync a demo run's index with a Beancount ledger"),
    "reader": ("atlas_jax.cli.reader", "pre-train the shipped reader (unsupervised, on "
               "generated ledgers) and export it"),
    "retriever": ("atlas_jax.cli.retriever", "pre-train the shipped ledger retriever "
                  "(unsupervised, on generated ledgers) and export it"),
    "index": ("atlas_jax.cli.index", "build, search and benchmark passage indexes"),
    "data": ("atlas_jax.cli.data", "list SeqIO tasks; generate the ledger QA task"),
    "train": ("atlas_jax.cli.train", "joint retriever-reader training (t5x-style gin flags)"),
    "eval": ("atlas_jax.cli.train", "evaluate a run's latest checkpoint on its eval split"),
    "infer": ("atlas_jax.cli.train", "predictions of a run's latest checkpoint"),
    "convert": ("atlas_jax.convert", "any checkpoint this project reads (t5x, Atlas, a "
                "training run, Hugging Face) -> Hugging Face reader / retriever folders"),
    "plan": ("atlas_jax.plan", "memory, FLOPs and sharding plan of a configuration on a "
             "simulated mesh"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="atlas-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(command)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "takes_gin_flags", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.gin_flags = extra
    return args.run(args)


def entry() -> None:
    """The `atlas-jax` console script: `main`, then exit with its code. A command that failed
    after a checkpoint read failed ends without interpreter finalisation (`os._exit`, after
    flushing): orbax's abandoned TensorStore reads finish into a closed event loop on other
    threads, and during finalisation their "Event loop is closed" tracebacks bypass the
    hooks that drop them (`checkpoints._silence_failed_read_noise`), landing after the
    one-line error. A failed command has nothing left to write."""
    code = main()
    checkpoints = sys.modules.get("atlas_jax.checkpoints")
    if code and getattr(checkpoints, "_NOISE_FILTERED", False):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

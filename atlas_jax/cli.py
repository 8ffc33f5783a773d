"""`atlas-jax` command line. Subcommands arrive with their issues (DESIGN.md §5)."""
from __future__ import annotations

import argparse
import sys

from atlas_jax import demo
from atlas_jax.index import commands as index_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    index_commands.add_arguments(commands.add_parser(
        "index", help="build, search and benchmark passage indexes"))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `atlas-jax` command line: `main` dispatches to one module per command group."""
from atlas_jax.cli.main import COMMANDS, entry, main  # noqa: F401

"""`python -m atlas_jax.cli ARGS`."""
from atlas_jax.cli.main import entry

entry()

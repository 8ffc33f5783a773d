"""`python -m atlas_jax.cli ARGS`."""
from atlas_jax.cli import entry

entry()

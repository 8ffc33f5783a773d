"""atlas-jax: retrieval-augmented language models (Atlas) in JAX/Flax."""
from atlas_jax import _moved
from atlas_jax.weights import (CheckpointError, Reader, Retriever, load_atlas, load_reader,
                               load_retriever)

__all__ = ["CheckpointError", "Reader", "Retriever", "load_atlas", "load_reader",
           "load_retriever"]
__version__ = "0.1.0"

_moved.install()  # atlas_jax.trainer & co., the module names before the move into packages

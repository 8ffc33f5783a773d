"""atlas-jax: Atlas (retrieval-augmented FiD reader + dual-encoder retriever) in JAX/Flax."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
GIN_DIRS = sorted({str(p.parent.relative_to(ROOT / "gin")) for p in (ROOT / "gin").rglob("*.gin")})

setup(
    name="atlas-jax",
    version="0.1.0",
    description="Atlas: jointly trained dense retriever and Fusion-in-Decoder T5 reader in JAX",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `tasks/` installs as `atlas_jax_tasks` (never as a bare top-level `tasks` module), and the
    # gin folder ships inside the package as `atlas_jax.gin` (a data-only namespace package).
    packages=["atlas_jax", "atlas_jax.models", "atlas_jax.index", "atlas_jax.formats",
              "atlas_jax.train", "atlas_jax.cli", "atlas_jax.demo", "atlas_jax.ledger",
              "atlas_jax.fava",
              "atlas_jax_tasks",
              "atlas_jax.gin"],
    package_dir={"atlas_jax": "atlas_jax", "atlas_jax_tasks": "tasks", "atlas_jax.gin": "gin"},
    package_data={"atlas_jax.gin": [f"{d}/*.gin" if d != "." else "*.gin" for d in GIN_DIRS],
                  # the pre-trained reader and retriever shipped with the package
                  # (`make reader`, `make retriever`)
                  "atlas_jax": ["readers/*/*", "retrievers/*/*", "retrievers/*/*/*"],
                  "atlas_jax.fava": ["templates/*.html"]},
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "seqio",
        "scann",
        # With TF 2.21, `import scann` fails (NotFoundError ... _scann_ops.so: undefined symbol).
        "tensorflow<2.21",
        "tensorflow-datasets",
        # tensorflow-datasets builders need it on Python 3.11.
        "importlib_resources",
        "gin-config",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tqdm",
        # Hybrid retrieval: a real BM25 implementation (sparse scores, numpy only).
        "bm25s",
    ],
    extras_require={
        # the ledger task, the demo's plots, and the Fava "Ask" page (atlas_jax.fava)
        "ledger": ["beancount", "beanquery", "python-dateutil", "matplotlib", "fava"],
        # torch pinned to the CPU wheel on this machine's disk: an unpinned torch pulls a
        # multi-GB CUDA build. transformers is the parity reference for the models.
        "dev": ["pytest", "torch==2.13.0", "transformers", "faiss-cpu"],
    },
    entry_points={"console_scripts": ["atlas-jax=atlas_jax.cli:entry"]},
)

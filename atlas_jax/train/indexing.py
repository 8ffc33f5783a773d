"""The passage index during training: build (embed the corpus with the current passage tower),
save / load by step under MODEL_DIR/index, prune the steps no checkpoint needs
(docs/design.md §2, §3). The loop points its batcher at the index it uses
(`RetrievalBatcher.use_index`)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from atlas_jax import distributed, fileio
from atlas_jax.index import passage_index as passage_index_lib


def _round_to_saved(embeddings: np.ndarray, dtype: str) -> np.ndarray:
    """The values an index saved as `dtype` loads back as (so a resumed run searches the
    same numbers the uninterrupted one did)."""
    if dtype == "float16":
        return embeddings.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return np.asarray(jnp.asarray(embeddings).astype(jnp.bfloat16).astype(jnp.float32))
    return embeddings


def build_index(run: Any, params: dict, step: int, previous: Any = None
                ) -> passage_index_lib.PassageIndex:
    """An index over `run`'s corpus embedded with the passage tower of `params` (the tokens of
    `previous` reused)."""
    from atlas_jax.index import embedding
    state = run.state
    tokens = (previous.tokens if previous is not None and previous.tokens is not None
              else passage_index_lib.tokenize_store(run.store, state.retriever))
    embedded = embedding.embed_corpus(state.retriever, tokens.token_ids, tokens.lengths,
                                      mesh=state.mesh, params=state.passage_params(params),
                                      progress=False).embeddings
    # One backend per refresh, built from the rows rounded as they will be saved.
    return passage_index_lib.PassageIndex.from_embeddings(
        run.store, _round_to_saved(np.asarray(embedded, np.float32),
                                   run.index_config.save_dtype),
        run.index_config.backend, state.mesh, retriever_step=step, tokens=tokens)


def index_path(run: Any, step: int) -> Path:
    return run.config.run_dir / "index" / f"step_{step:08d}"


def save_index(run: Any, index: Any, step: int) -> None:
    """Process 0 writes the index (every process holds the same one); the others wait."""
    if distributed.is_primary():
        index.save(index_path(run, step), dtype=run.index_config.save_dtype, include_bm25=False)
    distributed.barrier(f"index step {step}")


def load_index(run: Any, step: int) -> passage_index_lib.PassageIndex:
    return passage_index_lib.PassageIndex.load(index_path(run, step), mesh=run.state.mesh,
                                               backend=run.index_config.backend)


def prune_indexes(run: Any, keep_steps: set[int]) -> None:
    """Removes the saved indexes of steps not in `keep_steps` (and cut-short saves)."""
    folder = run.config.run_dir / "index"
    if not distributed.is_primary():
        return
    fileio.remove_staging_leftovers(folder)     # index saves cut short by a kill
    for path in folder.glob("step_*") if folder.is_dir() else []:
        if path.is_dir() and int(path.name[5:]) not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)

"""A reader that can read, for the synthetic task: the stand-in for Atlas's pretrained T5.

Atlas starts from a language model that already copies answers out of its context; only the
retriever starts cold. A tiny T5 trained from scratch inside a two-minute run instead
memorises the few hundred training answers long before it learns to read them out of the
passages it is given (measured: train loss 0.03, dev EM 0, retrieval recall flat), and a
reader that does not read gives the retriever no signal. `build_warm_reader` therefore first
teaches the gin-configured reader to read on questions about the corpus's *distractor*
passages (never asked in `qa_train` / `qa_dev`, so no answer leaks): the asked passage (alone
by default, or among `n_passages - 1` random others), teacher-forced NLL, Adam. Measured: dev
copy accuracy 0.9 from the gold passage alone, 0.0 when it sits among 4 others (the warm
reader reads but cannot select; fresh random facts every step did not train in 1000 steps
either). The parameters are cached next to the data (`warm_reader_*.npz`, read with
`allow_pickle=False`), so relaunching a run does not repeat the warm-up.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import zipfile
from pathlib import Path

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import fileio
from atlas_jax.index.passages import reader_text
from atlas_jax_tasks.synthetic import QUESTION_TEMPLATES, SPIECE_FILE, read_synthetic
from atlas_jax_tasks.vocab import reader_vocabulary

EOS_ID, SENTINEL_TEXT = 1, "<extra_id_0>"


def reading_examples(synthetic_dir: str | Path, vocabulary, n_passages: int, length: int,
                     target_length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (N, n_passages, length), targets (N, target_length)) int32 over the distractor
    passages: one question per distractor, its passage among n_passages - 1 random others."""
    passages, _ = read_synthetic(synthetic_dir)
    rng = random.Random(seed)
    encoded = [vocabulary.encode(reader_text(p["title"], p["text"])) for p in passages]
    inputs, targets = [], []
    for row, passage in enumerate(passages):
        meta = passage["metadata"]
        if meta["kind"] != "distractor":
            continue
        value = passage["text"].rstrip(".").split(" ")[-2:]
        question = rng.choice(QUESTION_TEMPLATES).format(attribute=meta["attribute"],
                                                         entity=meta["entity"])
        prompt = vocabulary.encode(f"question: {question} answer: {SENTINEL_TEXT}")
        chosen = rng.sample([r for r in range(len(passages)) if r != row], n_passages - 1)
        chosen.append(row)
        rng.shuffle(chosen)
        example = np.zeros((n_passages, length), np.int32)
        for k, r in enumerate(chosen):
            tokens = (prompt + encoded[r])[:length - 1] + [EOS_ID]
            example[k, :len(tokens)] = tokens
        target = (vocabulary.encode(f"{SENTINEL_TEXT} {' '.join(value)}")[:target_length - 1]
                  + [EOS_ID])
        inputs.append(example)
        targets.append(np.pad(target, (0, target_length - len(target))))
    return np.stack(inputs), np.stack(targets).astype(np.int32)


def _flatten(params) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


def _unflatten(arrays) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                              for k, v in arrays.items()})


@gin.configurable
def build_warm_reader(synthetic_dir: str = gin.REQUIRED, steps: int = 1000, batch_size: int = 16,
                      n_passages: int = 5, learning_rate: float = 2e-3, seed: int = 0,
                      length: int = 40, target_length: int = 8):
    """The gin-configured reader (`weights.build_reader()`), then `steps` of reading
    comprehension on the distractor questions (cached in `synthetic_dir`).

    Returns:
      a `weights.Reader` (parameters after the warm-up).
    """
    from atlas_jax import weights
    from atlas_jax.models import fid
    reader = weights.build_reader(seed=seed)
    cache = Path(synthetic_dir) / (f"warm_reader_s{steps}_b{batch_size}_k{n_passages}_"
                                   f"lr{learning_rate}_seed{seed}_l{length}.npz")
    shapes = {k: v.shape for k, v in _flatten(reader.params).items()}
    fileio.remove_partial_files(cache.parent)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as saved:
                arrays = {k: saved[k] for k in saved.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            # Our own derived file, unreadable (e.g. written by an older version without
            # atomic writes and cut by a kill): rebuilt rather than failing every relaunch.
            logging.warning("%s: unreadable warm-reader cache (%s); rebuilding it", cache, e)
            arrays = {}
        if {k: v.shape for k, v in arrays.items()} == shapes:
            return dataclasses.replace(reader, params=_unflatten(arrays))
    vocabulary = reader_vocabulary(str(Path(synthetic_dir) / SPIECE_FILE))
    inputs, targets = reading_examples(synthetic_dir, vocabulary, n_passages, length,
                                       target_length, seed)
    model = fid.FusionInDecoder(dataclasses.replace(reader.config, dropout_rate=0.0))
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, state, passage_ids, target_ids):
        def loss_fn(p):
            decoder_input = jnp.concatenate(
                [jnp.zeros_like(target_ids[:, :1]), target_ids[:, :-1]], axis=1)
            logits = model.apply({"params": p}, passage_ids, decoder_input)
            mask = (target_ids != 0).astype(jnp.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, target_ids)
            return (nll * mask).sum() / mask.sum()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state = reader.params, optimizer.init(reader.params)
    order = np.random.default_rng(seed)
    for _ in range(steps):
        rows = order.choice(len(inputs), batch_size, replace=False)
        params, state, _ = step(params, state, inputs[rows], targets[rows])
    fileio.atomic_savez(cache, **_flatten(params))
    return dataclasses.replace(reader, params=params)

"""A reader that can read, for the synthetic task: the stand-in for Atlas's pretrained T5.

Atlas starts from a language model that already copies answers out of its context and picks
the passage that holds them; only the retriever starts cold. A tiny T5 trained from scratch
inside a two-minute run instead memorises the few hundred training answers long before it
learns to read them out of the passages it is given, and a reader that does not read gives
the retriever no signal. `build_warm_reader` therefore first teaches the gin-configured reader
to read and to select, on its own data (`Worlds`): questions about the corpus's *distractor*
cells (never asked in `qa_train` / `qa_dev`), whose passage states a fresh random value (so
no answer can be memorised, and none leaks), among other passages with other random values.
A curriculum (`curriculum`) goes from the passage alone (copying) to one "easy" other
(another entity and attribute) to up to `n_passages - 1` others sharing the entity or the
attribute. Measured (docs/reader.md): with a copy head (`t5.T5Config.copy_head`) the tiny
reader learns each stage in a few hundred steps; without it, it never selects. The parameters
are cached (`warm_reader_*.npz`, read with `allow_pickle=False`, in `cache_dir` or the data
folder), so relaunching a run does not repeat the warm-up.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import zipfile
from pathlib import Path
from typing import Any

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import fileio
from atlas_jax.index.passages import reader_text
from atlas_jax_tasks.synthetic import (PASSAGE_TEMPLATES, PASSAGES_FILE, QUESTION_TEMPLATES,
                                       SPIECE_FILE, VALUE_ADJECTIVES, VALUE_NOUNS,
                                       read_synthetic)
from atlas_jax_tasks.vocab import reader_vocabulary

EOS_ID, SENTINEL_TEXT = 1, "<extra_id_0>"
ALL_VALUES = tuple(f"{a} {n}" for a in VALUE_ADJECTIVES for n in VALUE_NOUNS)


@dataclasses.dataclass(frozen=True)
class Worlds:
    """Fresh reading examples over the corpus's names: a question about an (entity, attribute)
    cell no `qa_*` question asks (a distractor cell), its passage stating a value drawn at
    random (never the corpus's), among others stating other random values. `easy` others
    differ from the asked cell in both entity and attribute; hard others share one of them,
    so only the entity *and* the attribute together pick the passage."""
    asked: tuple[tuple[str, str], ...]
    entities: tuple[str, ...]
    attributes: tuple[str, ...]
    vocabulary: Any
    length: int
    target_length: int

    @classmethod
    def from_folder(cls, synthetic_dir: str | Path, vocabulary, length: int,
                    target_length: int) -> "Worlds":
        passages, _ = read_synthetic(synthetic_dir)
        meta = [p["metadata"] for p in passages]
        return cls(tuple((m["entity"], m["attribute"]) for m in meta
                         if m["kind"] == "distractor"),
                   tuple(sorted({m["entity"] for m in meta})),
                   tuple(sorted({m["attribute"] for m in meta})), vocabulary, length,
                   target_length)

    def _others(self, rng: random.Random, cell: tuple[str, str], count: int, hard: bool):
        entity, attribute = cell
        if hard:
            pool = ([(entity, a) for a in self.attributes if a != attribute]
                    + [(e, attribute) for e in self.entities if e != entity])
            return rng.sample(pool, count)
        return [(rng.choice([e for e in self.entities if e != entity]),
                 rng.choice([a for a in self.attributes if a != attribute]))
                for _ in range(count)]

    def example(self, rng: random.Random, n_others: int, hard: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (1 + n_others, length), targets (target_length,)) int32."""
        cell = rng.choice(self.asked)
        values = rng.sample(ALL_VALUES, 1 + n_others)
        docs = list(zip([cell] + self._others(rng, cell, n_others, hard), values))
        rng.shuffle(docs)
        question = rng.choice(QUESTION_TEMPLATES).format(attribute=cell[1], entity=cell[0])
        prompt = self.vocabulary.encode(f"question: {question} answer: {SENTINEL_TEXT}")
        inputs = np.zeros((len(docs), self.length), np.int32)
        for k, ((entity, attribute), value) in enumerate(docs):
            text = rng.choice(PASSAGE_TEMPLATES).format(attribute=attribute, entity=entity,
                                                         value=value)
            tokens = (prompt + self.vocabulary.encode(reader_text(entity, text))
                      )[:self.length - 1] + [EOS_ID]
            inputs[k, :len(tokens)] = tokens
        target = (self.vocabulary.encode(f"{SENTINEL_TEXT} {values[0]}")
                  [:self.target_length - 1] + [EOS_ID])
        return inputs, np.pad(target, (0, self.target_length - len(target))).astype(np.int32)

    def batch(self, rng: random.Random, size: int, n_others: int, hard: bool):
        inputs, targets = zip(*(self.example(rng, n_others, hard) for _ in range(size)))
        return np.stack(inputs), np.stack(targets)


def curriculum(step: int, rng: random.Random, n_passages: int, alone_steps: int,
               easy_steps: int) -> tuple[int, bool]:
    """(other passages, hard) of warm-up step `step`: the passage alone first (copying), then
    one easy other (picking by entity or attribute), then 1 .. n_passages - 1 others, hard
    for half of the batches (picking by both)."""
    if step < alone_steps or n_passages == 1:
        return 0, False
    if step < alone_steps + easy_steps:
        return 1, False
    return rng.randint(1, n_passages - 1), rng.random() < 0.5


def _flatten(params) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


def _unflatten(arrays) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                              for k, v in arrays.items()})


def _folder_key(synthetic_dir: str | Path) -> str:
    """A short hash of the folder's corpus and vocabulary (the cache may be shared)."""
    digest = hashlib.sha256()
    for name in (PASSAGES_FILE, SPIECE_FILE):
        digest.update((Path(synthetic_dir) / name).read_bytes())
    return digest.hexdigest()[:12]


def _teacher_forced(model):
    from atlas_jax.models import t5

    def logits(params, passage_ids, target_ids):
        return model.apply({"params": params}, passage_ids, t5.shift_right(target_ids))
    return logits


def selection_accuracy(reader, worlds: Worlds, n_others: int, hard: bool, count: int = 256,
                       seed: int = 12345) -> float:
    """Share of `count` fresh held-out examples whose every target token is the reader's
    teacher-forced argmax."""
    from atlas_jax.models import fid
    logits = _teacher_forced(fid.FusionInDecoder(reader.config))
    inputs, targets = worlds.batch(random.Random(seed), count, n_others, hard)
    predicted = np.asarray(jax.jit(logits)(reader.params, inputs, targets)).argmax(-1)
    return float(np.mean(np.all((predicted == targets) | (targets == 0), axis=-1)))


def _load_cached(cache: Path, shapes: dict) -> dict | None:
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as saved:
            arrays = {k: saved[k] for k in saved.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # Our own derived file, unreadable (e.g. written by an older version without
        # atomic writes and cut by a kill): rebuilt rather than failing every relaunch.
        logging.warning("%s: unreadable warm-reader cache (%s); rebuilding it", cache, e)
        return None
    return _unflatten(arrays) if {k: v.shape for k, v in arrays.items()} == shapes else None


@gin.configurable
def build_warm_reader(synthetic_dir: str = gin.REQUIRED, steps: int = 1000, batch_size: int = 16,
                      n_passages: int = 5, learning_rate: float = 2e-3, seed: int = 0,
                      length: int = 40, target_length: int = 8, alone_steps: int = 300,
                      easy_steps: int = 300, cache_dir: str | None = None):
    """The gin-configured reader (`weights.build_reader()`), then `steps` of reading on fresh
    `Worlds` examples along `curriculum`, cached as `warm_reader_*.npz` in `cache_dir`
    (default: `synthetic_dir`; the name carries the folder's hash and every argument).

    Returns:
      a `weights.Reader` (parameters after the warm-up).
    """
    from atlas_jax import weights
    from atlas_jax.models import fid, stacking
    reader = weights.build_reader(seed=seed)
    shape = reader.config
    cache = Path(cache_dir or synthetic_dir) / (
        f"warm_reader_{_folder_key(synthetic_dir)}_{shape.num_encoder_layers}x"
        f"{shape.emb_dim}{'_copy' if shape.copy_head else ''}_s{steps}_b{batch_size}_"
        f"k{n_passages}_a{alone_steps}_e{easy_steps}_lr{learning_rate}_seed{seed}_l{length}.npz")
    cache.parent.mkdir(parents=True, exist_ok=True)
    fileio.remove_partial_files(cache.parent)
    # Cached per layer: the same file serves a scanned reader (models/stacking.py).
    scanned = reader.config.scan_layers
    params = _load_cached(cache, {k: v.shape for k, v in _flatten(
        stacking.unstack_layers(reader.params)).items()})
    if params is not None:
        return dataclasses.replace(reader, params=stacking.to_layout(params, scanned))
    worlds = Worlds.from_folder(synthetic_dir,
                                reader_vocabulary(str(Path(synthetic_dir) / SPIECE_FILE)),
                                length, target_length)
    logits = _teacher_forced(fid.FusionInDecoder(
        dataclasses.replace(reader.config, dropout_rate=0.0)))
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, state, passage_ids, target_ids):
        def loss_fn(p):
            mask = (target_ids != 0).astype(jnp.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(
                logits(p, passage_ids, target_ids), target_ids)
            return (nll * mask).sum() / mask.sum()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state = reader.params, optimizer.init(reader.params)
    rng = random.Random(seed)
    for i in range(steps):
        n_others, hard = curriculum(i, rng, n_passages, alone_steps, easy_steps)
        params, state, _ = step(params, state, *worlds.batch(rng, batch_size, n_others, hard))
    fileio.atomic_savez(cache, **_flatten(stacking.unstack_layers(params)))
    return dataclasses.replace(reader, params=params)

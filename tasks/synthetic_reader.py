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
import random
import zipfile
from pathlib import Path

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax.index.passages import reader_text
from atlas_jax_tasks.synthetic import (PASSAGE_TEMPLATES, QUESTION_TEMPLATES, SPIECE_FILE,
                                       VALUE_ADJECTIVES, VALUE_NOUNS, read_synthetic)
from atlas_jax_tasks.vocab import reader_vocabulary

EOS_ID, SENTINEL_TEXT = 1, "<extra_id_0>"


class ReadingData:
    """Reading-comprehension batches over the corpus's *distractor* cells (the (entity,
    attribute) pairs no train or dev question asks about), with a fresh random value per
    passage at every draw: the answer is only ever in the passage, so the reader cannot
    memorise it and must find the passage whose entity and attribute match the question.
    The other passages of an example are hard: the same entity with other attributes, and
    other entities with the same attribute (also fresh values)."""

    def __init__(self, synthetic_dir: str | Path, vocabulary, length: int, target_length: int):
        passages, _ = read_synthetic(synthetic_dir)
        self.cells = [(p["metadata"]["entity"], p["metadata"]["attribute"]) for p in passages
                      if p["metadata"]["kind"] == "distractor"]
        self.entities = sorted({p["metadata"]["entity"] for p in passages})
        self.attributes = sorted({p["metadata"]["attribute"] for p in passages})
        self.values = [f"{a} {n}" for a in VALUE_ADJECTIVES for n in VALUE_NOUNS]
        self.vocabulary, self.length, self.target_length = vocabulary, length, target_length

    def _passage(self, rng: random.Random, entity: str, attribute: str, value: str):
        text = rng.choice(PASSAGE_TEMPLATES).format(attribute=attribute, entity=entity,
                                                    value=value)
        return self.vocabulary.encode(reader_text(entity, text))

    def example(self, rng: random.Random, n_passages: int, distractors: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
        """(inputs (n_passages, length), target (target_length,), gold position); rows past
        1 + distractors are all padding."""
        entity, attribute = rng.choice(self.cells)
        values = rng.sample(self.values, distractors + 1)
        others = []
        for i in range(distractors):
            if i % 2 == 0:
                other = (entity, rng.choice([a for a in self.attributes if a != attribute]))
            else:
                other = (rng.choice([e for e in self.entities if e != entity]), attribute)
            others.append(other)
        position = rng.randrange(distractors + 1)
        cells = others[:position] + [(entity, attribute)] + others[position:]
        values = values[1:position + 1] + [values[0]] + values[position + 1:]
        question = rng.choice(QUESTION_TEMPLATES).format(attribute=attribute, entity=entity)
        prompt = self.vocabulary.encode(f"question: {question} answer: {SENTINEL_TEXT}")
        inputs = np.zeros((n_passages, self.length), np.int32)
        for k, ((e, a), v) in enumerate(zip(cells, values)):
            tokens = (prompt + self._passage(rng, e, a, v))[:self.length - 1] + [EOS_ID]
            inputs[k, :len(tokens)] = tokens
        target = (self.vocabulary.encode(f"{SENTINEL_TEXT} {values[position]}")
                  [:self.target_length - 1] + [EOS_ID])
        return inputs, np.pad(target, (0, self.target_length - len(target))), position

    def batch(self, rng: random.Random, batch_size: int, n_passages: int, distractors: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """A batch; each example has up to `distractors` others (uniform from 0: the
        passage alone stays part of the mix)."""
        rows = [self.example(rng, n_passages, rng.randint(0, distractors))
                for _ in range(batch_size)]
        return (np.stack([r[0] for r in rows]),
                np.stack([r[1] for r in rows]).astype(np.int32))


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
    comprehension (`ReadingData`: the asked passage among up to `n_passages - 1` hard
    others, fresh values every draw), cached in `synthetic_dir`.

    Returns:
      a `weights.Reader` (parameters after the warm-up).
    """
    from atlas_jax import weights
    reader = weights.build_reader(seed=seed)
    cache = Path(synthetic_dir) / (f"warm_reader_v2_s{steps}_b{batch_size}_k{n_passages}_"
                                   f"lr{learning_rate}_seed{seed}_l{length}.npz")
    shapes = {k: v.shape for k, v in _flatten(reader.params).items()}
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as saved:
                arrays = {k: saved[k] for k in saved.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            arrays = {}   # a half-written cache (the run was killed): warm up again
        if {k: v.shape for k, v in arrays.items()} == shapes:
            return dataclasses.replace(reader, params=_unflatten(arrays))
    vocabulary = reader_vocabulary(str(Path(synthetic_dir) / SPIECE_FILE))
    data = ReadingData(synthetic_dir, vocabulary, length, target_length)
    step = _train_step(reader.config, learning_rate)
    optimizer_state = optax.adam(learning_rate).init(reader.params)
    params, rng = reader.params, random.Random(seed)
    for _ in range(steps):
        inputs, targets = data.batch(rng, batch_size, n_passages, n_passages - 1)
        params, optimizer_state, _ = step(params, optimizer_state, inputs, targets)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".partial.npz")
    np.savez(partial, **_flatten(params))
    partial.replace(cache)   # atomic: a killed run leaves no half cache behind
    return dataclasses.replace(reader, params=params)


def _train_step(config, learning_rate: float):
    from atlas_jax.models import fid
    model = fid.FusionInDecoder(dataclasses.replace(config, dropout_rate=0.0))
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
    return step


def selection_accuracy(reader, synthetic_dir: str | Path, n_passages: int = 5,
                       examples: int = 128, seed: int = 1, length: int = 40,
                       target_length: int = 8) -> float:
    """Exact-match rate of the warm reader's greedy answer on fresh reading examples with
    all `n_passages - 1` hard others (never a train or dev question)."""
    vocabulary = reader_vocabulary(str(Path(synthetic_dir) / SPIECE_FILE))
    data = ReadingData(synthetic_dir, vocabulary, length, target_length)
    inputs, targets = zip(*[data.example(random.Random(seed * 100003 + i), n_passages,
                                         n_passages - 1)[:2] for i in range(examples)])
    tokens = reader.generate(np.stack(inputs), max_length=target_length)
    hits = [np.array_equal(_until_eos(row), _until_eos(target))
            for row, target in zip(tokens, targets)]
    return float(np.mean(hits))


def _until_eos(tokens) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(EOS_ID)] if EOS_ID in tokens else tokens

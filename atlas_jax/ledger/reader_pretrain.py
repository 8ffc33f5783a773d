"""Reader pre-training: the T5 reader (and its SentencePiece vocabulary) the package ships.

    atlas-jax reader pretrain --gin_file=runs/reader_pretrain.gin --gin.MODEL_DIR="'/tmp/r'"
    atlas-jax reader export --run /tmp/r --out atlas_jax/readers/ledger_t5
    make reader                                   # both, into the package

Atlas starts from a pre-trained T5 that already reads; none can be downloaded here, so this
module makes one, with unsupervised objectives only, over Beancount ledgers generated with
seeds and years no evaluation uses (`atlas_jax_tasks.reader_corpus`): multi-passage reading
of entry fields among hard distractors, salient-span masking, T5 span corruption and prefix
LM (`atlas_jax_tasks.reader_batches`). Batches are a function of (seed, step); parameters and
AdamW state are orbax checkpoints under MODEL_DIR/checkpoints, so a relaunch resumes exactly.
MODEL_DIR/metrics.jsonl has the losses and, every `eval_every` steps, the copy accuracy per
field on a held-out ledger (the source entry among `n_passages - 1` distractors).
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import fileio

OUTPUT_KIND = "reader-pretrain-run"   # the kind in MODEL_DIR's .atlas-jax.json marker


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ReaderPretrainConfig:
    """One pre-training run (gin/runs/reader_pretrain.gin). The model is `t5.T5Config`."""
    model_dir: str = gin.REQUIRED
    train_steps: int = 4000
    seed: int = 0
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    end_learning_rate_fraction: float = 0.1   # cosine decay to this fraction at train_steps
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    lm_weight: float = 0.5                    # span / prefix-LM loss weight
    spm_vocab_size: int = 2000                # pieces before the 100 sentinels
    split_digits: bool = True                 # numbers and years copied digit by digit
    number_pieces: bool = False               # two-digit and cents groups as pieces
    batch_size: int = 24
    n_passages: int = 4
    input_length: int = 160
    target_length: int = 32
    lm_batch_size: int = 16
    lm_input_length: int = 96
    lm_target_length: int = 48
    read_fraction: float = 0.7
    span_fraction: float = 0.5
    copy_fraction: float = 0.0                # lm rows that are cued copies (reader_batches)
    alone_steps: int = 0                      # curriculum (reader_batches.BatchSizes)
    ramp_steps: int = 0
    full_fraction: float = 1.0
    easy_steps: int = 0                       # easy distractors (reader_batches.BatchSizes)
    easy_fraction: float = 0.0
    # A reader folder (or `package:NAME`) whose weights and spiece.model start this run,
    # with a fresh AdamW state and schedule: a further stage of pre-training
    # (runs/reader_read.gin continues the stage-1 reader of runs/reader_pretrain.gin).
    init_from: str | None = None
    max_question_tokens: int = 72             # longer masked entries are left out
    checkpoint_every: int = 250
    max_to_keep: int = 2
    log_every: int = 25
    eval_every: int = 1000
    eval_per_field: int = 64
    # (seed, start, end, birth) of the training ledgers and the held-out one; None: the
    # defaults of atlas_jax_tasks.reader_corpus (PRETRAIN_LEDGERS, HELDOUT_LEDGER).
    ledgers: tuple | None = None
    heldout_ledger: tuple | None = None
    # Each training ledger also appears this many times re-dated (`reader_corpus.redate`:
    # years shifted by multiples of 4 into 1904-2096, never a year ending in 19-25). With
    # the ledgers' own 2008-2018 only, the reader took an unseen year's piece for an
    # amount's (`How much ... on 2023-06-28?` -> `23.79 USD` for 118.79; docs/reader.md).
    redate_copies: int = 0
    # The copy head copies from the evidence only, never from the question that every
    # passage row repeats (`t5.T5Config.copy_skip_through_id` = the prompt's sentinel).
    copy_from_evidence: bool = False
    # The held-out ledger is also evaluated re-dated by this many years (0: not): 104 puts
    # 2017-2018 in 2121-2122, years whose pieces no training date has.
    heldout_redate_years: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.model_dir)

    def sizes(self):
        from atlas_jax_tasks.reader_batches import BatchSizes
        return BatchSizes(self.batch_size, self.n_passages, self.input_length,
                          self.target_length, self.lm_batch_size, self.lm_input_length,
                          self.lm_target_length, self.read_fraction, self.span_fraction,
                          self.copy_fraction, self.alone_steps, self.ramp_steps,
                          self.full_fraction, self.easy_steps, self.easy_fraction)


# ----------------------------------------------------------------------------- data

def prepare_corpus(config: ReaderPretrainConfig):
    """Ledgers, vocabulary and tokenized corpora (training, held-out) under MODEL_DIR/corpus.

    Returns:
      (vocabulary, training TokenizedCorpus, held-out TokenizedCorpus, corpus summary dict)
    """
    from atlas_jax_tasks import reader_batches, reader_corpus, vocab
    folder = config.run_dir / "corpus"
    specs = tuple(config.ledgers or reader_corpus.PRETRAIN_LEDGERS)
    heldout_spec = tuple(config.heldout_ledger or reader_corpus.HELDOUT_LEDGER)
    ledgers = reader_corpus.generate_ledgers(folder, specs)
    heldout = reader_corpus.generate_ledgers(folder, (heldout_spec,))
    records = [reader_corpus.read_passages(path) for _, path in ledgers]
    shifts = []
    if config.redate_copies:
        rng = random.Random(config.seed)
        for spec, ledger_records in zip(specs, list(records)):
            for years in reader_corpus.redate_offsets(spec[1], spec[2], config.redate_copies,
                                                      rng):
                records.append(reader_corpus.redate(ledger_records, years))
                shifts.append({"seed": spec[0], "years": years})
    spm = folder / "spiece.model"
    if config.init_from:
        _copy_init_vocabulary(config.init_from, spm)
    if not spm.is_file():
        # The entries, plus one round of probe texts (the date and amount surface forms).
        rng = random.Random(config.seed)
        texts = [f"{r['title']} {r['text']}" for rs in records for r in rs]
        texts += [e.question for rs in records
                  for e in reader_corpus.reading_examples(rs, rng, "read")]
        tmp = folder / "spiece.tmp.model"
        vocab.train_reader_spiece(texts, tmp, vocab_size=config.spm_vocab_size,
                                  split_digits=config.split_digits,
                                  number_pieces=config.number_pieces)
        tmp.replace(spm)
    vocabulary = vocab.reader_vocabulary(str(spm))
    train = reader_batches.TokenizedCorpus.build(records, vocabulary, config.seed,
                                                 config.max_question_tokens)
    held_records = reader_corpus.read_passages(heldout[0][1])
    held = reader_batches.TokenizedCorpus.build(
        [held_records], vocabulary, config.seed + 1, config.max_question_tokens)
    if config.heldout_redate_years:
        held.redated = reader_batches.TokenizedCorpus.build(
            [reader_corpus.redate(held_records, config.heldout_redate_years)], vocabulary,
            config.seed + 1, config.max_question_tokens)
    summary = {"ledgers": [{"seed": s, "start": a, "end": b, "passages": len(r)} for
                           (s, a, b, _), r in zip(specs, records)],
               "redated": shifts, "heldout_redate_years": config.heldout_redate_years,
               "heldout_ledger": dict(zip(("seed", "start", "end"), heldout_spec[:3])),
               "examples": {k: len(p) for k, p in train.pools.items()},
               "spm_pieces": vocabulary.vocab_size}
    return vocabulary, train, held, summary


def _copy_init_vocabulary(init_from: str, spm: Path) -> None:
    """The `init_from` reader's spiece.model as the run's (its weights index it)."""
    from atlas_jax import weights
    source = weights.resolve_path(init_from) / "spiece.model"
    if not source.is_file():
        raise ValueError(f"{source}: init_from={init_from!r} has no spiece.model")
    data = source.read_bytes()
    if spm.is_file():
        if spm.read_bytes() != data:
            raise ValueError(f"{spm}: differs from {source} (the run began from another "
                             "reader; use a new MODEL_DIR)")
        return
    spm.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_bytes(spm, data)


def initial_params(model, config: "ReaderPretrainConfig"):
    """Random parameters of `model`, or the `init_from` reader's (same tree and shapes)."""
    params = init_params(model, config.seed)
    if not config.init_from:
        return params
    from atlas_jax import weights
    loaded = weights.load_reader(config.init_from).params
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    theirs = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    for path, leaf in flat.items():
        other = theirs.get(path)
        if other is None or np.shape(other) != np.shape(leaf):
            raise ValueError(f"init_from={config.init_from!r}: parameter "
                             f"{jax.tree_util.keystr(path)} is "
                             f"{None if other is None else np.shape(other)}, the model "
                             f"needs {np.shape(leaf)}")
    if set(theirs) != set(flat):
        extra = sorted(jax.tree_util.keystr(p) for p in set(theirs) - set(flat))
        raise ValueError(f"init_from={config.init_from!r}: parameters the model does not "
                         f"have: {extra[:3]}")
    return jax.tree.map(lambda _, x: jnp.asarray(x, jnp.float32), params, loaded)


def padded_vocab_size(vocabulary) -> int:
    return -(-vocabulary.vocab_size // 128) * 128


# ----------------------------------------------------------------------------- model

def make_model(vocabulary, copy_from_evidence: bool = False):
    """The gin T5Config at the vocabulary's padded size; `copy_from_evidence`: the copy
    head skips each row's prompt through its `<extra_id_0>` (`fid.copy_source_ids`)."""
    from atlas_jax.models import fid, t5
    from atlas_jax_tasks.reader_corpus import SENTINEL
    config = dataclasses.replace(t5.T5Config(), vocab_size=padded_vocab_size(vocabulary),
                                 dropout_rate=0.0)
    if copy_from_evidence:
        config = dataclasses.replace(
            config, copy_skip_through_id=int(vocabulary.encode(SENTINEL)[-1]))
    return config, fid.FusionInDecoder(config)


def init_params(model, seed: int):
    from atlas_jax.models import stacking
    return stacking.init_params(type(model), model.config, jax.random.key(seed),
                                jnp.ones((1, 1, 4), jnp.int32), jnp.ones((1, 2), jnp.int32))


def make_optimizer(config: ReaderPretrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.train_steps,
                                                            config.warmup_steps + 1),
        config.learning_rate * config.end_learning_rate_fraction)
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, x: x.ndim > 1 and "embedding" not in jax.tree_util.keystr(path), p)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(schedule, weight_decay=config.weight_decay,
                                   mask=decay_mask))


def _nll(model, params, inputs, targets):
    decoder_input = jnp.concatenate([jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    logits = model.apply({"params": params}, inputs, decoder_input)
    mask = (targets != 0).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_train_step(model, optimizer, lm_weight: float):
    def step(params, opt_state, batch):
        def loss_fn(p):
            reading = _nll(model, p, batch["inputs"], batch["targets"])
            lm = _nll(model, p, batch["lm_inputs"], batch["lm_targets"])
            return reading + lm_weight * lm, (reading, lm)
        (loss, (reading, lm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": loss, "reading_loss": reading, "lm_loss": lm,
                   "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics
    return jax.jit(step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- evaluation

def copy_accuracy(reader, corpus, vocabulary, config: ReaderPretrainConfig,
                  with_distractors: bool = True, seed: int = 0,
                  known: dict[str, set[str]] | None = None) -> dict[str, float]:
    """Exact-match rate of the greedy answer per field on `corpus`' examples (at most
    `eval_per_field` per field), the source among `n_passages - 1` distractors (or alone,
    in a batch of one passage).

    With `known` (`known_answers` of the training corpus), also `KIND/FIELD:novel`: the rate
    on the examples whose answer never is a training answer of that field. A reader that
    answers the commonest amounts scores on constants (rent, fees) but not there."""
    from atlas_jax import evaluation
    rng = random.Random(seed)
    chosen: list[tuple[str, Any, int]] = []
    for kind, pool in corpus.pools.items():
        by_field: dict[str, list[int]] = {}
        for i, field in enumerate(pool.fields):
            by_field.setdefault(field, []).append(i)
        for field, rows in sorted(by_field.items()):
            for i in rng.sample(rows, min(config.eval_per_field, len(rows))):
                chosen.append((f"{kind}/{field}", pool, i))
    hits: dict[str, list[float]] = {}
    n_passages = config.n_passages if with_distractors else 1
    for start in range(0, len(chosen), 32):
        part = chosen[start:start + 32]
        inputs = np.stack([corpus.reading_row(pool, i, n_passages, config.input_length, rng,
                                              n_passages - 1)[0] for _, pool, i in part])
        tokens = reader.generate(inputs, max_length=config.target_length)
        for (name, pool, i), row in zip(part, tokens):
            predicted = _strip(vocabulary.decode([int(t) for t in row if t > 1]))
            answer = vocabulary.decode([int(t) for t in pool.answers[i]])
            hit = evaluation.exact_match(predicted, [answer])
            hits.setdefault(name, []).append(hit)
            if known is not None and answer not in known.get(name, ()):
                hits.setdefault(f"{name}:novel", []).append(hit)
    return {name: float(np.mean(v)) for name, v in sorted(hits.items())}


def known_answers(corpus, vocabulary) -> dict[str, set[str]]:
    """{`KIND/FIELD`: the answer texts of `corpus`' examples}."""
    known: dict[str, set[str]] = {}
    for kind, pool in corpus.pools.items():
        for field, answer in zip(pool.fields, pool.answers):
            known.setdefault(f"{kind}/{field}", set()).add(
                vocabulary.decode([int(t) for t in answer]))
    return known


def _strip(text: str) -> str:
    return text.replace("<extra_id_0>", "").strip()


# ----------------------------------------------------------------------------- loop

def train(config: ReaderPretrainConfig) -> dict:
    """Runs (or resumes) pre-training to `train_steps`; returns the last metrics record."""
    from atlas_jax import checkpoints, weights
    began = time.perf_counter()
    fileio.prepare_output(config.run_dir, OUTPUT_KIND)
    fileio.atomic_write_text(config.run_dir / "config.gin", gin.config_str())  # export reads it
    vocabulary, corpus, heldout, summary = prepare_corpus(config)
    fileio.atomic_write_json(config.run_dir / "corpus" / "summary.json", summary)
    model_config, model = make_model(vocabulary, config.copy_from_evidence)
    optimizer = make_optimizer(config)
    params = initial_params(model, config)
    opt_state = optimizer.init(params)
    manager = checkpoints.Checkpoints(config.run_dir / "checkpoints", config.max_to_keep)
    log = checkpoints.MetricsLog(config.run_dir, tensorboard=False)
    start, wall = 0, 0.0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state, meta = manager.restore(start, {"params": params, "opt_state": opt_state})
        params, opt_state, wall = state["params"], state["opt_state"], meta.get("wall_s", 0.0)
    log.truncate_after(start)          # records at `start` were logged before its checkpoint
    step_fn = make_train_step(model, optimizer, config.lm_weight)
    sizes = config.sizes()
    print(f"reader pre-training: {sum(np.size(x) for x in jax.tree.leaves(params)):,} "
          f"parameters, vocabulary {vocabulary.vocab_size}, examples {summary['examples']}, "
          f"from step {start} to {config.train_steps}", flush=True)
    known = known_answers(corpus, vocabulary)
    record: dict = {}
    mark, sums = time.perf_counter(), {}
    for step in range(start, config.train_steps):
        batch = corpus.batch(step, config.seed, sizes)
        params, opt_state, metrics = step_fn(params, opt_state, batch)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        done = step + 1
        if done % config.log_every == 0 or done == config.train_steps:
            count = (done - 1) % config.log_every + 1
            elapsed = time.perf_counter() - mark
            wall += elapsed
            record = log.write(done, {**{k: v / count for k, v in sums.items()},
                                      "step_s": elapsed / count, "wall_s": wall})
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in record.items()}), flush=True)
            mark, sums = time.perf_counter(), {}
        if done % config.eval_every == 0 or done == config.train_steps:
            reader = weights.Reader(model_config, params)
            accuracy = copy_accuracy(reader, heldout, vocabulary, config, known=known)
            alone = copy_accuracy(reader, heldout, vocabulary, config, with_distractors=False,
                                  known=known)
            extra = {}
            if getattr(heldout, "redated", None) is not None:
                extra = {f"heldout_redated/{k}": v for k, v in copy_accuracy(
                    reader, heldout.redated, vocabulary, config, known=known).items()}
            record = log.write(done, {**{f"heldout/{k}": v for k, v in accuracy.items()},
                                      **{f"heldout_alone/{k}": v for k, v in alone.items()},
                                      **extra})
            print(json.dumps(record), flush=True)
            mark = time.perf_counter()
        if done % config.checkpoint_every == 0 or done == config.train_steps:
            manager.save(done, {"params": params, "opt_state": opt_state},
                         {"step": done, "wall_s": wall, "seed": config.seed})
            mark = time.perf_counter()
    manager.close()
    log.close()
    record["run_s"] = time.perf_counter() - began
    return record

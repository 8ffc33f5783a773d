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
import sys
import time
from pathlib import Path
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import checkpoints as checkpoints_lib
from atlas_jax import distributed, fileio, inference, partitioning, weights
from atlas_jax.index import hybrid as hybrid_lib
from atlas_jax.index import passage_index as passage_index_lib
from atlas_jax.index import passages as passages_lib
from atlas_jax.index import refresh as refresh_lib
from atlas_jax.models import fid
from atlas_jax.train import joint_loss, objectives, optimization, steps
from atlas_jax.train.data import (RetrievalBatcher, batch_rows,
                                  load_examples, reader_token_table)
from atlas_jax.train.config import TrainConfig  # noqa: F401 (gin: trainer.TrainConfig)
from atlas_jax.train.evaluate import evaluate
from atlas_jax.train.indexing import build_index, index_path, load_index, prune_indexes, save_index
from atlas_jax.train.state import ModelState, build_state, param_groups


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run, built once from gin by `build_run`: its config and settings, the models
    on the mesh (`state`), the optimizer, the corpus and the batcher that retrieves from it."""
    config: TrainConfig
    objective: objectives.ObjectiveConfig
    optimizer_config: optimization.OptimizerConfig
    index_config: passage_index_lib.IndexConfig
    state: ModelState
    vocabulary: Any
    optimizer: optax.GradientTransformation
    batcher: RetrievalBatcher
    store: passages_lib.PassageStore | None
    schedule: refresh_lib.RefreshSchedule

    @property
    def n_context(self) -> int:
        """The passages the reader reads (1 closed-book: the question alone)."""
        return self.config.n_context if not self.config.closed_book else 1


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


def build_run(config: TrainConfig | None = None, init_params: Callable[[dict], dict] | None
              = None) -> Run:
    """Builds models, parameters (placed on the mesh), optimizer, data and index settings.
    `init_params(groups)`: host parameters for the run's groups (`state.param_groups`) instead
    of the gin-built reader and retriever's (e.g. another stage's)."""
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
    params = param_groups(reader.params, retriever.params, train_retriever, config.query_side)
    if init_params is not None:
        params = init_params(params)
    state = build_state(models, retriever, params, mesh, rules)
    schedule = refresh_lib.RefreshSchedule.parse(
        index_config.refresh_schedule if not config.query_side else "-1",
        train_retriever=train_retriever and not config.query_side,
        freeze_retriever_steps=optimizer_config.freeze_retriever_steps)
    store = _corpus(config, mesh)
    return Run(config, objective, optimizer_config, index_config, state, vocabulary,
               optimization.make_optimizer(optimizer_config, state.params),
               _batcher(config, index_config, retriever, store, vocabulary, train_retriever),
               store, schedule)


def _corpus(config: TrainConfig, mesh) -> passages_lib.PassageStore | None:
    if config.closed_book:
        return None
    if config.index_dir:
        return passage_index_lib.PassageIndex.load(config.index_dir, mesh=mesh).store
    return passages_lib.PassageStore.from_jsonl(config.passages_file)


def _batcher(config: TrainConfig, index_config, retriever: weights.Retriever, store,
             vocabulary, train_retriever: bool) -> RetrievalBatcher:
    settings = dataclasses.replace(
        config.settings(), hybrid=index_config.hybrid,
        stored_passage_embeddings=bool(config.query_side and train_retriever))
    reader_tokens = (None if store is None else reader_token_table(
        store, vocabulary, int(config.feature_lengths["inputs"])))
    batcher = RetrievalBatcher(settings, _query_encoder(retriever), reader_tokens, None,
                               query_filters=config.query_filters,
                               hybrid_config=hybrid_lib.HybridConfig()
                               if index_config.hybrid else None,
                               cache_queries=not train_retriever)
    return batcher


def _query_encoder(retriever: weights.Retriever) -> Callable[[list[str]], list]:
    def encode(texts):
        return [encoding.ids for encoding in retriever.tokenizer.encode_batch(texts)]
    return encode


@dataclasses.dataclass
class TrainResult:
    step: int
    params: dict
    metrics: list[dict]          # the records written to metrics.jsonl by this call
    evals: dict[int, dict]       # step -> eval metrics
    refresh_seconds: float
    wall_seconds: float


def _learning_rates(run: Run, params: dict, step: int) -> dict[str, float]:
    config = run.optimizer_config
    rates = {"learning_rate/reader": optimization.learning_rate_schedule(
        config.reader_learning_rate, config)(step // config.accumulation_steps)}
    if "retriever" in params:
        rates["learning_rate/retriever"] = optimization.frozen_until(
            optimization.learning_rate_schedule(config.retriever_learning_rate, config),
            config.freeze_retriever_steps)(step // config.accumulation_steps)
    return {k: float(v) for k, v in rates.items()}


def _index_step_at(run: Run, step: int) -> int:
    """The step of the index a checkpoint at `step` searches (refreshes happen after the
    checkpoint of their step)."""
    return max(run.schedule.steps(step), default=0)


@dataclasses.dataclass
class _Loop:
    """What the loop carries from step to step (and a checkpoint saves)."""
    params: dict
    opt_state: Any
    step: int = 0
    index: Any = None
    index_step: int | None = None
    refresh_seconds: float = 0.0
    retrieval_seconds: float = 0.0


def _prepare_run_dir(run: Run) -> None:
    run_dir = run.config.run_dir
    if distributed.is_primary():
        fileio.prepare_output(run_dir, checkpoints_lib.RUN_KIND,
                              legacy=checkpoints_lib.is_legacy_run)
        fileio.atomic_write_text(run_dir / "config.gin", gin.config_str())
    else:
        run_dir.mkdir(parents=True, exist_ok=True)


def _resume(run: Run, ckpt, loop: _Loop, tracker) -> None:
    """Restores the latest readable checkpoint into `loop` (an unreadable newest step is set
    aside and the run resumes from the step before)."""
    latest, state, meta, skipped = ckpt.restore_latest_readable(
        {"params": loop.params, "opt_state": loop.opt_state})
    for bad, why, moved in skipped if distributed.is_primary() else ():
        print(f"atlas-jax train: resuming from checkpoint step {latest}, not {bad} (set "
              f"aside as {moved.name}): {why}", file=sys.stderr, flush=True)
    loop.params, loop.opt_state, loop.step = state["params"], state["opt_state"], int(meta["step"])
    tracker.total_skipped = int(meta.get("skipped_total", 0))
    tracker.consecutive_skipped = int(meta.get("skipped_consecutive", 0))
    loop.refresh_seconds = float(meta.get("refresh_seconds", 0.0))
    if not run.config.closed_book:
        loop.index_step = int(meta["index_step"])
        loop.index = load_index(run, loop.index_step)
        run.batcher.use_index(loop.index)


def _start(run: Run, ckpt, log, tracker, initial_index: Any) -> _Loop:
    """The loop's state at its first step: resumed, or fresh (with `initial_index`)."""
    config = run.config
    params = run.state.params
    loop = _Loop(params, steps.init_opt_state(run.state, run.optimizer, params))
    if ckpt.latest_step() is not None:
        _resume(run, ckpt, loop, tracker)
    elif initial_index is not None and not config.closed_book:
        if len(initial_index.store) != len(run.store):
            raise ValueError(f"initial_index holds {len(initial_index.store)} passages, the "
                             f"run's corpus {len(run.store)}")
        loop.index, loop.index_step = initial_index, 0
        run.batcher.use_index(loop.index)
        save_index(run, loop.index, 0)
    # The loop evaluates `start` again only if its schedule says so (not when `start` was
    # the previous run's last step and this run trains further).
    start = loop.step
    log.truncate_for_resume(start, reevaluates=start >= config.train_steps or (
        config.eval_at_start and start == 0) or bool(
        config.eval_every and start % config.eval_every == 0))
    return loop


def _refresh(run: Run, loop: _Loop) -> None:
    """Re-embeds the corpus with the current passage tower and swaps the index in."""
    began = time.perf_counter()
    loop.index = build_index(run, loop.params, loop.step, previous=loop.index)
    run.batcher.use_index(loop.index)
    save_index(run, loop.index, loop.step)
    loop.refresh_seconds += time.perf_counter() - began
    loop.index_step = loop.step


def _eval_due(config: TrainConfig, step: int) -> bool:
    return (step >= config.train_steps or (config.eval_at_start and step == 0)
            or bool(config.eval_every and step % config.eval_every == 0))


def _batch(run: Run, loop: _Loop, examples, embed_queries, embed_passages, keep) -> dict:
    """This host's rows of the global batch of `loop.step` (all of them on one host)."""
    config = run.config
    began = time.perf_counter()
    rows = batch_rows(loop.step, config.batch_size, len(examples), config.seed)
    retriever_params = loop.params[run.state.retriever_key]
    passage_params = run.state.passage_params(loop.params)
    batch, _ = run.batcher.assemble(
        examples, rows, loop.index, lambda i, m: embed_queries(retriever_params, i, m),
        (lambda i, m: embed_passages(passage_params, i, m)) if config.rerank_n else None,
        keep=keep)
    loop.retrieval_seconds += time.perf_counter() - began
    return distributed.put_batch(run.state.mesh, batch, config.batch_size)


def _summary(run: Run, loop: _Loop, window: list[dict], tracker, elapsed: float) -> dict:
    summary = {key: float(np.mean([m[key] for m in window if not m["skipped"]] or [np.nan]))
               for key in ("loss", "reader_loss", "retriever_loss", "grad_norm")}
    summary.update(_learning_rates(run, loop.params, loop.step - 1), **tracker.metrics())
    summary.update({"time/wall_s": elapsed, "time/refresh_s": loop.refresh_seconds,
                    "time/retrieval_s": loop.retrieval_seconds,
                    "time/refresh_fraction": loop.refresh_seconds / max(elapsed, 1e-9)})
    return summary


def _checkpoint(run: Run, ckpt, loop: _Loop, tracker) -> None:
    config = run.config
    ckpt.save(loop.step, {"params": loop.params, "opt_state": loop.opt_state}, {
        "step": loop.step, "seed": config.seed, "index_step": loop.index_step,
        "data_position": loop.step * config.batch_size,
        "skipped_total": tracker.total_skipped,
        "skipped_consecutive": tracker.consecutive_skipped,
        "refresh_seconds": loop.refresh_seconds})
    if not config.closed_book:
        prune_indexes(run, {_index_step_at(run, s) for s in ckpt.all_steps()} | {loop.index_step})


def train(config: TrainConfig | None = None, run: Run | None = None,
          initial_index: Any = None) -> TrainResult:
    """Trains to `TrainConfig.train_steps`, resuming from the latest checkpoint in
    MODEL_DIR/checkpoints when there is one. `initial_index`: the step-0 index of a fresh
    run, already embedded with this run's initial passage tower (e.g. shared by runs that
    all start from the same frozen tower), instead of embedding the corpus again."""
    from tqdm import tqdm
    run = run or build_run(config)
    config, state = run.config, run.state
    _prepare_run_dir(run)
    train_examples = load_examples(config.task, config.train_split, config.feature_lengths)
    eval_examples = load_examples(config.task, config.eval_split, config.feature_lengths,
                                  limit=config.eval_limit)
    ckpt = checkpoints_lib.Checkpoints(config.run_dir / "checkpoints", config.max_to_keep)
    log = checkpoints_lib.MetricsLog(config.run_dir, config.tensorboard)
    tracker = optimization.NonFiniteTracker(run.optimizer_config.max_consecutive_nonfinite)
    loop = _start(run, ckpt, log, tracker, initial_index)
    step_fn = steps.make_train_step(state, run.objective, run.optimizer, run.n_context,
                                    loop.opt_state)
    keep = distributed.local_batch_positions(state.mesh, config.batch_size)
    embed_queries = inference.embed_fn(state, "query")
    embed_passages = inference.embed_fn(state, "passage")
    base_rng = jax.random.key(config.seed)
    records, evals, window = [], {}, []
    wall_start = time.perf_counter()
    bar = tqdm(total=config.train_steps, initial=loop.step,
               disable=not config.progress or not distributed.is_primary(),
               desc="train", unit="step", dynamic_ncols=True)
    while True:
        if not config.closed_book and (loop.index is None
                                       or run.schedule.should_refresh(loop.step)):
            _refresh(run, loop)
        if _eval_due(config, loop.step) and loop.step not in evals:
            evals[loop.step] = metrics = evaluate(
                run, loop.params, loop.index, eval_examples, loop.step, config.run_dir /
                "predictions" / f"{config.eval_split}_step_{loop.step}.jsonl")
            records.append(log.write(loop.step, metrics))
            if distributed.is_primary():
                bar.write(f"step {loop.step}: " + ", ".join(
                    f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k != "eval/examples"))
        if loop.step >= config.train_steps:
            break
        batch = _batch(run, loop, train_examples, embed_queries, embed_passages, keep)
        loss_scale = jnp.float32(np.nan if loop.step in config.nan_steps else 1.0)
        loop.params, loop.opt_state, metrics = step_fn(
            loop.params, loop.opt_state, batch, jax.random.fold_in(base_rng, loop.step),
            loss_scale)
        loop.step += 1
        metrics = jax.device_get(metrics)
        fileio.fault_point("train_step")
        tracker.record(metrics["skipped"])
        window.append(metrics)
        bar.update(1)
        if loop.step % config.log_every == 0 or loop.step == config.train_steps:
            summary = _summary(run, loop, window, tracker, time.perf_counter() - wall_start)
            records.append(log.write(loop.step, summary))
            bar.set_postfix(loss=f"{summary['loss']:.3f}")
            window = []
        if loop.step % config.checkpoint_every == 0 or loop.step == config.train_steps:
            _checkpoint(run, ckpt, loop, tracker)
    bar.close()
    log.close()
    ckpt.close()
    return TrainResult(loop.step, loop.params, records, evals, loop.refresh_seconds,
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
    # The whole step is read (a damaged one is reported, never half used), into the
    # optimizer state's shapes: no optimizer state is built for it.
    opt_state = steps.abstract_opt_state(run.state, run.optimizer, run.state.params)
    try:
        state, meta = ckpt.restore(step, {"params": run.state.params, "opt_state": opt_state})
    finally:
        ckpt.close()
    params, index = state["params"], None
    if not config.closed_book:
        index_step = int(meta["index_step"])
        index = (load_index(run, index_step) if index_path(run, index_step).is_dir()
                 else build_index(run, params, index_step))
        run.batcher.use_index(index)
    split = config.infer_split if infer else config.eval_split
    examples = load_examples(config.task, split, config.feature_lengths,
                             limit=None if infer else config.eval_limit)
    out = config.run_dir / "predictions" / f"{'infer' if infer else 'eval'}_{split}_step_{step}.jsonl"
    metrics = evaluate(run, params, index, examples, step, out)
    return {"step": step, "predictions": str(out), **metrics}

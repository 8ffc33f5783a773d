"""The demo's training stages: which stage starts from which (`STAGES`), which stage and
test-time retrieval each evaluated system uses (`SYSTEM_RUNS`), and one stage's run
(`run_stage`: a gin scope of `runs/demo.gin`, trained in DIR/runs/<stage>)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import gin
import numpy as np

# stage -> the stage whose parameters it starts from (None: the shipped reader and retriever)
STAGES = {
    "pretrain_joint": None,
    "pretrain_frozen": None,
    "finetune_joint": "pretrain_joint",
    "finetune_frozen": "pretrain_frozen",
    "finetune_scratch": None,
    "finetune_closed_book": "pretrain_joint",
}
# system -> (fine-tuning stage, retrieval at test time)
SYSTEM_RUNS = {
    "closed_book": ("finetune_closed_book", "closed_book"),
    "frozen_retriever": ("finetune_frozen", "dense"),
    "no_pretraining": ("finetune_scratch", "dense"),
    "joint": ("finetune_joint", "dense"),
    "joint_hybrid": ("finetune_joint", "hybrid"),
}


@dataclasses.dataclass
class StageResult:
    name: str
    run: Any
    params: dict
    seconds: float
    metrics_path: Path


def _transfer(source: dict, groups: dict) -> dict:
    """`source` params (another stage's groups) as host copies in the groups of `groups`."""
    import jax
    retriever = source.get("retriever", source.get("frozen_retriever"))
    by_name = {"reader": source["reader"], "retriever": retriever,
               "frozen_retriever": retriever,
               "frozen_passage_tower": source.get("frozen_passage_tower", retriever)}
    # Host copies: the new run donates its parameters to its train step, and the source
    # stage's arrays are still needed by the other stages that start from them.
    return jax.tree.map(np.asarray, {key: by_name[key] for key in groups})


def run_stage(name: str, out: Path, init: dict | None, shared: dict) -> StageResult:
    """Trains stage `name` (gin scope of the same name) in DIR/runs/<name>. Stages whose
    passage tower stays the shipped retriever (query-side training, or a frozen retriever) share
    one step-0 index, `shared["index"]`, embedded once."""
    from atlas_jax.train import trainer
    from atlas_jax.train.indexing import build_index
    began = time.perf_counter()
    with gin.config_scope(name):
        config = trainer.TrainConfig(model_dir=str(out / "runs" / name))
        run = trainer.build_run(config, init_params=None if init is None else
                                (lambda groups: _transfer(init, groups)))
    index = None
    if not config.closed_book and (config.query_side or run.objective.objective == "none"):
        if shared.get("index") is None:
            shared["index"] = build_index(run, run.state.params, 0)
        index = shared["index"]
    result = trainer.train(run=run, initial_index=index)
    return StageResult(name, run, result.params, time.perf_counter() - began,
                       out / "runs" / name / "metrics.jsonl")


def stage_config(result: StageResult) -> dict:
    c, o = result.run.config, result.run.optimizer_config
    return {"task": c.task, "split": c.train_split, "steps": c.train_steps,
            "batch_size": c.batch_size, "n_context": c.n_context,
            "retriever_n_context": c.retriever_n_context, "query_side": c.query_side,
            "closed_book": c.closed_book, "objective": result.run.objective.objective,
            "reader_lr": o.reader_learning_rate, "retriever_lr": o.retriever_learning_rate,
            "params": {k: int(sum(np.size(x) for x in __import__("jax").tree.leaves(v)))
                       for k, v in result.params.items()},
            "seconds": round(result.seconds, 1)}

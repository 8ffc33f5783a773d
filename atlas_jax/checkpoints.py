"""Run checkpoints (orbax `CheckpointManager`) and the run's metrics log.

A checkpoint at step s holds `state` = {"params", "opt_state"} (sharded arrays, restored onto
the current mesh's shardings) and `meta` (JSON: step, seed, data position, the step of the
index the run was searching, non-finite counters, timings). Data order and dropout keys are
functions of (seed, step), so this is everything a resumed run needs to repeat an
uninterrupted one. Checkpoints are written synchronously, and orbax commits a step only
once it is complete: a run killed mid-save resumes from the previous step.

`MetricsLog` appends one JSON object per logged step to `metrics.jsonl` and writes the
scalars as TensorBoard events.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the configured model."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=getattr(x, "sharding", None)),
                        tree)


class Checkpoints:
    """`directory`/<step>/{state,meta}; keeps the newest `max_to_keep`."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """(state placed like `target`, meta). Raises CheckpointMismatchError naming the
        checkpoint and the first array whose shape or dtype differs from `target`."""
        path = self.directory / str(step) / "state"
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # older layouts: fall through to restore's own error
            saved = None
        if saved is not None:
            _check_fits(saved, target, path)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(target)),
                meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatchError(f"{path}: does not fit the configured model and "
                                          f"optimizer: {e}") from None
        return restored.state, dict(restored.meta)

    def close(self) -> None:
        self.manager.close()


def _check_fits(saved: Any, target: Any, path: Path) -> None:
    flat_saved = {jax.tree_util.keystr(k): v for k, v in
                  jax.tree_util.tree_flatten_with_path(saved)[0]}
    for key, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = jax.tree_util.keystr(key)
        found = flat_saved.get(name)
        if found is None or not hasattr(found, "shape"):
            if name not in flat_saved:
                raise CheckpointMismatchError(
                    f"{path}: has no array {name} (the gin model or objective differs from the "
                    "run that wrote it; e.g. query_side adds frozen_passage_tower)")
            continue
        if tuple(found.shape) != tuple(leaf.shape):
            raise CheckpointMismatchError(
                f"{path}: {name} has shape {tuple(found.shape)}, the configured model needs "
                f"{tuple(leaf.shape)} (check the gin model bindings against the run that "
                "wrote the checkpoint)")


class MetricsLog:
    """metrics.jsonl (append) + TensorBoard events under `run_dir`/tensorboard; in a
    multi-process run only process 0 writes (every process gets the records back)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.primary = jax.process_index() == 0
        if tensorboard and self.primary:
            from flax.metrics import tensorboard as tb
            self.writer = tb.SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> dict:
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value) if not isinstance(value, (str, dict, list)) else value
            record[key] = value
        if not self.primary:
            return record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.writer.scalar(key, value, step)
            self.writer.flush()
        return record

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def truncate_after(self, step: int) -> None:
        """Drops records after `step` (a resumed run rewrites them)."""
        if not self.primary:
            return
        kept = [r for r in self.read() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

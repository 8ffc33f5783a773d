"""Run checkpoints (orbax `CheckpointManager`) and the run's metrics log.

A checkpoint at step s holds `state` = {"params", "opt_state"} (sharded arrays, restored onto
the current mesh's shardings) and `meta` (JSON: step, seed, data position, the step of the
index the run was searching, non-finite counters, timings). Data order and dropout keys are
functions of (seed, step), so this is everything a resumed run needs to repeat an
uninterrupted one. Checkpoints are written synchronously, and orbax commits a step only
once it is complete: a run killed mid-save resumes from the previous step.

A committed step whose files were later deleted, truncated or garbled raises
CheckpointCorruptError (one line naming the folder or file, and the array when known) instead
of orbax's and TensorStore's own errors; `restore_latest_readable` lets training resume from
the newest step that still reads (docs/robustness.md).

`MetricsLog` appends one JSON object per logged step to `metrics.jsonl` and writes the
scalars as TensorBoard events.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from atlas_jax import fileio
from atlas_jax.models import stacking


RUN_KIND = "train-run"          # the kind in a MODEL_DIR's .atlas-jax.json marker (fileio)


def is_legacy_run(folder: Path) -> bool:
    """A MODEL_DIR that `atlas-jax train` wrote before output markers existed: config.gin
    with TrainConfig bindings, and (if any) checkpoints whose meta has our data position."""
    folder = Path(folder)
    try:
        if "TrainConfig" not in (folder / "config.gin").read_text(encoding="utf-8"):
            return False
    except (OSError, UnicodeDecodeError):
        return False
    metas = list(folder.glob("checkpoints/*/meta/metadata"))
    for meta in metas:
        try:
            if "data_position" in json.loads(meta.read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError, UnicodeDecodeError):
            continue
    return not metas and (folder / "metrics.jsonl").is_file()


class CheckpointMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the configured model."""


class CheckpointCorruptError(ValueError):
    """A committed checkpoint that cannot be read: a file missing, truncated or garbled. The
    message names the checkpoint folder or file (and the array when known) in one line."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=getattr(x, "sharding", None)),
                        tree)


class Checkpoints:
    """`directory`/<step>/{state,meta}; keeps the newest `max_to_keep`."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = 3):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # Handlers named up front: item_metadata then reads both items without warnings.
        return ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep, create=True, enable_async_checkpointing=False),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def _reading_manager(self) -> ocp.CheckpointManager:
        """A manager of its own that only restores, with a PyTree handler (partial restores;
        orbax's read_only option would log two warnings on every `ask`); close it after."""
        return ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                create=False, max_to_keep=None, enable_async_checkpointing=False),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def _restore_part(self, step: int, target: Any) -> Any:
        """Reads only `target`'s arrays of the step's state (a PyTree handler: orbax's
        partial restore), through a manager of its own that only restores (orbax's read_only
        option would log two warnings on every `ask`)."""
        abstract = abstract_like(target)
        manager = self._reading_manager()
        try:
            return manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract, partial_restore=True,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
                meta=ocp.args.JsonRestore()))
        finally:
            manager.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, target: Any, partial: bool = False) -> tuple[Any, dict]:
        """(state placed like `target`, meta). Raises CheckpointMismatchError naming the
        checkpoint and the first array whose shape or dtype differs from `target`, and
        CheckpointCorruptError when a file of the step is missing, truncated or garbled.
        `partial`: `target` is a part of the saved state (e.g. {"params": ...} without the
        optimizer state); only its arrays are read."""
        path = self.directory / str(step) / "state"
        self._check_files(step)
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # older layouts: fall through to restore's own error
            saved = None
        if saved is not None and stacking.is_stacked(saved) != stacking.is_stacked(target):
            return self._restore_relayout(step, target, saved, path)
        if saved is not None:
            _check_fits(saved, target, path)
        try:
            restored = (self._restore_part(step, target) if partial else self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
                    abstract_like(target)), meta=ocp.args.JsonRestore())))
        except MemoryError:
            raise
        except Exception as e:  # orbax raises bare Exception for TensorStore read errors
            _silence_failed_read_noise()
            unreadable = _unreadable(e)
            if unreadable is None and isinstance(e, (ValueError, KeyError, TypeError)):
                raise CheckpointMismatchError(f"{path}: does not fit the configured model and "
                                              f"optimizer: {_one_line(e)}") from None
            array, reason = unreadable or (None, f"{type(e).__name__}: {_one_line(e)}")
            raise self._corrupt(step, path, reason, array) from None
        meta = restored.meta
        if not isinstance(meta, dict):
            raise self._corrupt(step, self.directory / str(step) / "meta",
                                f"holds {type(meta).__name__}, not a JSON object")
        return restored.state, dict(meta)

    def _restore_relayout(self, step: int, target: Any, saved: Any, path: Path
                          ) -> tuple[Any, dict]:
        """Restores a step written in the other layer layout (scanned vs per layer,
        models/stacking.py): reads `target`'s arrays in the saved layout onto the host,
        converts them, then places them like `target`."""
        host = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
        host = stacking.to_layout(host, stacking.is_stacked(saved))
        _check_fits(saved, host, path)
        manager = self._reading_manager()
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=host, partial_restore=True, restore_args=jax.tree.map(
                        lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), host)),
                meta=ocp.args.JsonRestore()))
        except MemoryError:
            raise
        except Exception as e:
            _silence_failed_read_noise()
            array, reason = _unreadable(e) or (None, f"{type(e).__name__}: {_one_line(e)}")
            raise self._corrupt(step, path, reason, array) from None
        finally:
            manager.close()
        state = stacking.to_layout(restored.state, stacking.is_stacked(target))
        placed = jax.tree.map(
            lambda x, t: jax.device_put(x, t.sharding) if getattr(t, "sharding", None) is not None
            else jax.numpy.asarray(x), state, target)
        return placed, dict(restored.meta)

    def _corrupt(self, step: int, path: Path, reason: str,
                 array: str | None = None) -> CheckpointCorruptError:
        earlier = [s for s in self.all_steps() if s < step]
        where = f" (array {array})" if array else ""
        hint = (f"earlier checkpoint{'s' if len(earlier) > 1 else ''}: step "
                f"{', '.join(map(str, earlier))}" if earlier else "no earlier checkpoint")
        return CheckpointCorruptError(
            f"{path}: checkpoint step {step} is unreadable (a file is missing, truncated or "
            f"corrupt){where}: {reason}; {hint}", step)

    def _check_files(self, step: int) -> None:
        """The step's folders and small JSON files, checked before orbax reads them (orbax
        reports a broken one without naming it)."""
        folder = self.directory / str(step)
        for item in ("state", "meta"):
            if not (folder / item).is_dir():
                raise self._corrupt(step, folder / item, "the folder is missing")
        files = [folder / "meta" / "metadata", folder / "state" / "_METADATA",
                 folder / "state" / "_sharding",
                 *sorted((folder / "state" / "array_metadatas").glob("process_*"))]
        for file in files:
            if not file.exists():
                continue
            try:
                json.loads(file.read_bytes().decode("utf-8"))
            except json.JSONDecodeError as e:
                raise self._corrupt(step, file, f"line {e.lineno}: malformed JSON: "
                                                f"{e.msg}") from None
            except (OSError, UnicodeDecodeError) as e:
                raise self._corrupt(step, file, f"not readable JSON text ({e})") from None

    def restore_latest_readable(self, target: Any) -> tuple[int, Any, dict,
                                                             list[tuple[int, str, Path]]]:
        """Resuming: `restore` of the newest step that reads, as (step, state, meta, skipped).
        Each newer step that is unreadable (CheckpointCorruptError) is moved aside to
        `<step>.unreadable` (kept for inspection; orbax would refuse to save that step again)
        and listed in `skipped` as (step, error message, new path). Raises
        CheckpointCorruptError when no step reads (nothing is moved then); a
        CheckpointMismatchError is never skipped (an earlier step would not fit either)."""
        failures = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, target)
            except CheckpointCorruptError as e:
                failures.append((step, e))
                continue
            skipped = [(bad, str(error), self._set_aside(bad)) for bad, error in failures]
            if skipped:
                self.manager.close()
                self.manager = self._open()
            return step, state, meta, skipped
        if not failures:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        if len(failures) == 1:
            raise failures[0][1]
        steps = ", ".join(str(step) for step, _ in reversed(failures))
        newest = str(failures[0][1]).rsplit("; earlier checkpoint", 1)[0]
        raise CheckpointCorruptError(f"no checkpoint step reads ({steps}); the newest: {newest}",
                                     failures[0][0])

    def _set_aside(self, step: int) -> Path:
        from atlas_jax import distributed
        source = self.directory / str(step)
        target, number = self.directory / f"{step}.unreadable", 1
        while target.exists():
            number += 1
            target = self.directory / f"{step}.unreadable{number}"
        if distributed.is_primary():
            os.replace(source, target)
        distributed.barrier(f"checkpoint step {step} set aside")
        return target

    def close(self) -> None:
        self.manager.close()


_STATUS = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|UNAVAILABLE|"
                     r"INTERNAL|UNKNOWN): (.*)", re.S)
_ARRAY = re.compile(r'Error reading "([^"]+?)(?:/\.zarray|/[\d.]+)?" in OCDBT')
_LOCAL_FILE = re.compile(r'^.*? at local file "[^"]*": ', re.S)


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = str(error).split(" [tensorstore_spec=")[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _unreadable(error: BaseException) -> tuple[str | None, str] | None:
    """(array or None, one-line reason) when `error` (or what caused it) says the
    checkpoint's files are missing, truncated or garbled; None otherwise."""
    seen, chain, node = set(), [], error
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        chain.append(node)
        node = node.__cause__ or node.__context__
    for node in reversed(chain):  # the innermost error says the most
        if isinstance(node, json.JSONDecodeError):
            return None, f"malformed JSON: {node.msg}"
        if isinstance(node, (FileNotFoundError, IsADirectoryError, PermissionError)):
            return None, (f"{node.filename}: missing or not readable" if node.filename
                          else _one_line(node))
        if isinstance(node, UnicodeDecodeError):
            return None, f"not text ({node.reason})"
        match = _STATUS.search(str(node))
        if match:
            array = _ARRAY.search(str(node))
            detail = _one_line(_LOCAL_FILE.sub("", match.group(2), count=1))
            return (array.group(1) if array else None), f"{detail} ({match.group(1)})"
        if isinstance(node, KeyError) and "was not found in the checkpoint" in str(node):
            return None, _one_line(node)
    if any("error while reading array" in str(node) for node in chain):
        return None, _one_line(chain[-1])
    return None


_NOISE_FILTERED = False


class _OrbaxReadNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        return not (("never retrieved" in text and "orbax" in text)
                    or (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"))


def _silence_failed_read_noise() -> None:
    """After a failed restore, orbax's abandoned TensorStore reads finish on other threads
    into a closed event loop and print tracebacks ("Event loop is closed", "Task exception
    was never retrieved") long after the error was reported: through the asyncio logger,
    sys.unraisablehook, sys.excepthook (TensorStore's callbacks call PyErr_Print) or
    threading.excepthook (a worker thread's uncaught error). Drops
    exactly those, for the rest of the process; everything else still reaches the previous
    hooks."""
    global _NOISE_FILTERED
    if _NOISE_FILTERED:
        return
    _NOISE_FILTERED = True
    logging.getLogger("asyncio").addFilter(_OrbaxReadNoise())
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def closed_loop(error) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    def unraisable_hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if closed_loop(unraisable.exc_value) or (code is not None
                                                 and "orbax" in code.co_filename):
            return
        previous_unraisable(unraisable)

    def except_hook(kind, error, traceback):
        if not closed_loop(error):
            previous_except(kind, error, traceback)

    previous_thread = threading.excepthook

    def thread_hook(args):      # the same error raised on one of orbax's worker threads
        if not closed_loop(args.exc_value):
            previous_thread(args)
    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
    threading.excepthook = thread_hook


def _key_names(path: tuple) -> tuple[str, ...]:
    """A tree path as plain names: orbax's metadata tree holds dicts where the target holds
    optax NamedTuples (`.mu` vs `['mu']`), so keystr alone would never match."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_fits(saved: Any, target: Any, path: Path) -> None:
    flat_saved = {_key_names(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    for key, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = jax.tree_util.keystr(key)
        found = flat_saved.get(_key_names(key))
        if found is None or not hasattr(found, "shape"):
            if _key_names(key) not in flat_saved:
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
        """The records; a last line cut short by a kill mid-append is ignored."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number == len(lines):      # a partial final append
                    break
                raise ValueError(f"{self.path}:{number}: malformed JSON: {e.msg}") from None
        return records

    def truncate_for_resume(self, step: int, reevaluates: bool = True) -> None:
        """Keeps what a run resumed at `step` (0: a fresh start) will not write again: the
        records before `step`, the training record at `step`, and the evaluation at `step`
        unless the resumed run `reevaluates` it (its schedule evaluates that step). Everything
        after `step` (from an attempt that died before its next checkpoint) goes, so the log
        holds each step's records once. Rewritten atomically."""
        if not self.primary:
            return
        kept = [r for r in self.read() if r["step"] < step or (
            r["step"] == step and not (reevaluates and any(k.startswith("eval/") for k in r)))]
        fileio.atomic_write_lines(self.path, (json.dumps(r, allow_nan=True) for r in kept))

    def truncate_after(self, step: int) -> None:
        """Drops records after `step` (a resumed run rewrites them)."""
        if not self.primary:
            return
        kept = [r for r in self.read() if r["step"] <= step]
        fileio.atomic_write_lines(self.path, (json.dumps(r, allow_nan=True) for r in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

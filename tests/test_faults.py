"""Fault injection: a training run SIGKILLed at each kind of point resumes to the metrics of an
uninterrupted run, with a metrics log that holds each step once and no partial leftovers.

Kill points (`ATLAS_JAX_KILL_AT`, atlas_jax/fileio.fault_point): the warm-reader cache write
(bytes written, not renamed), an index save (staged, not swapped in), a training step (after
the update, before its log and checkpoint); and an orbax checkpoint write, killed from outside
as soon as its temporary folder appears. One run is killed at each point in turn and
relaunched each time (the chain is what a user with a flaky machine sees), then compared with
a run that was never interrupted.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FLAGS = ["--gin_file=runs/synthetic.gin", "--gin.TRAIN_STEPS=4",
         "--gin.TrainConfig.eval_at_start=False", "--gin.TrainConfig.eval_limit=8",
         "--gin.TrainConfig.checkpoint_every=2", "--gin.TrainConfig.eval_every=2",
         "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.progress=False",
         "--gin.TrainConfig.tensorboard=False",
         "--gin.passage_index.IndexConfig.refresh_schedule='2'",
         "--gin.TrainConfig.batch_size=8", "--gin.TrainConfig.retriever_n_context=8",
         "--gin.TrainConfig.n_context=4", "--gin.synthetic_reader.build_warm_reader.steps=10"]


def _command(model_dir):
    exe = shutil.which("atlas-jax", path=str(Path(sys.executable).parent))
    base = [exe] if exe else [sys.executable, "-m", "atlas_jax.cli"]
    return base + ["train", f"--gin.MODEL_DIR='{model_dir}'"] + FLAGS


def _env(kill_at=None):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("ATLAS_JAX_KILL_AT", None)
    if kill_at:
        env["ATLAS_JAX_KILL_AT"] = kill_at
    return env


def _train(model_dir, kill_at=None):
    return subprocess.run(_command(model_dir), capture_output=True, text=True,
                          env=_env(kill_at), timeout=900)


def _train_killed_during_checkpoint_write(model_dir):
    """Starts a run and SIGKILLs it once orbax's temporary checkpoint folder appears."""
    process = subprocess.Popen(_command(model_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env())
    folder = Path(model_dir) / "checkpoints"
    known = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    caught = False
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        if folder.is_dir() and any("tmp" in p.name for p in folder.iterdir()
                                   if p.name not in known):
            process.send_signal(signal.SIGKILL)
            caught = True
            break
        time.sleep(0.002)
    process.wait(timeout=60)
    return caught, process.returncode


def _records(model_dir):
    return [json.loads(line) for line in
            (Path(model_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _comparable(records):
    drop = ("time/", "learning_rate")
    return [{k: v for k, v in r.items() if not any(k.startswith(d) or d in k for d in drop)}
            for r in records]


def test_killed_runs_resume_to_the_uninterrupted_metrics(tmp_path):
    reference = _train(tmp_path / "whole")
    assert reference.returncode == 0, reference.stderr[-2000:]

    run = tmp_path / "killed"
    outcomes = []
    for point in ("atomic_write:warm_reader", "index_save:2", "train_step:1"):
        result = _train(run, kill_at=point)
        outcomes.append((point, result.returncode))
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-2000:])
    caught, code = _train_killed_during_checkpoint_write(run)
    outcomes.append(("checkpoint_write", code if caught else "finished first"))
    final = _train(run)
    assert final.returncode == 0, (outcomes, final.stderr[-2000:])
    assert "Traceback" not in final.stderr

    whole, resumed = _records(tmp_path / "whole"), _records(run)
    keys = [(r["step"], any(k.startswith("eval/") for k in r)) for r in resumed]
    assert len(keys) == len(set(keys)), f"a step logged twice: {keys}"
    assert _comparable(resumed) == _comparable(whole), outcomes
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or ".staging-" in p.name
                 or ".old." in p.name]
    assert not leftovers, leftovers
    print(outcomes)

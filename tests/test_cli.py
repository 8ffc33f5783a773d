"""The `atlas-jax` entry point and the smoke demo, run as a user runs them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def _run(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device, as a user's first run
    exe = shutil.which("atlas-jax", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "atlas_jax.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, env=env,
                          timeout=600)


def test_demo_runs_end_to_end():
    result = _run("demo")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["recall@3"] == 1.0  # real MiniLM ranks each answering entry in the top 3
    assert summary["reader_logits_shape"] == [5, 12, 384]
    assert summary["generated_shape"] == [5, 8]
    # The filtered query returns the two restaurant entries after March 8, not fewer.
    assert sorted(summary["filtered_hits"]) == ["entry-3", "entry-8"]


def test_unknown_command_is_an_error():
    result = _run("no-such-command")
    assert result.returncode == 2 and "invalid choice" in result.stderr

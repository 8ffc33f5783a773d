"""The `atlas-jax` entry point, run as a user runs it."""
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


def test_demo_and_ask_document_their_flags():
    # The demo itself runs end to end in tests/test_demo.py (--quick).
    result = _run("demo", "--help")
    assert result.returncode == 0 and "--quick" in result.stdout and "--out" in result.stdout
    result = _run("ask", "--help")
    assert result.returncode == 0 and "--ledger" in result.stdout


def test_unknown_command_is_an_error():
    result = _run("no-such-command")
    assert result.returncode == 2 and "invalid choice" in result.stderr

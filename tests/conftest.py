"""Test set-up: 8 simulated CPU devices (set before JAX initialises), offline hubs."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _gin_cleared_between_test_files():
    """Every test file starts and ends with an empty gin configuration (a binding one file
    leaves, e.g. an index backend, must not reach the next file)."""
    import gin
    gin.clear_config(clear_constants=True)
    yield
    gin.clear_config(clear_constants=True)


# One transaction the demo ledger does not have (between two expense accounts, so no balance
# assertion moves), appended by the tests of `ask`, `ledger sync`, `serve` and the Fava page.
NEW_ENTRY = ('\n2022-12-30 * "Zyxwv Bakery" "Birthday cake"\n'
             "  Expenses:Food:Restaurant  77.41 USD\n"
             "  Expenses:Food:Groceries  -77.41 USD\n")


def grown_ledger(source, target):
    """`source` copied to `target` with NEW_ENTRY appended; returns `target`."""
    from pathlib import Path
    target = Path(target)
    target.write_text(Path(source).read_text() + NEW_ENTRY)
    return target


def run_cli(*args, timeout=1500, cwd=None):
    """`python -m atlas_jax.cli ARGS` in a subprocess (from the repository unless `cwd`)."""
    import subprocess
    import sys
    from pathlib import Path
    return subprocess.run([sys.executable, "-m", "atlas_jax.cli", *args],
                          cwd=cwd or Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`atlas-jax demo --quick` once per test session: (out folder, stdout). Shared by
    test_demo (the report, `ask`) and test_serve (the server, sync, Fava)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = run_cli("demo", "--out", str(out), "--quick")
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout

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

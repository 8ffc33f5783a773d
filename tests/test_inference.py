"""Inference restores a run's parameters without reading its optimizer state."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import checkpoints, inference


def _save(folder, params, opt_state):
    ckpt = checkpoints.Checkpoints(folder)
    ckpt.save(3, {"params": params, "opt_state": opt_state}, {"step": 3})
    ckpt.close()


def test_parameters_restore_without_the_optimizer_state(tmp_path):
    params = {"reader": {"w": jnp.arange(6.0).reshape(2, 3)}, "retriever": {"b": jnp.ones(4)}}
    # An optimizer state no target describes: a full restore could not even be asked for it.
    _save(tmp_path / "checkpoints", params, {"mu": jnp.full((5,), 7.0), "count": jnp.int32(9)})
    target = jax.tree.map(jnp.zeros_like, params)
    restored, step = inference.restore_params(tmp_path / "checkpoints",
                                              types.SimpleNamespace(params=target))
    assert step == 3 and set(restored) == {"reader", "retriever"}
    np.testing.assert_array_equal(restored["reader"]["w"], params["reader"]["w"])
    np.testing.assert_array_equal(restored["retriever"]["b"], params["retriever"]["b"])
    with pytest.raises(checkpoints.CheckpointMismatchError):   # the full state does not fit
        ckpt = checkpoints.Checkpoints(tmp_path / "checkpoints")
        try:
            ckpt.restore(3, {"params": target, "opt_state": {"mu": jnp.zeros(6)}})
        finally:
            ckpt.close()


def test_parameters_that_do_not_fit_are_named(tmp_path):
    _save(tmp_path / "checkpoints", {"reader": {"w": jnp.ones((2, 3))}}, {"mu": jnp.zeros(2)})
    target = types.SimpleNamespace(params={"reader": {"w": jnp.zeros((3, 3))}})
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"\['reader'\]\['w'\]"):
        inference.restore_params(tmp_path / "checkpoints", target)


def test_no_checkpoint_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        inference.restore_params(tmp_path / "checkpoints",
                                 types.SimpleNamespace(params={"w": jnp.zeros(2)}))

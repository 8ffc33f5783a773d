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


def _tiny_reader_state():
    from atlas_jax import partitioning
    from atlas_jax.models import fid, t5
    from flax.linen import meta
    config = t5.T5Config(vocab_size=7, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                         num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0)
    model = fid.FusionInDecoder(config)
    params = meta.unbox(model.init(jax.random.key(3), jnp.ones((1, 2, 6), jnp.int32),
                                   jnp.ones((1, 3), jnp.int32))["params"])
    state = types.SimpleNamespace(models=types.SimpleNamespace(reader=model), compiled={},
                                  mesh=partitioning.create_mesh(),
                                  rules=partitioning.logical_axis_rules())
    return model, params, state


def test_answers_decode_greedily_or_with_the_best_beam():
    """`TrainConfig.beam_size` reaches the decoder: width 1 is greedy search, a wider one
    answers with beam search's best sequence (scored with the length penalty), cached apart."""
    from atlas_jax.models import decoding
    model, params, state = _tiny_reader_state()
    # Eight questions: the batch is sharded over the (simulated) device mesh.
    ids = np.random.default_rng(0).integers(2, 7, (8, 2, 6)).astype(np.int32)
    ids[:, 1, 4:] = 0
    greedy = inference.generate_fn(state, 5)(params, ids)
    beam = inference.generate_fn(state, 5, 4)(params, ids)
    want_greedy = decoding.generate_from_passages(model, params, ids, 5)
    want_beams, scores = decoding.generate_from_passages(model, params, ids, 5, 4)
    np.testing.assert_array_equal(greedy, np.asarray(want_greedy))
    np.testing.assert_array_equal(beam, np.asarray(want_beams)[:, 0])
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)     # the first beam is the best
    assert beam.shape == greedy.shape == (8, 5) and len(state.compiled) == 2


def test_a_beam_width_below_one_is_refused_by_name(tmp_path):
    from atlas_jax.train.config import TrainConfig
    common = dict(model_dir=str(tmp_path), task="t", closed_book=True,
                  feature_lengths={"inputs": 8, "targets": 4})
    assert TrainConfig(**common, beam_size=3).beam_size == 3
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match=r"TrainConfig.beam_size = "):
            TrainConfig(**common, beam_size=bad)


def test_all_beams_come_back_best_first_for_an_answer_selector():
    """`all_beams` returns every beam and its score (the selector's candidates), the first
    equal to the best-beam answer; `select_answers` drops slots no hypothesis filled and
    refuses a selector's index that names no beam."""
    from atlas_jax.models import decoding
    model, params, state = _tiny_reader_state()
    ids = np.random.default_rng(1).integers(2, 7, (8, 2, 6)).astype(np.int32)
    tokens, scores = inference.generate_fn(state, 5, 3, all_beams=True)(params, ids)
    want, want_scores = decoding.generate_from_passages(model, params, ids, 5, 3)
    np.testing.assert_array_equal(tokens, np.asarray(want))
    np.testing.assert_allclose(scores, np.asarray(want_scores), rtol=1e-6)
    np.testing.assert_array_equal(tokens[:, 0], inference.generate_fn(state, 5, 3)(params, ids))

    beams = [["a", "b", "c"], ["d", "e", "f"]]
    two_filled = np.array([[-1.0, -2.0, -3.0], [-1.0, -2.0, decoding.NEG_INF]])
    seen = []

    def last(questions, candidates, evidence, store):
        seen.append(candidates)
        return [len(c) - 1 for c in candidates]
    assert inference.select_answers(None, ["q1", "q2"], beams, two_filled, [[], []], None) \
        == [0, 0]
    assert inference.select_answers(last, ["q1", "q2"], beams, two_filled, [[], []], None) \
        == [2, 1]
    assert seen == [[["a", "b", "c"], ["d", "e"]]]
    with pytest.raises(ValueError, match="answer_selector .* chose beams \\[0, 2\\]"):
        inference.select_answers(lambda *a: [0, 2], ["q1", "q2"], beams, two_filled,
                                 [[], []], None)


def test_an_answer_selector_that_is_not_a_function_is_refused(tmp_path):
    from atlas_jax.train.config import TrainConfig
    common = dict(model_dir=str(tmp_path), task="t", closed_book=True,
                  feature_lengths={"inputs": 8, "targets": 4})
    with pytest.raises(ValueError, match=r"TrainConfig.answer_selector = 'grounded'"):
        TrainConfig(**common, answer_selector="grounded")

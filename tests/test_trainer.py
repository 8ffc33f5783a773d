"""The training loop on gin/runs/synthetic.gin, mesh (4, 2) of 8 simulated devices: resume
equals an uninterrupted run, query-side training keeps the passage tower bit-identical, an
injected NaN is skipped and counted, batches are a function of (seed, step), bad bindings and
checkpoints that do not fit get named, and eval/infer read a run's checkpoint."""
from __future__ import annotations

import json

import jax
import numpy as np
import gin
import pytest

import atlas_jax_tasks
from atlas_jax import checkpoints, gin_config
from atlas_jax.train import trainer
from atlas_jax.train.data import batch_rows
from tests.squad_reference import exact_match


@pytest.fixture(autouse=True)
def clear_gin():
    """Leave no bindings behind for later test files."""
    yield
    gin.clear_config(clear_constants=True)

MESH = "partitioning.create_mesh.shape = (4, 2)"
# Short runs: a refresh every 2 steps and a checkpoint every 3 exercise the index reload.
SHORT = ["TrainConfig.eval_at_start = False", "TrainConfig.eval_limit = 8",
         "TrainConfig.checkpoint_every = 3", "TrainConfig.log_every = 1",
         "TrainConfig.progress = False", "TrainConfig.tensorboard = False",
         "passage_index.IndexConfig.refresh_schedule = '2'", "TrainConfig.batch_size = 8",
         "TrainConfig.retriever_n_context = 8", "TrainConfig.n_context = 4",
         "synthetic_reader.build_warm_reader.steps = 10"]  # the loop, not the reader, is tested


def configure(model_dir, *bindings, files=("runs/synthetic.gin",)):
    gin_config.parse(list(files), [f"MODEL_DIR = '{model_dir}'", MESH, *SHORT, *bindings])
    atlas_jax_tasks.register_configured_tasks()
    return trainer.TrainConfig()


def launch(model_dir, *bindings, files=("runs/synthetic.gin",)):
    return trainer.train(configure(model_dir, *bindings, files=files))


def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole = launch(tmp_path / "whole", "TRAIN_STEPS = 6")
    first = launch(tmp_path / "split", "TRAIN_STEPS = 4")
    assert first.step == 4 and sorted(p.name for p in (tmp_path / "split" / "index").iterdir())
    second = launch(tmp_path / "split", "TRAIN_STEPS = 6")  # resumes from the step-4 checkpoint
    assert second.step == 6
    assert [r["step"] for r in second.metrics if "loss" in r] == [5, 6]
    a, b = flat(whole.params), flat(second.params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0, err_msg=key)
    moved = max(float(np.abs(a[k] - v).max()) for k, v in flat(
        launch(tmp_path / "ref", "TRAIN_STEPS = 0").params).items())
    assert moved > 1e-3  # training changed the parameters (the comparison is not vacuous)
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # Per-step losses and the final optimizer state equal the uninterrupted run's too.
    uninterrupted = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    losses = lambda log: {r["step"]: r["loss"] for r in log if "loss" in r}  # noqa: E731
    assert losses(logged) == pytest.approx(losses(uninterrupted), rel=1e-5, abs=1e-6)
    import orbax.checkpoint as ocp
    states = [flat(ocp.StandardCheckpointer().restore(
        (tmp_path / run / "checkpoints" / "6" / "state").absolute())["opt_state"])
        for run in ("whole", "split")]
    assert states[0].keys() == states[1].keys() and len(states[0]) > 0
    for key in states[0]:
        np.testing.assert_allclose(states[0][key], states[1][key], atol=1e-6, rtol=0,
                                   err_msg=key)
    for name in ("config.gin", "checkpoints", "predictions"):
        assert (tmp_path / "split" / name).exists()


def test_query_side_keeps_the_passage_tower_bit_identical(tmp_path):
    initial = launch(tmp_path / "init", "TRAIN_STEPS = 0", "TrainConfig.query_side = True")
    result = launch(tmp_path / "qs", "TRAIN_STEPS = 4", "TrainConfig.query_side = True")
    before, after = flat(initial.params), flat(result.params)
    frozen = [k for k in before if k.startswith("['frozen_passage_tower']")]
    assert frozen
    for key in frozen:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
        trained = key.replace("frozen_passage_tower", "retriever")
        np.testing.assert_array_equal(before[key], before[trained])
    assert any(not np.array_equal(before[k], after[k]) for k in before
               if k.startswith("['retriever']"))
    # Never refreshed: only the step-0 index was ever built.
    assert result.refresh_seconds > 0
    assert sorted(p.name for p in (tmp_path / "qs" / "index").iterdir()) == ["step_00000000"]


def test_injected_nan_is_skipped_and_counted(tmp_path):
    result = launch(tmp_path / "nan", "TRAIN_STEPS = 3", "TrainConfig.nan_steps = (1,)")
    logged = [r for r in result.metrics if "loss" in r]
    assert [r["nonfinite/skipped_total"] for r in logged] == [0, 1, 1]
    assert np.isnan(logged[1]["loss"]) and np.isfinite(logged[2]["loss"])
    with pytest.raises(FloatingPointError, match="max_consecutive_nonfinite"):
        launch(tmp_path / "stop", "TRAIN_STEPS = 4", "TrainConfig.nan_steps = (0, 1)",
               "optimization.OptimizerConfig.max_consecutive_nonfinite = 2")


def test_batches_are_a_function_of_seed_and_step():
    epoch = np.concatenate([batch_rows(s, 10, 50, seed=3) for s in range(5)])
    assert sorted(epoch) == list(range(50))           # one epoch sees every example once
    np.testing.assert_array_equal(batch_rows(7, 10, 50, 3), batch_rows(7, 10, 50, 3))
    assert not np.array_equal(batch_rows(7, 10, 50, 3), batch_rows(7, 10, 50, 4))
    assert not np.array_equal(batch_rows(0, 10, 50, 3), batch_rows(5, 10, 50, 3))


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    launch(tmp_path / "run", "TRAIN_STEPS = 3")
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"checkpoints/3/state.*shape"):
        launch(tmp_path / "run", "TRAIN_STEPS = 4", "t5.T5Config.mlp_dim = 96")


def test_eval_and_infer_read_the_latest_checkpoint(tmp_path):
    launch(tmp_path / "run", "TRAIN_STEPS = 3")
    config = configure(tmp_path / "run", "TRAIN_STEPS = 3", "TrainConfig.infer_split = "
                       "'validation'")
    metrics = trainer.evaluate_checkpoint(config)
    assert metrics["step"] == 3 and metrics["eval/examples"] == 8
    records = [json.loads(line) for line in open(metrics["predictions"])]
    assert len(records) == 8 and all(len(r["retrieved"]) == 8 for r in records)
    # The metrics are those of the predictions written beside them (recomputed here).
    for k in (1, 5):
        assert metrics[f"eval/recall@{k}"] == pytest.approx(np.mean(
            [bool(set(r["gold_ids"]) & set(r["retrieved"][:k])) for r in records]))
    assert metrics["eval/em"] == pytest.approx(np.mean(
        [exact_match(r["prediction"], r["answers"]) for r in records]))
    inferred = trainer.evaluate_checkpoint(config, infer=True)
    assert inferred["eval/examples"] == 50  # the whole split, no eval_limit


def test_configuration_errors_name_the_binding(tmp_path):
    with pytest.raises(ValueError, match="batch_size = 6 must be a multiple"):
        launch(tmp_path / "a", "TRAIN_STEPS = 1", "TrainConfig.batch_size = 6")
    with pytest.raises(ValueError, match="vocab_size"):
        launch(tmp_path / "b", "TRAIN_STEPS = 1", "t5.T5Config.vocab_size = 100")
    with pytest.raises(ValueError, match="n_context"):
        launch(tmp_path / "c", "TRAIN_STEPS = 1", "TrainConfig.n_context = 9")

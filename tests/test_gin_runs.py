"""gin/runs/*.gin parse with the t5x macros bound and configure what their comments say."""
from __future__ import annotations

import gin
import pytest

from atlas_jax import gin_config
from atlas_jax.train import objectives, optimization, trainer
from atlas_jax.index import passage_index


@pytest.fixture(autouse=True)
def clear_gin():
    """Leave no bindings behind for later test files."""
    yield
    gin.clear_config(clear_constants=True)

MACROS = ["MODEL_DIR = '/tmp/run'", "READER_SPM = '/tmp/spiece.model'",
          "PASSAGES_FILE = '/tmp/passages.jsonl'", "QA_TRAIN_FILE = '/tmp/train.jsonl'"]


@pytest.mark.parametrize("name, task, steps, query_side, refresh", [
    ("pretrain", "passages_mlm", 10000, False, "0-1000:500,1000-1000000:2000"),
    ("finetune", "jsonl_qa", 5000, False, "0-5000:1000"),
    ("fewshot", "jsonl_qa", 30, True, "-1"),
    ("eval", "jsonl_qa", 0, False, "0-5000:1000"),
    ("infer", "jsonl_qa", 0, False, "0-5000:1000"),
    ("pod_v4_128_nq64", "jsonl_qa", 30, True, "-1"),
])
def test_run_files(name, task, steps, query_side, refresh):
    gin_config.parse(["models/tiny.gin", f"runs/{name}.gin"], MACROS)
    config = trainer.TrainConfig()
    assert (config.task, config.train_steps, config.query_side) == (task, steps, query_side)
    assert config.model_dir == "/tmp/run" and config.passages_file == "/tmp/passages.jsonl"
    assert passage_index.IndexConfig().refresh_schedule == refresh
    assert objectives.ObjectiveConfig().objective == "pdist"
    if steps:
        assert optimization.OptimizerConfig().total_steps == steps


def test_fewshot_is_the_published_64_shot_recipe():
    gin_config.parse(["models/tiny.gin", "runs/fewshot.gin"], MACROS)
    config, optimizer = trainer.TrainConfig(), optimization.OptimizerConfig()
    assert (config.n_context, config.retriever_n_context, config.train_steps) == (40, 40, 30)
    assert optimizer.reader_learning_rate == optimizer.retriever_learning_rate == 4e-5


def test_objective_file_overrides_and_missing_macro_is_named():
    gin_config.parse(["models/tiny.gin", "runs/finetune.gin", "objectives/emdr2.gin"], MACROS)
    assert objectives.ObjectiveConfig().objective == "emdr2"
    gin_config.parse(["models/tiny.gin", "runs/finetune.gin"], MACROS[1:])
    with pytest.raises(Exception, match="MODEL_DIR"):
        trainer.TrainConfig()


def test_synthetic_file():
    gin_config.parse(["runs/synthetic.gin"], ["MODEL_DIR = '/tmp/run'"])
    config = trainer.TrainConfig()
    assert config.task == "synthetic_qa" and config.train_steps == 300
    assert config.passages_file == "/tmp/run/synthetic_data/passages.jsonl"
    assert passage_index.IndexConfig().refresh_schedule == "10"
    assert config.n_context == config.retriever_n_context == 20  # ADist reads what it scores

"""Training with scanned layers (`scan_layers`, reader and retriever) on the (4, 2) mesh with
FSDP rules and ADist (the sown cross-attention of a scanned decoder): the same per-step losses
as the per-layer run, and a per-layer run's checkpoint evaluates under a scanned config."""
from __future__ import annotations

import json

import gin
import pytest

from atlas_jax.models import stacking
from atlas_jax.train import trainer
from tests.test_trainer import configure, launch

SCANNED = ["t5.T5Config.scan_layers = True", "retriever.RetrieverConfig.scan_layers = True",
           "t5.T5Config.remat = 'save_dots'", "retriever.RetrieverConfig.remat = 'full'"]
RUN = ["TRAIN_STEPS = 4", "PARTITIONING_RULES = 'fsdp'"]


@pytest.fixture(autouse=True)
def clear_gin():
    yield
    gin.clear_config(clear_constants=True)


def _losses(folder):
    return {r["step"]: r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").open())
            if "loss" in r}


def test_scanned_run_equals_per_layer_run_and_reads_its_checkpoint(tmp_path):
    files = ("runs/synthetic.gin", "objectives/adist.gin")
    per_layer = launch(tmp_path / "per_layer", *RUN, files=files)
    gin.clear_config(clear_constants=True)
    scanned = launch(tmp_path / "scanned", *RUN, *SCANNED, files=files)
    assert stacking.is_stacked(scanned.params) and not stacking.is_stacked(per_layer.params)
    ours, theirs = _losses(tmp_path / "scanned"), _losses(tmp_path / "per_layer")
    assert sorted(ours) == [1, 2, 3, 4]
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    # The per-layer run's step 4, evaluated by a scanned configuration (relayout on restore),
    # gives the per-layer evaluation.
    gin.clear_config(clear_constants=True)
    reference = trainer.evaluate_checkpoint(configure(tmp_path / "per_layer", *RUN, files=files))
    gin.clear_config(clear_constants=True)
    relaid = trainer.evaluate_checkpoint(configure(tmp_path / "per_layer", *RUN, *SCANNED,
                                                   files=files))
    assert relaid["step"] == reference["step"] == 4
    for key in ("eval/em", "eval/recall@1", "eval/recall@5"):
        assert relaid[key] == pytest.approx(reference[key]), key

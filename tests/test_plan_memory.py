"""`plan`'s per-device memory model moves as it must: activations shrink with each remat
policy (none > save_dots > save_dots_no_batch > full), scale linearly with the examples per
device, parameters and optimizer state divide by the FSDP devices, query-side training drops
the passage tower's activations, and the verdicts follow the totals."""
from __future__ import annotations

import gin
import pytest

from atlas_jax import gin_config, plan, plan_memory

BASE = ["models/base.gin", "runs/finetune.gin"]


@pytest.fixture(autouse=True)
def clear_gin():
    yield
    gin.clear_config(clear_constants=True)


def model(*bindings, files=BASE, mesh=(8, 1)):
    gin.clear_config(clear_constants=True)
    gin_config.parse(files, plan.PLACEHOLDERS + list(bindings))
    result = plan.plan(mesh, passages=1_000_000, compile_step=False)
    return result["memory_model"]


def test_remat_policies_order_the_activations_and_nothing_else():
    parts = {policy: model(f"t5.T5Config.remat = {policy!r}",
                           f"retriever.RetrieverConfig.remat = {policy!r}")["per_device"]
             for policy in ("none", "save_dots", "save_dots_no_batch", "full")}
    acts = [parts[p]["activations"] for p in ("none", "save_dots", "save_dots_no_batch", "full")]
    assert acts == sorted(acts, reverse=True) and len(set(acts)) == 4
    assert acts[0] > 5 * acts[-1]
    for key in ("params", "optimizer", "gradients", "index", "collectives", "working_set"):
        assert len({parts[p][key] for p in parts}) == 1, key
    # True is 'full', False is 'none'.
    assert model("t5.T5Config.remat = True", "retriever.RetrieverConfig.remat = True")[
        "per_device"]["activations"] == parts["full"]["activations"]


def test_activations_scale_with_the_batch_and_state_does_not():
    small = model("TrainConfig.batch_size = 16")["per_device"]
    large = model("TrainConfig.batch_size = 32")["per_device"]
    assert large["activations"] == pytest.approx(2 * small["activations"], rel=1e-6)
    assert large["working_set"] == pytest.approx(2 * small["working_set"], rel=1e-6)
    for key in ("params", "optimizer", "gradients", "index"):
        assert large[key] == small[key], key


def test_fsdp_divides_the_state_and_query_side_drops_the_passage_tower():
    replicated = model("PARTITIONING_RULES = 'model_parallel'")["per_device"]
    fsdp = model("PARTITIONING_RULES = 'fsdp'")["per_device"]
    assert fsdp["params"] < replicated["params"] / 4
    assert fsdp["optimizer"] < replicated["optimizer"] / 4
    assert fsdp["activations"] == replicated["activations"]
    query_side = model("TrainConfig.query_side = True")["per_device"]
    assert query_side["activations"] < replicated["activations"]
    assert query_side["gradients"] <= replicated["gradients"]


def test_verdicts_follow_the_total_and_the_largest_batch_fits():
    result = model("TrainConfig.batch_size = 16")
    total = result["per_device"]["total"]
    rows = result["verdicts"]
    assert [r["capacity_gib"] for r in rows] == [16, 32, 80, 141]
    for row in rows:
        assert row["fits"] == (total <= row["capacity_gib"] * plan_memory.GIB)
    assert [r["max_examples_per_device"] for r in rows] == sorted(
        r["max_examples_per_device"] for r in rows)
    # The largest batch the 80 GiB row names does fit there, one more example does not.
    best = rows[2]["max_examples_per_device"]
    assert best > 0
    at = model(f"TrainConfig.batch_size = {8 * best}")["per_device"]["total"]
    over = model(f"TrainConfig.batch_size = {8 * (best + 1)}")["per_device"]["total"]
    assert at <= 80 * plan_memory.GIB < over

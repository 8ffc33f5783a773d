"""`atlas-jax plan` on the tiny reader: parameter counts equal the real models', memory and
FLOPs come from the compiled step, the index shard is passages / devices x dim x bytes, the
JSON matches the table, and a mesh that cannot work is named."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import gin
import jax
import pytest

from atlas_jax import cli, gin_config, weights

SMALL = ["--gin.retriever.RetrieverConfig.hidden_size=32",
         "--gin.retriever.RetrieverConfig.num_layers=1",
         "--gin.retriever.RetrieverConfig.num_heads=4",
         "--gin.retriever.RetrieverConfig.mlp_dim=64",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 4}",
         "--gin.TrainConfig.batch_size=8", "--gin.TrainConfig.n_context=3",
         "--gin.TrainConfig.retriever_n_context=4", "--gin.TrainConfig.query_length=8"]
FILES = ["--gin_file=models/tiny.gin", "--gin_file=runs/finetune.gin"]


@pytest.fixture(autouse=True)
def clear_gin():
    """Leave no bindings behind for later test files."""
    yield
    gin.clear_config(clear_constants=True)


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_plan_of_the_tiny_reader(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "--mesh", "4x2", "--passages", "1001", "--dtype", "bfloat16",
                   f"--json={out}", "--gin.PARTITIONING_RULES='fsdp'", *FILES, *SMALL])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    # The real models of the same gin configuration, with real weights.
    gin_config.parse(["models/tiny.gin", "runs/finetune.gin"], SMALL)
    reader, retriever = weights.build_reader(), weights.build_retriever()
    assert result["params"]["reader"] == _count(reader.params) > 0
    assert result["params"]["retriever"] == _count(retriever.params) > 0
    assert result["params"]["frozen"] == 0  # finetune trains both towers
    assert result["mesh"] == {"data": 4, "model": 2, "devices": 8}
    assert result["partitioning"] == "fsdp"
    assert result["step"]["batch_size"] == 8 and result["step"]["n_context"] == 3
    assert result["step"]["passage_length"] == 24  # min(inputs, RetrieverConfig.max_length)
    memory = result["memory_per_device"]
    # Parameters + AdamW moments (float32, 3 copies) split over 8 devices at most fully.
    total_bytes = 3 * 4 * (result["params"]["reader"] + result["params"]["retriever"])
    assert total_bytes / 8 <= memory["arguments"] < total_bytes
    assert memory["temporaries"] > 0 and memory["outputs"] > 0
    assert memory["peak_estimate"] >= memory["arguments"]
    assert result["flops_per_device"] > 0
    assert result["flops_per_step"] == pytest.approx(8 * result["flops_per_device"])
    index = result["index"]
    assert index["rows_per_device"] == 126 and index["dim"] == 32  # ceil(1001 / 8)
    assert index["bytes_per_device"] == 126 * 32 * 2
    assert f"{result['params']['reader']:,}" in printed and "4 x 2 = 8 devices" in printed
    assert "index shard/device" in printed and "fsdp" in printed
    # The memory model's exact parts equal the compiled program's arguments: parameters and
    # AdamW state at their shardings, plus the batch (int32 ids, masks) and two scalars.
    model = result["memory_model"]["per_device"]
    batch = memory["arguments"] - model["params"] - model["optimizer"]
    assert 0 < batch < 0.05 * memory["arguments"]
    assert model["index"] == index["bytes_per_device"]
    assert "memory model per device" in printed and "141 GiB (H200)" in printed


@pytest.mark.parametrize("mesh, flags, message", [
    ("4-2", [], "DATAxMODEL"),
    ("0x2", [], "DATAxMODEL"),
    ("3x1", [], "batch_size = 8 is not a multiple of the mesh's data axis \\(3\\)"),
    ("1x8", ["--gin.t5.T5Config.num_heads=6"], "num_heads = 6 is not divisible"),
    ("4x2", ["--gin.PARTITIONING_RULES='data_parallel'"], "NUM_PARTITIONS = 1"),
    ("4x2", ["--gin.PARTITIONING_RULES='zero'"], "unknown"),
    ("8x1", ["--dtype=float64"], "--dtype 'float64'"),
])
def test_bad_plans_are_named(capfd, mesh, flags, message):
    assert cli.main(["plan", "--mesh", mesh, *FILES, *SMALL, *flags]) == 2
    err = capfd.readouterr().err
    assert err.startswith("atlas-jax plan: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_a_mesh_larger_than_this_process_reexecutes(tmp_path):
    """16 devices from a process that has 8: the command runs itself with 16 CPU devices."""
    out = tmp_path / "plan.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", "import jax, sys; jax.devices(); from atlas_jax import cli; "
         "sys.exit(cli.main(sys.argv[1:]))", "plan", "--mesh", "16x1", "--passages", "32",
         f"--json={out}", *FILES, *SMALL, "--gin.TrainConfig.batch_size=16"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mesh"]["devices"] == 16 and result["index"]["rows_per_device"] == 2
    assert "16 x 1 = 16 devices" in proc.stdout

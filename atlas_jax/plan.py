"""`atlas-jax plan`: memory, parameters, FLOPs and index shard size of a configuration's real
train step, compiled ahead of time for a simulated mesh (docs/design.md §5, §6).

    atlas-jax plan --gin_file=models/xxl.gin --gin_file=runs/finetune.gin --mesh 64x4 \
        --passages 32000000 --dtype bfloat16 --json plan.json

The step is the trainer's (`train.steps.make_train_step`: joint loss, gradients, clipped AdamW,
donated parameters and optimizer state) for the run's batch size, `n_context`,
`retriever_n_context` and TASK_FEATURE_LENGTHS, with the gin reader (`t5.T5Config`) and
retriever (`retriever.RetrieverConfig`) and the gin partitioning (PARTITIONING_RULES; the
model axis comes from `--mesh`, not NUM_PARTITIONS). Nothing is allocated: parameters,
optimizer state and batch are `jax.ShapeDtypeStruct`s with their shardings, lowered and
compiled by XLA's CPU backend on DATAxMODEL simulated host devices (the process re-executes
itself with that many devices when JAX already started with fewer). Numbers are per device:
the compiled program is the SPMD-partitioned one every device runs.

Retriever passages are `--passage_length` tokens (default min(TASK_FEATURE_LENGTHS inputs,
RetrieverConfig.max_length), as Atlas truncates them). The index shard is the passage
embeddings split by rows over every device (index/device.py): ceil(passages / devices) x
hidden_size x bytes of `--dtype`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

INDEX_DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}
# Run gins mark these %gin.REQUIRED; a plan reads no data, so placeholders stand in for them
# (a --gin. flag from the command line still wins).
PLACEHOLDERS = ["MODEL_DIR = '/nonexistent/atlas-jax-plan'",
                "PASSAGES_FILE = '/nonexistent/atlas-jax-plan/passages.jsonl'"]


class PlanError(ValueError):
    """A configuration or mesh that cannot be planned; the message says why."""


def parse_mesh(text: str) -> tuple[int, int]:
    """'DATAxMODEL' (e.g. '64x4') -> (64, 4)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise PlanError(f"--mesh {text!r}: give DATAxMODEL with positive integers, e.g. 8x1 or "
                        "64x4 (data-parallel size x model-parallel size)")
    return int(match[1]), int(match[2])


# ----------------------------------------------------------------------------- the step

@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The shapes one train step sees."""
    batch_size: int
    n_context: int            # passages the reader reads
    retrieved: int            # passages the retriever scores (retriever_n_context)
    reader_length: int        # tokens per reader passage
    target_length: int
    query_length: int
    passage_length: int       # retriever tokens per passage


def step_shapes(config: Any, retriever_config: Any, passage_length: int | None = None
                ) -> StepShapes:
    reader_length = int(config.feature_lengths["inputs"])
    closed_book = config.closed_book
    return StepShapes(
        batch_size=config.batch_size, n_context=1 if closed_book else config.n_context,
        retrieved=1 if closed_book else config.retriever_n_context,
        reader_length=reader_length, target_length=int(config.feature_lengths["targets"]),
        query_length=config.query_length,
        passage_length=passage_length or min(reader_length, retriever_config.max_length))


def batch_specs(shapes: StepShapes, closed_book: bool = False,
                stored_embedding_dim: int | None = None) -> dict[str, tuple]:
    """name -> (shape, dtype) of a joint-loss batch (joint_loss.py; train_data.assemble);
    `stored_embedding_dim`: query-side batches carry the index rows of their passages."""
    b, k = shapes.batch_size, shapes.retrieved
    specs = {"targets": ((b, shapes.target_length), "int32"),
             "target_mask": ((b, shapes.target_length), "int32"),
             "decoder_input_ids": ((b, shapes.target_length), "int32"),
             "reader_ids": ((b, k, shapes.reader_length), "int32")}
    if not closed_book:
        specs.update(query_ids=((b, shapes.query_length), "int32"),
                     query_mask=((b, shapes.query_length), "int32"),
                     passage_ids=((b, k, shapes.passage_length), "int32"),
                     passage_mask=((b, k, shapes.passage_length), "int32"),
                     passage_valid=((b, k), "bool"))
        if stored_embedding_dim:
            specs["passage_embeddings"] = ((b, k, stored_embedding_dim), "float32")
    return specs


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What the train step needs: the models on the mesh, the objective and the optimizer."""
    state: Any                 # train.state.ModelState
    objective: Any             # objectives.ObjectiveConfig
    optimizer: Any             # optax.GradientTransformation
    n_context: int


def build_step_run(config: Any, mesh: Any, rules: Any, params: dict | None = None
                   ) -> StepParts:
    """The train step's parts from the gin model configs; no data, index or vocabulary.

    params None: abstract parameters (`jax.ShapeDtypeStruct`s carrying their shardings).
    Otherwise {"reader": ..., "retriever": ...} host trees, placed on the mesh like
    `trainer.build_run` places them (frozen copies added per the run's settings).
    """
    from atlas_jax import weights
    from atlas_jax.models import fid, retriever as retriever_lib, t5
    from atlas_jax.train import joint_loss, objectives, optimization, state as state_lib

    objective = objectives.ObjectiveConfig()
    if config.closed_book:
        objective = dataclasses.replace(objective, objective="none")
    reader_config, retriever_config = t5.T5Config(), retriever_lib.RetrieverConfig()
    models = joint_loss.JointModels(fid.FusionInDecoder(reader_config),
                                    retriever_lib.DualEncoder(retriever_config))
    if params is None:
        reader_params, retriever_params = state_lib.abstract_params(models)
    else:
        reader_params, retriever_params = params["reader"], params["retriever"]
    groups = state_lib.param_groups(reader_params, retriever_params,
                                    objective.objective != "none", config.query_side)
    state = state_lib.build_state(models, weights.Retriever(retriever_config, retriever_params),
                                  groups, mesh, rules, abstract=params is None)
    optimizer = optimization.make_optimizer(optimization.OptimizerConfig(), state.params)
    return StepParts(state, objective, optimizer,
                     config.n_context if not config.closed_book else 1)


def abstract_opt_state(run: StepParts) -> Any:
    """The optimizer state as ShapeDtypeStructs with the shardings `init_opt_state` gives."""
    from atlas_jax.train import steps
    return steps.abstract_opt_state(run.state, run.optimizer, run.state.params)


def check_divides(shapes: StepShapes, mesh_shape: tuple[int, int], reader_config: Any,
                  retriever_config: Any) -> None:
    """Clear errors for a mesh the batch or the attention heads do not divide."""
    data, model = mesh_shape
    if shapes.batch_size % data:
        raise PlanError(f"TrainConfig.batch_size = {shapes.batch_size} is not a multiple of "
                        f"the mesh's data axis ({data}); pick a mesh DATAxMODEL with DATA "
                        f"dividing {shapes.batch_size}, or bind another batch size")
    if model > 1:
        for name, heads in (("t5.T5Config.num_heads", reader_config.num_heads),
                            ("retriever.RetrieverConfig.num_heads", retriever_config.num_heads)):
            if heads % model:
                raise PlanError(f"{name} = {heads} is not divisible by the mesh's model axis "
                                f"({model}); pick MODEL dividing {heads}")


# ----------------------------------------------------------------------------- the plan

def _tree_size(tree: Any) -> int:
    import jax
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _tree_bytes(tree: Any) -> int:
    import jax
    import numpy as np
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def _memory_model(run: StepParts, opt_state: Any, shapes: StepShapes, reader_config: Any,
                  retriever_config: Any, mesh_shape: tuple[int, int], rules: Any,
                  index_bytes: int) -> dict[str, Any]:
    from atlas_jax import partitioning, plan_memory
    data, model = mesh_shape
    trained = "retriever" in run.state.params
    step = plan_memory.StepModel(
        examples=shapes.batch_size // data, n_context=shapes.n_context,
        retrieved=shapes.retrieved, reader_length=shapes.reader_length,
        target_length=shapes.target_length, query_length=shapes.query_length,
        passage_length=shapes.passage_length, model_axis=model,
        passage_tower_trained=trained and "frozen_passage_tower" not in run.state.params,
        retriever_trained=trained)
    parts = plan_memory.model_memory(run.state, opt_state, step, reader_config,
                                     retriever_config, partitioning.rules_name(rules) == "fsdp",
                                     index_bytes)
    return {"per_device": parts, "examples_per_device": step.examples,
            "verdicts": plan_memory.verdicts(parts, step, reader_config, retriever_config, data),
            "step_model": dataclasses.asdict(step)}


def _abstract_inputs(mesh: Any, shapes: StepShapes, config: Any, retriever_config: Any,
                     run: StepParts) -> tuple[dict, Any, Any]:
    """(batch, rng, loss scale) of the step as ShapeDtypeStructs with their shardings."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from atlas_jax import partitioning
    batch = {name: jax.ShapeDtypeStruct(shape, dtype,
                                        sharding=partitioning.batch_sharding(mesh, len(shape)))
             for name, (shape, dtype) in batch_specs(
                 shapes, config.closed_book, retriever_config.hidden_size
                 if "frozen_passage_tower" in run.state.params else None).items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    return batch, rng, jax.ShapeDtypeStruct((), np.float32, sharding=replicated)


def _compile(step: Any, arguments: tuple) -> tuple[Any, dict[str, float]]:
    """The compiled step and the seconds of its lowering and its XLA compile."""
    started = time.perf_counter()
    lowered = step.lower(*arguments)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {"lower": lowered_at - started,
                      "compile": time.perf_counter() - lowered_at}


def plan(mesh_shape: tuple[int, int], passages: int = 0, index_dtype: str = "bfloat16",
         passage_length: int | None = None, compile_step: bool = True) -> dict[str, Any]:
    """Compiles the gin-configured train step for `mesh_shape` and returns its numbers, with
    the per-device memory model (plan_memory.py); `compile_step=False`: the model only.

    Gin must be parsed; JAX must have at least data x model (CPU) devices.
    """
    import jax

    from atlas_jax import partitioning
    from atlas_jax.models import retriever as retriever_lib, t5
    from atlas_jax.train import steps, trainer

    data, model = mesh_shape
    devices = data * model
    if passages < 0:
        raise PlanError(f"--passages {passages}: must be >= 0")
    config = trainer.TrainConfig()
    reader_config, retriever_config = t5.T5Config(), retriever_lib.RetrieverConfig()
    if index_dtype not in INDEX_DTYPE_BYTES:
        raise PlanError(f"--dtype {index_dtype!r}: the index stores one of "
                        f"{', '.join(INDEX_DTYPE_BYTES)}")
    rules = partitioning.logical_axis_rules()
    shapes = step_shapes(config, retriever_config, passage_length)
    check_divides(shapes, mesh_shape, reader_config, retriever_config)
    mesh = partitioning.create_mesh(mesh_shape, jax.devices()[:devices])
    partitioning.check_rules_fit_mesh(rules, mesh)
    run = build_step_run(config, mesh, rules)
    opt_state = abstract_opt_state(run)
    batch, rng, loss_scale = _abstract_inputs(mesh, shapes, config, retriever_config, run)
    rows = -(-passages // devices)
    dim = retriever_config.hidden_size
    index_bytes = int(math.ceil(rows * dim * INDEX_DTYPE_BYTES[index_dtype]))
    memory_model = _memory_model(run, opt_state, shapes, reader_config,
                                 retriever_config, mesh_shape, rules, index_bytes)
    if not compile_step:
        return {"mesh": {"data": data, "model": model, "devices": devices},
                "partitioning": partitioning.rules_name(rules),
                "step": dataclasses.asdict(shapes), "memory_model": memory_model}
    step = steps.make_train_step(run.state, run.objective, run.optimizer, run.n_context,
                                 opt_state)
    compiled, seconds = _compile(step, (run.state.params, opt_state, batch, rng, loss_scale))
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    argument, output = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
    alias, temp = int(memory.alias_size_in_bytes), int(memory.temp_size_in_bytes)
    flops = float(cost.get("flops", 0.0))
    trained_retriever = run.state.params.get("retriever", {})
    frozen = {k: v for k, v in run.state.params.items() if k.startswith("frozen")}
    return {
        "mesh": {"data": data, "model": model, "devices": devices},
        "partitioning": partitioning.rules_name(rules),
        "reader": {"emb_dim": reader_config.emb_dim, "num_heads": reader_config.num_heads,
                   "layers": [reader_config.num_encoder_layers,
                              reader_config.num_decoder_layers],
                   "mlp_dim": reader_config.mlp_dim, "dtype": reader_config.dtype,
                   "remat": reader_config.remat, "scan_layers": reader_config.scan_layers},
        "seconds": seconds,
        "step": dataclasses.asdict(shapes),
        "params": {"reader": _tree_size(run.state.params["reader"]),
                   "retriever": _tree_size(trained_retriever),
                   "frozen": _tree_size(frozen),
                   "bytes": _tree_bytes(run.state.params)},
        "memory_per_device": {"arguments": argument, "outputs": output, "aliased": alias,
                              "temporaries": temp,
                              "peak_estimate": argument + output - alias + temp},
        "flops_per_device": flops,
        "flops_per_step": flops * devices,
        "index": {"passages": passages, "dim": dim, "dtype": index_dtype,
                  "rows_per_device": rows,
                  "bytes_per_device": index_bytes},
        "memory_model": memory_model,
    }


def _gib(value: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def format_table(result: dict[str, Any]) -> str:
    """The plan as an aligned two-column table, then the memory model and its verdicts."""
    from atlas_jax import plan_memory
    model = result["memory_model"]
    verdicts = plan_memory.format_memory(
        model["per_device"], model["verdicts"],
        plan_memory.StepModel(**model["step_model"]))
    if "params" not in result:         # --model_only
        return verdicts
    return _compiled_table(result) + "\n" + verdicts


def _compiled_table(result: dict[str, Any]) -> str:
    mesh, params, memory, index = (result["mesh"], result["params"],
                                   result["memory_per_device"], result["index"])
    step = result["step"]
    rows = [
        ("mesh (data x model)", f"{mesh['data']} x {mesh['model']} = {mesh['devices']} devices"),
        ("partitioning", result["partitioning"]),
        ("step", f"batch {step['batch_size']}, reader {step['n_context']} x "
                 f"{step['reader_length']} tokens, retriever {step['retrieved']} x "
                 f"{step['passage_length']}, targets {step['target_length']}"),
        ("params reader", f"{params['reader']:,}"),
        ("params retriever", f"{params['retriever']:,}"
                             + (f" (+ {params['frozen']:,} frozen)" if params["frozen"] else "")),
        ("memory/device arguments", _gib(memory["arguments"])),
        ("memory/device outputs", _gib(memory["outputs"])
                                  + f" ({_gib(memory['aliased'])} aliased to arguments)"),
        ("memory/device temporaries", _gib(memory["temporaries"])),
        ("memory/device peak estimate", _gib(memory["peak_estimate"])),
        ("FLOPs/step per device", f"{result['flops_per_device']:.3e}" + (
            " (scanned: XLA counts each loop body once)" if result["reader"]["scan_layers"]
            else "")),
        ("FLOPs/step all devices", f"{result['flops_per_step']:.3e}"),
        ("index shard/device", f"{_gib(index['bytes_per_device'])} ({index['rows_per_device']:,}"
                               f" rows x {index['dim']} x {index['dtype']}; "
                               f"{index['passages']:,} passages)"),
        ("lower + compile (XLA:CPU)", f"{result['seconds']['lower']:.1f} s + "
                                      f"{result['seconds']['compile']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", required=True, help="DATAxMODEL, e.g. 64x4")
    parser.add_argument("--passages", type=int, default=0,
                        help="passages in the index (for the index shard size)")
    parser.add_argument("--dtype", default="bfloat16", help="index storage: "
                        + ", ".join(INDEX_DTYPE_BYTES))
    parser.add_argument("--passage_length", type=int, default=None,
                        help="retriever tokens per passage (default min(inputs length, "
                             "RetrieverConfig.max_length))")
    parser.add_argument("--json", default=None, help="also write the plan as JSON here")
    parser.add_argument("--model_only", action="store_true",
                        help="the memory model and its verdicts only (no XLA compile: seconds "
                             "instead of minutes)")
    parser.epilog = ("flags: --gin_file=FILE (repeatable), --gin.NAME=VALUE, "
                     "--gin_search_paths=DIR,...")
    parser.set_defaults(run=run, takes_gin_flags=True, gin_flags=[])


def _jax_devices_ready(count: int) -> bool:
    """Makes `count` CPU devices available in this process if JAX has not started; False
    when it already runs with fewer (the caller re-executes)."""
    import jax
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        return jax.default_backend() == "cpu" and jax.device_count() >= count
    flags = os.environ.get("XLA_FLAGS", "")
    asked = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
    count = max([count] + [int(n) for n in asked])  # never fewer than the environment asks
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags)
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={count}").strip()
    jax.config.update("jax_platforms", "cpu")
    return jax.device_count() >= count


def _reexecute(args: argparse.Namespace, devices: int) -> int:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        flags + f" --xla_force_host_platform_device_count={devices}").strip())
    argv = [sys.executable, "-m", "atlas_jax.cli", "plan", f"--mesh={args.mesh}",
            f"--passages={args.passages}", f"--dtype={args.dtype}", *args.gin_flags]
    if args.passage_length:
        argv.append(f"--passage_length={args.passage_length}")
    if args.json:
        argv.append(f"--json={args.json}")
    if args.model_only:
        argv.append("--model_only")
    return subprocess.call(argv, env=env)


def run(args: argparse.Namespace) -> int:
    from atlas_jax import gin_config
    try:
        data, model = parse_mesh(args.mesh)
        files, bindings, paths = gin_config.split_flags(list(args.gin_flags))
        if not files:
            raise PlanError("give at least one --gin_file (e.g. --gin_file=models/base.gin "
                            "--gin_file=runs/finetune.gin)")
        if not _jax_devices_ready(data * model):
            return _reexecute(args, data * model)
        gin_config.parse(files, PLACEHOLDERS + bindings, paths)
        result = plan((data, model), args.passages, args.dtype, args.passage_length,
                      compile_step=not args.model_only)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # gin appends "In call to configurable ..." lines; the first line says it all.
        print(f"atlas-jax plan: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        from atlas_jax import fileio
        fileio.atomic_write_json(args.json, result, indent=2)
    return 0

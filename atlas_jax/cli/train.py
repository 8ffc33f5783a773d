"""`atlas-jax train|eval|infer` with t5x's flags: `--gin_file` (repeatable), `--gin.NAME=VALUE`,
`--gin_search_paths`.

    atlas-jax train --gin_file=runs/synthetic.gin --gin_file=objectives/pdist.gin \
        --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=300

A gin binding that does not parse, a file not on the search path, or a configuration error
(e.g. a missing MODEL_DIR) exits with status 2 and one line naming it.

Multi-host: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on every
process (or ATLAS_* / JAX_* environment variables, or gin `DistributedConfig`; SLURM and
Cloud TPU are detected), see `atlas_jax.distributed`.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("flags: --gin_file=FILE (repeatable), --gin.NAME=VALUE, "
                     "--gin_search_paths=DIR,...")
    parser.add_argument("--coordinator_address", default=None,
                        help="multi-host: HOST:PORT of process 0 (ATLAS_COORDINATOR_ADDRESS)")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="multi-host: number of processes (ATLAS_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, default=None,
                        help="multi-host: this process, 0 .. num_processes - 1 "
                             "(ATLAS_PROCESS_ID)")
    parser.set_defaults(run=run, takes_gin_flags=True, gin_flags=[])


def run(args: argparse.Namespace) -> int:
    from atlas_jax import distributed, gin_config
    from atlas_jax.cli import common
    try:
        files, bindings, paths = gin_config.split_flags(list(args.gin_flags))
        if not files:
            raise ValueError("give at least one --gin_file (e.g. --gin_file=runs/synthetic.gin)")
        gin_config.parse(files, bindings, paths)
        # Before anything creates JAX devices; gin may hold DistributedConfig bindings.
        try:
            distributed.initialize(args.coordinator_address, args.num_processes,
                                   args.process_id)
        except RuntimeError as e:  # could not reach the coordinator, or JAX started too early
            raise ValueError(f"distributed initialisation failed: {e}") from None
        import atlas_jax_tasks
        from atlas_jax import checkpoints, fileio
        from atlas_jax.train import trainer
        # Every check before the first side effect (registering tasks may generate their
        # data): the configuration, the output folder, the checkpoint to evaluate.
        config = trainer.TrainConfig()
        if args.command == "train":
            fileio.check_output(config.run_dir, checkpoints.RUN_KIND,
                                legacy=checkpoints.is_legacy_run)
        elif not trainer.has_checkpoint(config):
            raise FileNotFoundError(f"{config.run_dir / 'checkpoints'}: no checkpoint to "
                                    "evaluate (train first, or point MODEL_DIR at a run)")
        atlas_jax_tasks.register_configured_tasks()
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"atlas-jax {args.command}: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "train":
            result = trainer.train(config)
        else:
            metrics = trainer.evaluate_checkpoint(config, infer=args.command == "infer")
    except common.unreadable_input_errors() as e:  # a checkpoint, index or reader that won't load
        # One line: gin appends "In call to configurable ..." lines to errors it passes on.
        print(f"atlas-jax {args.command}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.command == "train":
        if distributed.is_primary():
            print(f"trained to step {result.step} in {result.wall_seconds:.1f} s (index "
                  f"refresh {result.refresh_seconds:.1f} s); run directory {config.model_dir}")
        return 0
    for key, value in metrics.items() if distributed.is_primary() else ():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0

"""What the commands share: the errors of unusable input files, and the `pretrain` command of
the shipped models (reader and retriever)."""
from __future__ import annotations

import json
import sys


def unreadable_input_errors() -> tuple[type[Exception], ...]:
    """The errors of files a run reads that cannot be used (a corrupt or mismatched
    checkpoint, index, reader or passages file); each names the file in one line."""
    from atlas_jax import checkpoints, weights
    from atlas_jax.index import passage_index, passages
    return (checkpoints.CheckpointCorruptError, checkpoints.CheckpointMismatchError,
            weights.CheckpointError, passage_index.IndexLoadError, passages.PassageFileError)


def run_pretrain(args, name: str, default_gin: str, make_config, train) -> int:
    """`atlas-jax NAME pretrain [gin flags]`: parse the gin files and bindings (default
    `default_gin`), build the config, train; errors are one line and exit status 2."""
    from atlas_jax import gin_config
    try:
        files, bindings, paths = gin_config.split_flags(list(args.gin_flags))
        gin_config.parse(files or [default_gin], bindings, paths)
        config = make_config()
    except (ValueError, FileNotFoundError) as e:
        print(f"atlas-jax {name} pretrain: {e}", file=sys.stderr)
        return 2
    try:
        record = train(config)
    except unreadable_input_errors() as e:  # e.g. an unreadable checkpoint to resume from
        print(f"atlas-jax {name} pretrain: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0

"""`atlas-jax reader pretrain | export`: the command line of `reader_pretrain` and
`reader_export` (kept apart so that neither module imports the other).

    atlas-jax reader pretrain --gin_file=runs/reader_pretrain.gin --gin.MODEL_DIR="'/tmp/r'"
    atlas-jax reader export --run /tmp/r --out atlas_jax/readers/ledger_t5
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="reader_command", required=True)
    pretrain = sub.add_parser("pretrain", help="pre-train the reader (gin flags)")
    pretrain.set_defaults(run=_run_pretrain, takes_gin_flags=True, gin_flags=[])
    export = sub.add_parser("export", help="write a run's reader as a Hugging Face T5 folder "
                            "with its vocabulary and model card")
    export.add_argument("--run", dest="run_dir", required=True,
                        help="the pre-training MODEL_DIR")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(run=_run_export, takes_gin_flags=False)


def _run_pretrain(args) -> int:
    from atlas_jax.ledger import reader_pretrain
    from atlas_jax.cli.common import run_pretrain
    return run_pretrain(args, "reader", "runs/reader_pretrain.gin",
                        lambda: reader_pretrain.ReaderPretrainConfig(), reader_pretrain.train)


def _run_export(args) -> int:
    from atlas_jax.ledger import reader_export
    return reader_export.main(args)

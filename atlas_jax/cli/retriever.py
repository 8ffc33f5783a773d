"""`atlas-jax retriever pretrain | export`: the shipped ledger retriever
(`retriever_pretrain`, `retriever_export`).

    atlas-jax retriever pretrain --gin_file=runs/retriever_pretrain.gin --gin.MODEL_DIR="'/tmp/q'"
    atlas-jax retriever export --run /tmp/q --out atlas_jax/retrievers/ledger_minilm
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="retriever_command", required=True)
    pretrain = sub.add_parser("pretrain", help="pre-train the retriever (gin flags)")
    pretrain.set_defaults(run=_run_pretrain, takes_gin_flags=True, gin_flags=[])
    export = sub.add_parser("export", help="write a run's retriever as a sentence-transformers "
                            "folder with its model card")
    export.add_argument("--run", dest="run_dir", required=True,
                        help="the pre-training MODEL_DIR")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(run=_run_export, takes_gin_flags=False)


def _run_pretrain(args) -> int:
    from atlas_jax.ledger import retriever_pretrain
    from atlas_jax.cli.common import run_pretrain
    return run_pretrain(args, "retriever", "runs/retriever_pretrain.gin",
                        lambda: retriever_pretrain.RetrieverPretrainConfig(),
                        retriever_pretrain.train)


def _run_export(args) -> int:
    from atlas_jax.ledger import retriever_export
    return retriever_export.main(args)

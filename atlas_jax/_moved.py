"""Old module names of the modules that moved into packages (`atlas_jax.trainer` is now
`atlas_jax.train.trainer`, ...): user gin files (`from atlas_jax import trainer`), saved run
configs and scripts written against them keep importing the same module objects."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "trainer": "atlas_jax.train.trainer",
    "train_data": "atlas_jax.train.data",
    "joint_loss": "atlas_jax.train.joint_loss",
    "objectives": "atlas_jax.train.objectives",
    "optimization": "atlas_jax.train.optimization",
    "train_commands": "atlas_jax.cli.train",
    "data_commands": "atlas_jax.cli.data",
    "ledger_commands": "atlas_jax.cli.ledger",
    "reader_commands": "atlas_jax.cli.reader",
    "retriever_commands": "atlas_jax.cli.retriever",
    "ask": "atlas_jax.cli.ask",
    "demo_args": "atlas_jax.ledger.run_folder",
    "demo_eval": "atlas_jax.demo.evaluation",
    "demo_report": "atlas_jax.demo.report",
    "ledger_qa": "atlas_jax.ledger.qa",
    "ledger_sync": "atlas_jax.ledger.sync",
    "ledger_checks": "atlas_jax.ledger.checks",
    "serve": "atlas_jax.ledger.serve",
    "serve_page": "atlas_jax.ledger.serve_page",
    "reader_pretrain": "atlas_jax.ledger.reader_pretrain",
    "reader_export": "atlas_jax.ledger.reader_export",
    "retriever_pretrain": "atlas_jax.ledger.retriever_pretrain",
    "retriever_export": "atlas_jax.ledger.retriever_export",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `atlas_jax.<old name>` and hands back the moved module itself."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "atlas_jax" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name.rpartition(".")[2]])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())

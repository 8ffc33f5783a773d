"""The package layout: the module names from before the move into packages still import the
same module objects (user gin files, saved run configs, scripts), and the core never imports
the task package."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import gin
import pytest

from atlas_jax import _moved

ROOT = Path(__file__).resolve().parents[1]
# Packages allowed to import atlas_jax_tasks: the ledger / demo glue, the commands (task
# registration).
GLUE = ("atlas_jax/ledger/", "atlas_jax/demo/", "atlas_jax/cli/", "atlas_jax/fava/")


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_module_name_is_the_moved_module(old):
    assert importlib.import_module(f"atlas_jax.{old}") is importlib.import_module(
        _moved.MOVED[old])


def test_a_gin_file_written_against_the_old_names_still_binds():
    gin.clear_config()
    try:
        gin.parse_config("\n".join([
            "from __gin__ import dynamic_registration",
            "from atlas_jax import trainer",
            "from atlas_jax import optimization",
            "optimization.OptimizerConfig.reader_learning_rate = 0.125",
            "optimization.OptimizerConfig.schedule = 'constant'"]))
        from atlas_jax.train.optimization import OptimizerConfig
        assert OptimizerConfig().reader_learning_rate == 0.125
    finally:
        gin.clear_config()


def test_an_unknown_old_name_is_still_an_import_error():
    with pytest.raises(ImportError):
        importlib.import_module("atlas_jax.no_such_module")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_glue_imports_the_task_package():
    offenders = []
    for path in sorted((ROOT / "atlas_jax").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(GLUE):
            continue
        if any(n == "atlas_jax_tasks" or n.startswith("atlas_jax_tasks.")
               for n in _imports(path)):
            offenders.append(relative)
    assert offenders == []


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] == "atlas_jax_tasks":
        parts[0] = "tasks"
    elif parts[0] != "atlas_jax":
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _closure(start: str) -> set[str]:
    """Every project module `start` imports, directly or not (function-local imports too)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                todo.append(node.module)
                todo.extend(f"{node.module}.{a.name}" for a in node.names)
    return seen


@pytest.mark.parametrize("command", ["atlas_jax.cli.ask", "atlas_jax.ledger.serve"])
def test_answering_imports_no_trainer_or_demo(command):
    reached = _closure(command)
    assert "atlas_jax.ledger.qa" in reached and "atlas_jax.inference" in reached
    assert sorted(m for m in reached if m == "atlas_jax.train.trainer"
                  or m.startswith("atlas_jax.demo")) == []

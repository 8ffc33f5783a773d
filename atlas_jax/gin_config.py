"""Gin set-up shared by every `atlas-jax` command: the packaged gin folder is on the default
search path, and files/bindings are parsed the way t5x parses `--gin_file` / `--gin.X=V`."""
from __future__ import annotations

import contextlib
import importlib.resources
import logging
from pathlib import Path
from typing import Sequence

import gin


def default_search_paths() -> list[str]:
    """The gin folder shipped with the package: `atlas_jax/gin/` in an installed wheel (setup.py
    maps the repository's `gin/` there), the repository's `gin/` in a source or editable
    checkout."""
    package = Path(str(importlib.resources.files("atlas_jax")))
    for candidate in (package / "gin", package.parent / "gin"):
        if (candidate / "models").is_dir():
            return [str(candidate)]
    raise FileNotFoundError(f"atlas-jax gin folder not found next to {package}")


_registered_search_paths: set[str] = set()


def _drop_search_misses(record: logging.LogRecord) -> bool:
    # gin logs "Path not found" for every search-path entry it tries before the one that holds
    # the file; a file missing everywhere still raises.
    return not str(record.msg).startswith("Path not found")


@contextlib.contextmanager
def _quiet_search():
    root = logging.getLogger()
    root.addFilter(_drop_search_misses)
    try:
        yield
    finally:
        root.removeFilter(_drop_search_misses)


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
          search_paths: Sequence[str] = (), finalize: bool = False) -> None:
    """Clears gin and parses `gin_files` then `bindings` (t5x `--gin.NAME=VALUE` strings are
    accepted with or without the `--gin.` prefix). A file that is not found on the search
    path, or a binding gin cannot apply, raises an error naming it."""
    gin.clear_config(clear_constants=True)
    searched = ["."] + list(search_paths) + default_search_paths()
    for path in searched[1:]:
        if path not in _registered_search_paths:  # gin keeps every path it is given
            gin.add_config_file_search_path(path)
            _registered_search_paths.add(path)
    # Importing the modules registers their configurables before the files refer to them.
    import atlas_jax.models.retriever  # noqa: F401
    import atlas_jax.models.t5  # noqa: F401
    import atlas_jax.weights  # noqa: F401
    cleaned = [b[len("--gin."):] if b.startswith("--gin.") else b for b in bindings]
    for file in gin_files:
        if not any((Path(p) / file).exists() for p in searched):
            raise FileNotFoundError(f"gin file {file!r} not found (searched: {searched})")
    with _quiet_search():
        gin.parse_config_files_and_bindings(list(gin_files), None, finalize_config=False)
    for binding in cleaned:
        try:
            gin.parse_config(binding)
        except Exception as e:  # gin raises several types; name the flag the user wrote
            raise ValueError(f"gin binding --gin.{binding}: {e}") from None
    if finalize:
        gin.finalize()

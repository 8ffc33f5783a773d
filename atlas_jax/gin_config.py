"""Gin set-up shared by every `atlas-jax` command: the packaged gin folder is on the default
search path, and files/bindings are parsed the way t5x parses `--gin_file` / `--gin.X=V`."""
from __future__ import annotations

import contextlib
import difflib
import importlib.resources
import logging
import re
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


_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_]\w*)\s*=")


def known_macros() -> set[str] | None:
    """The macros the parsed configuration defines (`NAME = ...`) or uses (`%NAME`); None if
    this gin version does not expose its bindings (then no macro is refused)."""
    config = getattr(gin.config, "_CONFIG", None)
    reference = getattr(gin.config, "ConfigurableReference", None)
    if not isinstance(config, dict) or reference is None:
        return None
    names: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, reference):
            selector = getattr(value, "_scoped_selector", "")
            if selector.endswith("gin.macro"):
                names.add(selector[:-len("gin.macro")].rstrip("/").split("/")[-1])
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    for key, params in config.items():
        if isinstance(key, tuple) and len(key) == 2 and key[1] == "gin.macro":
            names.add(key[0].split("/")[-1])
        for value in (params or {}).values():
            walk(value)
    return names


def split_flags(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """t5x-style command-line gin flags -> (gin files, bindings, search paths):
    `--gin_file=FILE` (repeatable), `--gin.NAME=VALUE`, `--gin_search_paths=DIR,...`;
    ValueError naming anything else."""
    files, bindings, paths, rest = [], [], [], []
    for arg in argv:
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin_search_paths="):
            paths += [p for p in arg.split("=", 1)[1].split(",") if p]
        elif arg.startswith("--gin."):
            bindings.append(arg)
        else:
            rest.append(arg)
    if rest:
        raise ValueError(f"unrecognised arguments: {' '.join(rest)} (use --gin_file=FILE, "
                         "--gin.NAME=VALUE, --gin_search_paths=DIR)")
    return files, bindings, paths


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
          search_paths: Sequence[str] = (), finalize: bool = False) -> None:
    """Clears gin and parses `gin_files` then `bindings` (t5x `--gin.NAME=VALUE` strings are
    accepted with or without the `--gin.` prefix). A file that is not found on the search
    path, or a binding gin cannot apply, raises an error naming it. A user binding (one with
    the `--gin.` prefix) of a macro that neither the files nor earlier bindings define or use
    is refused, naming the closest known macro: `--gin.TRAIN_STEPZ=80` would otherwise be a
    new macro that nothing reads. Bindings without the prefix (the commands' own) may
    define new macros."""
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
    for file in gin_files:
        if not any((Path(p) / file).exists() for p in searched):
            raise FileNotFoundError(f"gin file {file!r} not found (searched: {searched})")
    with _quiet_search():
        gin.parse_config_files_and_bindings(list(gin_files), None, finalize_config=False)
    known = known_macros()
    for raw in bindings:
        user = raw.startswith("--gin.")
        binding = raw[len("--gin."):] if user else raw
        macro = _MACRO_BINDING.match(binding)
        if user and macro and known is not None and macro.group(1) not in known:
            # gin would accept it as a new macro that nothing reads: a typo goes unnoticed.
            name = macro.group(1)
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "no macro of the gin files is close"
            raise ValueError(f"gin binding --gin.{binding}: unknown macro {name} (the gin files "
                             f"neither define nor use it); {hint}")
        try:
            gin.parse_config(binding)
        except Exception as e:  # gin raises several types; name the flag the user wrote
            raise ValueError(f"gin binding --gin.{binding}: {e}") from None
        if macro and known is not None:
            known.add(macro.group(1))
    if finalize:
        gin.finalize()

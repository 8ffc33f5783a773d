"""A demo run folder: the demo's gin and the arguments the folder keeps to be reloaded
(`demo_args.json`). The demo writes it; `ask`, `serve` and `ledger sync` read it back.

A run folder is relocatable: `demo_args.json` stores the user's gin files as copies inside
the folder (`gin/NN_<name>`, paths relative to it), search paths made absolute, and the
reader vocabulary size; the macros that name files of the run (`LEDGER_DIR`, `READER_SPM`,
`PASSAGES_FILE`, `DEMO_DIR`) are rebuilt from wherever the folder is when it is loaded
(`parse_run_gin`), so `ask`, `serve` and `ledger sync` work after a move or from any working
directory. Folders written before this (no `reader_vocab_size` key) are parsed as they were.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from atlas_jax import fileio

ARGS_FILE = "demo_args.json"
DEMO_GIN = "runs/demo.gin"
# The quick variant (`--quick`): a one-year ledger and a few steps per stage, for tests.
QUICK_GIN = "runs/demo_quick.gin"
GIN_COPIES = "gin"
PASSAGES_BEFORE_CUTOFF = "passages_before_cutoff.jsonl"


def parse_gin(out: Path, quick: bool, gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str], extra: Sequence[str] = ()) -> None:
    """Parses the demo gin (+ quick, + user files) with the folder macros of `out`."""
    from atlas_jax import gin_config
    files = [DEMO_GIN] + ([QUICK_GIN] if quick else []) + list(gin_files)
    macros = [f"DEMO_DIR = {str(out)!r}"]
    gin_config.parse(files, macros + list(extra) + list(bindings), search_paths)


def run_macros(out: Path, vocab_size: int) -> list[str]:
    """The macros naming the run folder's own files."""
    ledger_dir = out / "ledger"
    return [f"LEDGER_DIR = {str(ledger_dir)!r}", f"READER_SPM = {str(out / 'spiece.model')!r}",
            f"PASSAGES_FILE = {str(ledger_dir / PASSAGES_BEFORE_CUTOFF)!r}",
            f"READER_VOCAB_SIZE = {vocab_size}"]


def _find(file: str, search_paths: Sequence[str]) -> Path:
    from atlas_jax import gin_config
    for folder in ["."] + list(search_paths) + gin_config.default_search_paths():
        if (Path(folder) / file).is_file():
            return Path(folder) / file
    raise FileNotFoundError(f"gin file {file!r} not found")


def save_args(out: Path, quick: bool, gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str], vocab_size: int) -> None:
    """Writes `demo_args.json` (and copies of the user's gin files) into the run folder."""
    copies = []
    for number, file in enumerate(gin_files):
        name = f"{GIN_COPIES}/{number:02d}_{Path(file).name}"
        (out / GIN_COPIES).mkdir(exist_ok=True)
        shutil.copyfile(_find(file, search_paths), out / name)
        copies.append(name)
    fileio.atomic_write_json(out / ARGS_FILE, {
        "quick": quick, "gin_files": copies, "bindings": list(bindings),
        "search_paths": [str(Path(p).absolute()) for p in search_paths],
        "extra": run_macros(out.absolute(), vocab_size), "reader_vocab_size": vocab_size,
        "paths": "gin_files relative to the run folder; extra rebuilt from it on load"})


def parse_run_gin(run_dir: Path, args: dict) -> None:
    """Parses a run folder's gin from its `demo_args.json` contents, wherever it now is."""
    run_dir = Path(run_dir).absolute()
    if "reader_vocab_size" not in args:       # written before run folders were relocatable
        parse_gin(run_dir, args["quick"], args["gin_files"], args["bindings"],
                  args["search_paths"], args["extra"])
        return
    files = [str(run_dir / name) for name in args["gin_files"]]
    parse_gin(run_dir, args["quick"], files, args["bindings"], args["search_paths"],
              run_macros(run_dir, int(args["reader_vocab_size"])))

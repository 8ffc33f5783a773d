"""Crash-safe file writes and the output-folder policy (docs/robustness.md).

Every file the project writes goes through `atomic_write_*`: the bytes go to a hidden
temporary file in the same folder (`.NAME.tmp-XXXX`), which is flushed, fsynced and renamed
over NAME, then the folder is fsynced. A reader therefore sees the old file or the new one,
never a half-written one, and a process killed mid-write leaves at most a `.*.tmp-*` file that
`remove_partial_files` (called by the commands that write into the folder) deletes.

Output folders: a folder this project writes holds a marker, `.atlas-jax.json`, naming the
project, the kind of output and a format version. `prepare_output(folder, kind)` accepts a
folder that does not exist, an empty folder, one that holds only marked outputs of ours (e.g. a
MODEL_DIR whose synthetic data was generated first), or one whose marker names the same kind,
and refuses anything else (OutputFolderError: exit 2 naming the folder and the unexpected
entries), so a command never replaces or mixes into a folder it did not write.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

MARKER = ".atlas-jax.json"
PROJECT = "atlas-jax"
MARKER_FORMAT = 1
_TMP_INFIX = ".tmp-"


_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault injection for tests/test_faults.py: with `ATLAS_JAX_KILL_AT=NAME[:N]` in the
    environment, the process SIGKILLs itself the N-th time (default 1st) it reaches a point
    whose name contains NAME. Points: `train_step` (after a step's update, before its log and
    checkpoint), `atomic_write:FILE` (a file's bytes written, not yet renamed), `index_save`
    (an index staged, not yet swapped in). A no-op otherwise."""
    spec = os.environ.get("ATLAS_JAX_KILL_AT")
    if not spec:
        return
    target, _, count = spec.rpartition(":")
    if not count.isdigit():
        target, count = spec, ""
    if target not in name:
        return
    _fault_counts[target] = _fault_counts.get(target, 0) + 1
    if _fault_counts[target] == int(count or 1):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


class OutputFolderError(ValueError):
    """An output folder that holds something this project did not write."""


def fsync_directory(folder: str | Path) -> None:
    """fsync a folder so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"
                ) -> Iterator[Any]:
    """Opens a temporary file next to `path` for writing; on a clean exit it is fsynced and
    renamed over `path`; on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_INFIX}", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, "wb" if binary else "w",
                       **({} if binary else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"atomic_write:{path.name}")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, value: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


def atomic_write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Writes `lines` (each without its newline) as a text file, one per line."""
    with atomic_open(path, "w") as f:
        for line in lines:
            f.write(line + "\n")


def atomic_savez(path: str | Path, **arrays: Any) -> None:
    """`np.savez` through a temporary file: a kill mid-write never leaves a half .npz."""
    import numpy as np
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Deletes this module's leftover temporaries (`.NAME.tmp-*`) in `folder` (not below);
    returns what it removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(".") and _TMP_INFIX in entry.name and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def make_folder(folder: str | Path) -> Path:
    """mkdir -p with the user's normal permissions (umask), never 0700."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------- output folders
def read_marker(folder: str | Path) -> dict | None:
    """The folder's marker, or None where there is none or it is not ours."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("project") != PROJECT:
        return None
    return marker


def write_marker(folder: str | Path, kind: str, **extra: Any) -> None:
    atomic_write_json(Path(folder) / MARKER, {"project": PROJECT, "kind": kind,
                                              "format": MARKER_FORMAT, **extra})


def _describe(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(entries)[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_output(folder: str | Path, kind: str, legacy: Any = None) -> bool:
    """Whether `folder` may be written as an output of `kind`: True if it holds our marker for
    `kind` (reuse or replace it), False if it does not exist or is empty (a new output).
    Raises OutputFolderError otherwise, naming the folder and what is in it.

    `legacy(folder) -> bool` may recognise folders this project wrote before markers existed
    (by their own format field, never by a common file name alone)."""
    folder = Path(folder)
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise OutputFolderError(f"{folder}: exists and is not a folder; give a new folder "
                                f"for the {kind}")
    marker = read_marker(folder)
    if marker is not None:
        if marker.get("kind") != kind:
            raise OutputFolderError(
                f"{folder}: holds an atlas-jax {marker.get('kind')!r}, not a {kind!r}; give a "
                "new folder")
        if int(marker.get("format", 0)) > MARKER_FORMAT:
            raise OutputFolderError(f"{folder}: written by a newer atlas-jax (marker format "
                                    f"{marker.get('format')}); give a new folder")
        return True
    entries = [e.name for e in folder.iterdir()]
    if not entries:
        return False
    if all((folder / e).is_dir() and read_marker(folder / e) is not None for e in entries):
        return False        # only outputs of ours inside (e.g. MODEL_DIR/synthetic_data)
    if legacy is not None and legacy(folder):
        return True
    raise OutputFolderError(
        f"{folder}: is not empty and is not an atlas-jax {kind} folder (no {MARKER} marker); "
        f"it holds {_describe(entries)}; give a new or empty folder")


def prepare_output(folder: str | Path, kind: str, legacy: Any = None) -> Path:
    """`check_output`, then creates the folder (normal permissions) and writes its marker."""
    check_output(folder, kind, legacy)
    folder = make_folder(folder)
    if read_marker(folder) is None:
        write_marker(folder, kind)
    remove_partial_files(folder)
    return folder


def staging_folder(target: str | Path) -> Path:
    """A new hidden folder next to `target` (normal permissions) to write a whole output in
    before `replace_folder` puts it in place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())        # mkdtemp makes 0700 folders
    return staging


def replace_folder(staging: str | Path, target: str | Path) -> None:
    """Renames `staging` onto `target`; an existing target is moved aside first and removed
    only once the new one is in place (a reader sees the old folder or the new one)."""
    import shutil
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        fsync_directory(target.parent)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    fsync_directory(target.parent)
    shutil.rmtree(retired, ignore_errors=True)


def remove_staging_leftovers(parent: str | Path, name: str | None = None) -> None:
    """Removes the staging and retired folders (`.NAME.staging-*`, `.NAME.old.*`) that an
    interrupted write of NAME (of any name when None) left in `parent`."""
    import shutil
    parent = Path(parent)
    if not parent.is_dir():
        return
    prefix = f".{name}." if name else "."
    for entry in parent.iterdir():
        if (entry.is_dir() and entry.name.startswith(prefix)
                and (".staging-" in entry.name or ".old." in entry.name)):
            shutil.rmtree(entry, ignore_errors=True)


def write_folder(target: str | Path, kind: str, write: Any, legacy: Any = None,
                 fault: str | None = None) -> Path:
    """Writes a whole output folder of `kind` atomically: `write(staging)` fills a sibling
    staging folder, which is marked and renamed onto `target` (a reader sees the old folder
    or the new one, never a mix; on any error nothing is left behind). An existing `target`
    is replaced only when `check_output` allows it."""
    import shutil
    target = Path(target)
    check_output(target, kind, legacy)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_staging_leftovers(target.parent, target.name)
    staging = staging_folder(target)
    try:
        write(staging)
        write_marker(staging, kind)
        if fault:
            fault_point(fault)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target

"""Benchmarks: each prints a table and a JSON result and writes the JSON to --out."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | Path) -> None:
    """Prints `result` as one JSON line and writes it (indented) to `out`."""
    print(json.dumps(result))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")

"""`plan`'s memory model for Atlas base / large / xl / xxl, remat on and off, one table.

    python -m bench.plan_memory [--mesh 8x1 --mesh 16x4] [--out bench/results/plan_memory.json]

Each row is `atlas-jax plan --model_only` (no compile: the model's per-device parts and its
verdicts for 16 / 32 / 80 / 141 GiB accelerators) of `models/SIZE.gin` +
`models/retriever/contriever.gin` + `runs/fewshot.gin` (Atlas's few-shot recipe: batch 32,
40 passages of 384 tokens, query-side retriever) with FSDP rules and a 32M-passage bfloat16
index, reader and retriever `remat` = 'full' (on) or 'none' (off).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = ("base", "large", "xl", "xxl")
GIB = 2 ** 30


def one(size: str, mesh: str, remat: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "plan.json"
        argv = [sys.executable, "-m", "atlas_jax.cli", "plan", f"--mesh={mesh}", "--model_only",
                "--passages=32000000", "--dtype=bfloat16", f"--json={out}",
                f"--gin_file=models/{size}.gin", "--gin_file=models/retriever/contriever.gin",
                "--gin_file=runs/fewshot.gin", "--gin.PARTITIONING_RULES='fsdp'",
                f"--gin.NUM_PARTITIONS={mesh.split('x')[1]}",
                f"--gin.t5.T5Config.remat='{remat}'",
                f"--gin.retriever.RetrieverConfig.remat='{remat}'", *extra]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{' '.join(argv)}:\n{result.stderr[-2000:]}")
        plan = json.loads(out.read_text())
    model = plan["memory_model"]
    return {"size": size, "mesh": mesh, "remat": remat,
            "examples_per_device": model["examples_per_device"],
            **{k: round(v / GIB, 2) for k, v in model["per_device"].items()},
            "max_examples_per_device": {r["capacity_gib"]: r["max_examples_per_device"]
                                        for r in model["verdicts"]},
            "command": " ".join(argv[1:]).replace(f"--json={out} ", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", action="append", default=None)
    parser.add_argument("--out", default="bench/results/plan_memory.json")
    args, extra = parser.parse_known_args()
    rows = [one(size, mesh, remat, extra) for mesh in (args.mesh or ["8x1", "16x4"])
            for size in SIZES for remat in ("full", "none")]
    header = ("size", "mesh", "remat", "ex/dev", "state GiB", "acts GiB", "working GiB",
              "index GiB", "total GiB", "max ex/dev @16/32/80/141 GiB")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        state = r["params"] + r["optimizer"] + r["gradients"] + r["collectives"]
        caps = "/".join(str(v) for v in r["max_examples_per_device"].values())
        print(" | ".join(str(v) for v in (
            r["size"], r["mesh"], r["remat"], r["examples_per_device"], round(state, 2),
            r["activations"], r["working_set"], r["index"], r["total"], caps)))
    print(json.dumps({"rows": rows}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

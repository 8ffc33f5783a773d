"""Train-step compile time, scanned layers vs per-layer, same configuration and mesh, one run.

    python -m bench.compile_time [--gin_file runs/pod_v4_128_nq64.gin] [--mesh 8x4]
        [--gin.NAME=VALUE ...] [--out bench/results/compile_time.json]

Each variant is `atlas-jax plan` (the real joint train step, abstract parameters, XLA:CPU on
simulated devices) in a fresh process: per-layer (`scan_layers = False` for the reader and the
retriever) and scanned (`True` for both). Prints a table and writes JSON with the lowering and
compile seconds of each and the scanned / per-layer ratio; the plan's memory and FLOPs
come along.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"per_layer": False, "scanned": True}


def plan_variant(gin_files: list[str], bindings: list[str], mesh: str, scan: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "plan.json"
        argv = [sys.executable, "-m", "atlas_jax.cli", "plan", f"--mesh={mesh}",
                f"--json={out}", *(f"--gin_file={f}" for f in gin_files),
                *(f"--gin.{b}" for b in bindings),
                f"--gin.t5.T5Config.scan_layers={scan}",
                f"--gin.retriever.RetrieverConfig.scan_layers={scan}"]
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode:
            raise SystemExit(f"plan failed ({' '.join(argv)}):\n{result.stderr[-3000:]}")
        plan = json.loads(out.read_text())
    plan["wall_seconds"] = wall
    plan["command"] = " ".join(argv[1:])
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=None)
    parser.add_argument("--mesh", default="8x4")
    parser.add_argument("--out", default="bench/results/compile_time.json")
    args, rest = parser.parse_known_args()
    gin_files = args.gin_file or ["runs/pod_v4_128_nq64.gin"]
    bindings = [a[len("--gin."):] for a in rest if a.startswith("--gin.")]
    unknown = [a for a in rest if not a.startswith("--gin.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")

    plans = {name: plan_variant(gin_files, bindings, args.mesh, scan)
             for name, scan in VARIANTS.items()}
    rows = []
    for name, plan in plans.items():
        seconds = plan["seconds"]
        rows.append({"variant": name, "lower_s": round(seconds["lower"], 1),
                     "compile_s": round(seconds["compile"], 1),
                     "total_s": round(seconds["lower"] + seconds["compile"], 1),
                     "process_wall_s": round(plan["wall_seconds"], 1),
                     "temporaries_gib": round(plan["memory_per_device"]["temporaries"] / 2**30, 2),
                     "flops_per_device": plan["flops_per_device"]})
    ratio = rows[1]["total_s"] / rows[0]["total_s"]
    header = list(rows[0])
    print(f"# {', '.join(gin_files)} on {args.mesh}; layers {plans['scanned']['reader']['layers']}")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    print(f"scanned / per-layer lower+compile time: {ratio:.3f}")
    result = {"gin_files": gin_files, "bindings": bindings, "mesh": args.mesh, "rows": rows,
              "scanned_over_per_layer": ratio,
              "commands": {name: plan["command"] for name, plan in plans.items()}}
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

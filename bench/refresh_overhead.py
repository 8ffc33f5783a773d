"""Index refresh overhead of a training run: the share of wall time spent re-embedding the
corpus and swapping the index, in a `gin/runs/synthetic.gin` run that refreshes every
`--every` steps, against the same run that never refreshes (built once at step 0), in one
process on the same machine.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.refresh_overhead \
        [--steps 200 --every 50 --mesh 4,2 --out bench/results/refresh_overhead.json]

Atlas reports ~30% of training time in index refreshes on its full corpora; the refresh cost
is one pass of the passage tower over the corpus (jit, batches sharded over 'data', rows
rounded to the saved dtype, the index saved atomically under MODEL_DIR/index/). Prints a table
and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def run_once(model_dir: Path, steps: int, schedule: str, mesh: str) -> dict:
    import atlas_jax_tasks
    from atlas_jax import gin_config
    from atlas_jax.train import trainer
    gin_config.parse(["runs/synthetic.gin", "objectives/pdist.gin"], [
        f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {steps}",
        f"partitioning.create_mesh.shape = ({mesh})",
        f"passage_index.IndexConfig.refresh_schedule = '{schedule}'",
        "TrainConfig.eval_at_start = False", "TrainConfig.progress = False",
        f"TrainConfig.checkpoint_every = {steps}"])
    atlas_jax_tasks.register_configured_tasks()
    result = trainer.train(trainer.TrainConfig())
    refreshes = len(list((model_dir / "index").glob("step_*")))
    final = [r for r in result.metrics if "time/wall_s" in r][-1]
    return {"schedule": schedule, "wall_s": result.wall_seconds,
            "refresh_s": result.refresh_seconds, "refresh_fraction":
            result.refresh_seconds / result.wall_seconds, "retrieval_s": final["time/retrieval_s"],
            "index_versions_kept": refreshes, "steps": steps}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--mesh", default="4,2")
    parser.add_argument("--out", default="bench/results/refresh_overhead.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_once(Path(tmp) / "never", args.steps, "-1", args.mesh),
                run_once(Path(tmp) / "every", args.steps, str(args.every), args.mesh)]
    never, every = rows
    result = {"rows": rows, "refreshes": args.steps // args.every + 1,
              "refresh_fraction": every["refresh_fraction"],
              "wall_ratio_vs_never": every["wall_s"] / never["wall_s"],
              "seconds_per_refresh": every["refresh_s"] / (args.steps // args.every + 1)}
    print(f"{'schedule':>10} {'wall s':>8} {'refresh s':>10} {'refresh %':>10}")
    for row in rows:
        print(f"{row['schedule']:>10} {row['wall_s']:8.1f} {row['refresh_s']:10.2f} "
              f"{100 * row['refresh_fraction']:9.1f}%")
    print(f"refresh every {args.every}: {100 * result['refresh_fraction']:.1f}% of wall time, "
          f"wall x{result['wall_ratio_vs_never']:.3f} of never refreshing")
    from atlas_jax import fileio
    fileio.atomic_write_json(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

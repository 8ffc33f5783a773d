"""Evaluation of a run's parameters: generation EM / F1 (SQuAD normalisation), retrieval
recall@k against gold passage ids, answer recall@k; predictions jsonl with the retrieved ids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax import distributed, evaluation, fileio, inference
from atlas_jax.train.data import Examples, eval_batches


def predictions(run: Any, params: dict, index: Any, examples: Examples, batcher: Any = None
                ) -> list[dict]:
    """One record per example: id, question, prediction, answers, gold and retrieved ids;
    with a `TrainConfig.answer_selector`, also `beams` (best first) and the `beam` chosen."""
    config, state = run.config, run.state
    batcher = batcher or run.batcher
    selector = config.answer_selector
    generate = inference.generate_fn(state, int(config.feature_lengths["targets"]),
                                     config.beam_size, all_beams=selector is not None)
    embed_queries = inference.embed_fn(state, "query")
    retriever_params = params[state.retriever_key]
    n_context = config.n_context if not config.closed_book else 1
    store = None if index is None else index.store
    records = []
    for rows, count in eval_batches(len(examples), config.eval_batch_size or config.batch_size):
        batch, found = batcher.assemble(
            examples, rows, index, lambda i, m: embed_queries(retriever_params, i, m))
        out = generate(params["reader"], batch["reader_ids"][:, :n_context])
        rows = [int(r) for r in rows[:count]]
        if selector is None:
            beams = [[inference.decode_answer(run.vocabulary, t)] for t in out[:count]]
            chosen = [0] * count
        else:
            beams = [[inference.decode_answer(run.vocabulary, t) for t in out[0][j]]
                     for j in range(count)]
            read = [[] if found is None or config.closed_book else
                    inference.evidence_of(store, found[j][:n_context]) for j in range(count)]
            chosen = inference.select_answers(selector, [examples.queries[r] for r in rows],
                                              beams, out[1][:count], read, store)
        for j, row in enumerate(rows):
            retrieved = ([] if found is None else
                         [index.store.ids[i] for i in found[j] if i >= 0])
            record = {"id": examples.ids[row], "question": examples.queries[row],
                      "prediction": beams[j][chosen[j]], "answers": examples.answers[row],
                      "gold_ids": examples.gold_ids[row], "retrieved": retrieved}
            if selector is not None:
                record.update(beams=beams[j], beam=chosen[j])
            records.append(record)
    return records


def metrics_of(records: list[dict], index: Any, recall_ks: list[int]) -> dict[str, float]:
    """EM / F1 of the answered records; recall@k and answer recall@k when `index` is given."""
    metrics = {}
    answered = [r for r in records if r["answers"]]
    if answered:
        metrics["eval/em"] = float(np.mean([evaluation.exact_match(r["prediction"], r["answers"])
                                            for r in answered]))
        metrics["eval/f1"] = float(np.mean([evaluation.f1(r["prediction"], r["answers"])
                                            for r in answered]))
    if index is not None:
        store = index.store
        with_gold = [r for r in records if r["gold_ids"]]
        texts = {pid: store.retriever_texts(store.index_of([pid]))[0]
                 for r in answered for pid in r["retrieved"]}
        for k in recall_ks:
            if with_gold:
                metrics[f"eval/recall@{k}"] = evaluation.recall_at_k(
                    [r["retrieved"] for r in with_gold], [r["gold_ids"] for r in with_gold], k)
            if answered:
                metrics[f"eval/answer_recall@{k}"] = evaluation.answer_recall_at_k(
                    [[texts[p] for p in r["retrieved"]] for r in answered],
                    [r["answers"] for r in answered], k)
    metrics["eval/examples"] = float(len(records))
    return metrics


def evaluate(run: Any, params: dict, index: Any, examples: Examples, step: int,
             predictions_path: Path | None = None, batcher: Any = None) -> dict[str, float]:
    """The metrics of `params` on `examples` (retrieving from `index` with `batcher`, the
    run's own by default); writes the predictions jsonl (`predictions`) on process 0."""
    batcher = batcher or run.batcher
    records = predictions(run, params, index, examples, batcher)
    ks = [k for k in run.config.recall_ks if k <= batcher.settings.retriever_n_context]
    metrics = metrics_of(records, None if run.config.closed_book else index, ks)
    if predictions_path is not None and distributed.is_primary():
        with fileio.atomic_open(predictions_path, "w") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return metrics

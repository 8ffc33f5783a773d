"""Evaluation of the demo's systems: test-time retrieval modes (dense, hybrid with parsed
filters, closed book), EM / F1 / recall@k / EM per question kind, the fusion weight chosen on
dev, and the hot swap's refreshed index (`atlas_jax.demo` runs them; docs/demo.md)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

RECALL_KS = (1, 5, 20)


def subset(examples, rows):
    from atlas_jax.train.data import Examples
    pick = lambda values: [values[r] for r in rows]  # noqa: E731
    return Examples(pick(examples.prompts), examples.targets[rows], pick(examples.queries),
                    pick(examples.ids), pick(examples.answers), pick(examples.gold_ids),
                    pick(examples.filters), pick(examples.source_passages))


def mode_batcher(run, index, mode: str, dense_weight: float | None = None):
    """`run`'s batcher in a test-time retrieval mode (dense: no filters; hybrid: BM25 + dense,
    parsed filters, strict; closed_book), pointed at `index` (e.g. the refreshed one, over
    another store: its reader tokens are made)."""
    from atlas_jax.index import hybrid as hybrid_lib
    from atlas_jax.train.data import reader_token_table
    settings = dataclasses.replace(run.batcher.settings, retriever_n_context=max(RECALL_KS),
                                   rerank_n=0)
    hybrid_config = run.batcher.hybrid_config
    if mode == "dense":
        settings, hybrid_config = dataclasses.replace(settings, hybrid=False,
                                                      use_filters=False), None
    elif mode == "hybrid":
        settings = dataclasses.replace(settings, hybrid=True, use_filters=True,
                                       filter_mode="strict")
        hybrid_config = hybrid_lib.HybridConfig(dense_weight=dense_weight, bm25_weight=1.0)
    batcher = run.batcher.configured(settings, hybrid_config)
    if index is None:
        return batcher
    reader_tokens = None
    if run.store is not index.store or len(batcher.reader_tokens) != len(index.store):
        reader_tokens = reader_token_table(index.store, run.vocabulary,
                                           int(run.config.feature_lengths["inputs"]))
    return batcher.use_index(index, reader_tokens)


def evaluate_system(run, params, index, examples, mode: str, path: Path,
                    dense_weight: float | None = None, kinds: dict | None = None) -> dict:
    """EM / F1 / recall@k / EM by kind of `params` on `examples` with retrieval `mode`."""
    from atlas_jax.train.evaluate import evaluate
    batcher = mode_batcher(run, None if mode == "closed_book" else index, mode, dense_weight)
    metrics = evaluate(run, params, index, examples, 0, path, batcher=batcher)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return summarize(metrics, records, kinds or {})


def summarize(metrics: dict, records: list[dict], kinds: dict[str, str]) -> dict:
    from atlas_jax import evaluation
    by_kind: dict[str, list[float]] = {}
    for record in records:
        by_kind.setdefault(kinds.get(record["id"], "?"), []).append(
            evaluation.exact_match(record["prediction"], record["answers"]))
    out = {"em": metrics.get("eval/em", 0.0), "f1": metrics.get("eval/f1", 0.0),
           "recall_at_k": {str(k): metrics[f"eval/recall@{k}"] for k in RECALL_KS
                           if f"eval/recall@{k}" in metrics} or None,
           "em_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
           "examples": len(records)}
    answered = [r for r in records if r["answers"] and r.get("beams")]
    if answered:   # an answer_selector chose among beams: the best beam's EM, for comparison
        out["em_best_beam"] = float(np.mean([evaluation.exact_match(r["beams"][0], r["answers"])
                                             for r in answered]))
        out["answers_not_best_beam"] = sum(r["beam"] != 0 for r in answered)
    return out


def choose_dense_weight(run, params, index, examples, weights_: tuple[float, ...]
                        ) -> tuple[float, dict[str, float]]:
    """The fusion weight (BM25 at 1) with the best recall@5 on `examples` (dev)."""
    from atlas_jax import evaluation
    from atlas_jax import inference
    from atlas_jax.train.data import eval_batches
    embed = inference.embed_fn(run.state, "query")
    retriever = params[run.state.retriever_key]
    scores = {}
    for weight in weights_:
        batcher = mode_batcher(run, index, "hybrid", weight)
        retrieved, gold = [], []
        for rows, count in eval_batches(len(examples), run.config.batch_size):
            queries = batcher.embed_query_texts(
                [examples.queries[r] for r in rows], lambda i, m: embed(retriever, i, m))
            found = batcher.retrieve(index, queries, examples, rows)
            for j in range(count):
                if examples.gold_ids[rows[j]]:
                    retrieved.append([index.store.ids[i] for i in found[j] if i >= 0])
                    gold.append(examples.gold_ids[rows[j]])
        scores[weight] = evaluation.recall_at_k(retrieved, gold, 5)
    best = max(weights_, key=lambda w: (scores[w], -abs(w - 1.0)))
    return best, {str(w): s for w, s in scores.items()}


def refreshed_index(run, params, stale, new_passages: Path):
    """The stale index plus the passages of `new_passages`, embedded with the run's passage
    tower and added in place behind a `HotSwapIndex` swap (no retraining)."""
    from atlas_jax.index import passage_index as passage_index_lib
    from atlas_jax.index import passages as passages_lib
    from atlas_jax.index import refresh
    def records(store):
        return [{"id": i, "title": t, "text": x, "metadata": m} for i, t, x, m in
                zip(store.ids, store.titles, store.texts, store.metadata)]
    # A copy of the stale index (its own store: `add` appends to the store in place).
    live = refresh.HotSwapIndex(passage_index_lib.PassageIndex.from_embeddings(
        passages_lib.PassageStore.from_records(records(stale.store), stale.store.source),
        np.asarray(stale.embeddings, np.float32), stale.backend.name, run.state.mesh,
        stale.backend.config, tokens=stale.tokens))
    new_records = records(passages_lib.PassageStore.from_jsonl(new_passages))
    live.update(lambda index: index.add_passages(new_records, run.state.retriever,
                                                 params=run.state.passage_params(params),
                                                 batch_size=64))
    index = live.current
    if index.tokens is None or len(index.tokens.lengths) != len(index.store):
        index.tokens = passage_index_lib.tokenize_store(index.store, run.state.retriever)
    return index


def baseline_recall(checkpoint: str, store, examples) -> dict[str, float]:
    """Dense recall@k on `examples` (those with a gold entry) of a retriever as shipped,
    untrained here, by exact search over `store`: the reference the systems' retrievers are
    compared with (all-MiniLM-L6-v2 as shipped, by default)."""
    from atlas_jax import evaluation, weights
    from atlas_jax.index import embedding
    from atlas_jax.index import passage_index as passage_index_lib
    retriever = weights.load_retriever(checkpoint)
    tokens = passage_index_lib.tokenize_store(store, retriever)
    # Batched longest first, as the demo's own indexes are (a few 256-token entries would
    # otherwise pad every batch they fall in).
    passages = embedding.embed_corpus(retriever, tokens.token_ids, tokens.lengths,
                                      progress=False).embeddings
    rows = [r for r in range(len(examples.ids)) if examples.gold_ids[r]]
    queries = retriever.embed([examples.queries[r] for r in rows], tower="query")
    top = np.argsort(-(queries @ passages.T), axis=1)[:, :max(RECALL_KS)]
    retrieved = [[store.ids[i] for i in row] for row in top]
    gold = [examples.gold_ids[r] for r in rows]
    return {str(k): evaluation.recall_at_k(retrieved, gold, k) for k in RECALL_KS}

"""Training data of the Atlas loop: a SeqIO split held in memory, batches chosen by
(seed, step), and the retrieval-augmented batch a train or eval step reads.

    examples = load_examples("synthetic_qa", "train", {"inputs": 48, "targets": 8})
    rows = batch_rows(step, batch_size, len(examples), seed)          # data position = step
    batch, retrieved = batcher.assemble(examples, rows, index, embed_queries)

A split is read once through its SeqIO task (`shuffle=False`, tokenized by the task's own
preprocessors) and kept as numpy arrays: the order of training examples is then a function
of (seed, step) alone, so a run resumed from step s reads exactly the batches an
uninterrupted run reads (docs/design.md §3), with no iterator state to checkpoint.

`RetrievalBatcher.assemble` embeds the queries, searches the index (per-query metadata
filters, the source passage of a pretraining example excluded, optionally over-retrieve and
rerank with the live passage tower) and builds the joint-loss batch (`joint_loss` module
docstring): reader inputs are the task's prompt tokens (EOS dropped) followed by the
passage's pre-tokenized reader text `"title: {title} context: {text}"` and EOS, i.e.
Atlas's `"question: {q} answer: <extra_id_0> title: {t} context: {p}"`, truncated to the
reader input length with EOS kept last.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from atlas_jax.index import passages as passages_lib

EOS_ID, PAD_ID = 1, 0
EmbedFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (question texts, passage store) -> one list of `--where` filters per question, parsed from
# the text (e.g. `atlas_jax_tasks.ledger_query.store_filter_parser`).
QueryFilterFn = Callable[[Sequence[str], passages_lib.PassageStore], list[list[str]]]


def _as_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _as_texts(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (bytes, str)):
        return [_as_text(value)] if value else []
    return [_as_text(v) for v in np.asarray(value).reshape(-1)]


@dataclasses.dataclass
class Examples:
    """One split in memory. `prompts[i]` are reader prompt tokens without EOS; `targets`
    (N, T) int32 padded with 0 (EOS included); string features per example."""
    prompts: list[np.ndarray]
    targets: np.ndarray
    queries: list[str]
    ids: list[str]
    answers: list[list[str]]
    gold_ids: list[list[str]]
    filters: list[list[str]]
    source_passages: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)


def load_examples(task_name: str, split: str, feature_lengths: dict[str, int],
                  limit: int | None = None) -> Examples:
    """Reads `split` of the SeqIO task or mixture `task_name` into memory.

    Args:
      task_name: a registered task or mixture (`MIXTURE_OR_TASK_NAME`).
      split: e.g. "train", "validation".
      feature_lengths: {"inputs": L, "targets": T} (`TASK_FEATURE_LENGTHS`).
      limit: read at most this many examples.
    Raises:
      ValueError: the task is unknown or the split empty (naming both).
    """
    import seqio
    try:
        task = seqio.get_mixture_or_task(task_name)
    except ValueError:
        raise ValueError(f"MIXTURE_OR_TASK_NAME = {task_name!r} is not a registered SeqIO task "
                         "(atlas-jax data list shows the tasks and the gin macro each "
                         "needs)") from None
    if split not in task.splits:
        raise ValueError(f"task {task_name!r} has no split {split!r} (it has "
                         f"{sorted(task.splits)})")
    dataset = task.get_dataset(dict(feature_lengths), split=split, shuffle=False, seed=0)
    if limit is not None:
        dataset = dataset.take(limit)
    target_length = int(feature_lengths["targets"])
    prompts, targets, fields = [], [], {k: [] for k in (
        "query", "id", "answers", "gold_ids", "filters", "passage_id", "targets_pretokenized")}
    for example in dataset.as_numpy_iterator():
        inputs = np.asarray(example["inputs"], np.int32)
        inputs = inputs[inputs != PAD_ID]
        prompts.append(inputs[:-1] if len(inputs) and inputs[-1] == EOS_ID else inputs)
        row = np.zeros(target_length, np.int32)
        target = np.asarray(example["targets"], np.int32)[:target_length]
        row[:len(target)] = target
        targets.append(row)
        for key in fields:
            fields[key].append(example.get(key))
    if not prompts:
        raise ValueError(f"task {task_name!r} split {split!r} is empty")
    queries = [_as_text(q) if q is not None else "" for q in fields["query"]]
    ids = [_as_text(i) if i is not None else f"{split}-{n}" for n, i in enumerate(fields["id"])]
    sources = [_as_text(p) if p is not None and _as_text(p) else None
               for p in fields["passage_id"]]
    from atlas_jax.vocabulary import strip_sentinels
    # Tasks without an `answers` feature (multiple choice: the option letter) are scored
    # against their target text.
    answers = [_as_texts(a) or ([strip_sentinels(_as_text(t))] if t is not None else [])
               for a, t in zip(fields["answers"], fields["targets_pretokenized"])]
    return Examples(prompts, np.stack(targets), queries, ids, answers,
                    [_as_texts(g) for g in fields["gold_ids"]],
                    [_as_texts(f) for f in fields["filters"]], sources)


def batch_rows(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Rows of training batch `step`: the examples stream through a fresh permutation of the
    split each epoch, permutation e drawn from (seed, e); a function of its arguments only."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    rows = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
        rows[epochs == epoch] = order[offsets[epochs == epoch]]
    return rows


def eval_batches(num_examples: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """In-order eval batches: (rows padded to batch_size by repeating the last row, real
    count)."""
    out = []
    for start in range(0, num_examples, batch_size):
        rows = np.arange(start, min(start + batch_size, num_examples))
        out.append((np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])]),
                    len(rows)))
    return out


def reader_token_table(store: passages_lib.PassageStore, vocabulary: Any, max_length: int
                       ) -> passages_lib.TokenArray:
    """Every passage's reader text ("title: {title} context: {text}"), tokenized with the
    reader vocabulary (no EOS) and truncated to `max_length`."""
    def encode_batch(texts):
        return [vocabulary.encode(text) for text in texts]
    return passages_lib.TokenArray.build(store.reader_texts(), encode_batch, max_length)


def reader_inputs(prompts: Sequence[np.ndarray], rows: np.ndarray | None,
                  reader_tokens: passages_lib.TokenArray, length: int) -> np.ndarray:
    """(B, K, L) reader ids: prompt + passage reader tokens + EOS (all pad where
    rows == -1); closed book (rows None): (B, 1, L) prompt + EOS."""
    if rows is None:
        rows = np.full((len(prompts), 1), -2)
    out = np.zeros(rows.shape + (length,), np.int32)
    for b, prompt in enumerate(prompts):
        for k, row in enumerate(rows[b]):
            if row == -1:
                continue
            passage = (np.zeros(0, np.int32) if row == -2 else np.asarray(
                reader_tokens.token_ids[row, :reader_tokens.lengths[row]]))
            tokens = np.concatenate([prompt, passage])[:length - 1]
            out[b, k, :len(tokens)] = tokens
            out[b, k, len(tokens)] = EOS_ID
    return out


def query_tokens(encoded: Sequence[Sequence[int]], length: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Retriever token ids of queries cut or padded to `length`, and their mask: (B, length)
    each (training's batcher and `inference.Inference` alike)."""
    ids = np.zeros((len(encoded), length), np.int32)
    for row, tokens in enumerate(encoded):
        tokens = list(tokens)[:length]
        ids[row, :len(tokens)] = tokens
    return ids, (ids != PAD_ID).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
    """How a batch is retrieved (TrainConfig carries these)."""
    n_context: int = 10               # passages the reader reads
    retriever_n_context: int = 10     # passages retrieved and scored by the retriever loss
    rerank_n: int = 0                 # > retriever_n_context: over-retrieve, rerank live
    query_length: int = 64            # retriever query tokens (fixed shape)
    reader_length: int = 256          # reader tokens per passage (TASK_FEATURE_LENGTHS inputs)
    closed_book: bool = False         # no retrieval: the reader reads the question alone
    use_filters: bool = True          # apply metadata filters (the example's or parsed ones)
    filter_mode: str = "strict"       # strict: only passages that satisfy them; prefer: those
                                      # first, then the best others (hard negatives)
    hybrid: bool = False              # BM25 fused with dense (IndexConfig.hybrid)
    exclude_source: bool = True       # drop a pretraining example's own passage
    stored_passage_embeddings: bool = False  # query-side: the batch carries the index's rows

    def __post_init__(self):
        if self.filter_mode not in ("strict", "prefer"):
            raise ValueError(f"filter_mode = {self.filter_mode!r}: use 'strict' or 'prefer'")
        if self.closed_book:
            return
        if not 0 < self.n_context <= self.retriever_n_context:
            raise ValueError(f"n_context ({self.n_context}) must be in [1, "
                             f"retriever_n_context ({self.retriever_n_context})]")
        if self.rerank_n and self.rerank_n < self.retriever_n_context:
            raise ValueError(f"rerank_n ({self.rerank_n}) must be 0 or >= retriever_n_context "
                             f"({self.retriever_n_context})")


class RetrievalBatcher:
    """Builds joint-loss batches: retrieval, token gathering, reader input assembly."""

    def __init__(self, settings: RetrievalSettings, encode_queries: Callable[[list[str]], list],
                 reader_tokens: passages_lib.TokenArray | None,
                 retriever_tokens: passages_lib.TokenArray | None,
                 query_filters: QueryFilterFn | None = None, hybrid_config: Any = None,
                 cache_queries: bool = False):
        self.settings = settings
        self.encode_queries = encode_queries
        self.reader_tokens = reader_tokens
        self.retriever_tokens = retriever_tokens
        self.query_filters = query_filters
        self.hybrid_config = hybrid_config
        self._parsed: dict[str, list[str]] = {}
        # A frozen query tower: each distinct text embedded once (`embed_query_texts`).
        self.cache_queries: dict[str, np.ndarray] | None = {} if cache_queries else None
        if retriever_tokens is not None:
            self.passage_width = max(int(np.max(retriever_tokens.lengths, initial=1)), 1)

    def use_index(self, index: Any, reader_tokens: passages_lib.TokenArray | None = None
                  ) -> "RetrievalBatcher":
        """Points the batcher at `index`: its retriever tokens (and, for an index over another
        store, that store's `reader_tokens`, e.g. `reader_token_table(index.store, ...)`)."""
        self.retriever_tokens = index.tokens
        self.passage_width = max(int(np.max(index.tokens.lengths, initial=1)), 1)
        if reader_tokens is not None:
            self.reader_tokens = reader_tokens
        return self

    def configured(self, settings: RetrievalSettings, hybrid_config: Any = None
                   ) -> "RetrievalBatcher":
        """A batcher with other settings (e.g. a test-time retrieval mode) sharing this one's
        tokens, parser and caches; this one is left as it is."""
        view = copy.copy(self)
        view.settings, view.hybrid_config = settings, hybrid_config
        return view

    def query_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Retriever tokens of the queries, (B, query_length) ids and mask."""
        return query_tokens(self.encode_queries(list(texts)), self.settings.query_length)

    def passage_tokens(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Retriever tokens of passages `rows` (any shape S; -1 = none) -> S + (Lp,)."""
        safe = np.maximum(rows, 0)
        ids = np.asarray(self.retriever_tokens.token_ids[safe.reshape(-1), :self.passage_width])
        lengths = np.asarray(self.retriever_tokens.lengths[safe.reshape(-1)])
        mask = (np.arange(self.passage_width)[None] < lengths[:, None]).astype(np.int32)
        valid = (rows.reshape(-1) >= 0)[:, None]
        shape = rows.shape + (self.passage_width,)
        return (np.where(valid, ids, PAD_ID).reshape(shape),
                np.where(valid, mask, 0).reshape(shape))

    def reader_inputs(self, prompts: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """(B, K, L) reader ids of the batcher's passages (see `reader_inputs`)."""
        return reader_inputs(prompts, rows, self.reader_tokens, self.settings.reader_length)

    def embed_query_texts(self, texts: Sequence[str], embed_queries: EmbedFn) -> np.ndarray:
        """(B, D) query embeddings; with `cache_queries` (a frozen retriever: its embeddings
        never change) each distinct text is embedded once per batcher."""
        if self.cache_queries is None:
            return embed_queries(*self.query_tokens(texts))
        missing = sorted({t for t in texts if t not in self.cache_queries})
        if missing:
            # Padded to the batch's size: one jit shape, not one per count of new texts.
            padded = missing + [missing[0]] * (-len(missing) % max(len(texts), 1))
            embedded = embed_queries(*self.query_tokens(padded))
            self.cache_queries.update(zip(missing, embedded[:len(missing)]))
        return np.stack([self.cache_queries[t] for t in texts])

    def filters_for(self, examples: Examples, rows: np.ndarray, store: Any) -> list[list[str]]:
        """Each row's filters: parsed from its query text when the batcher has a
        `query_filters` parser (cached per text), else the example's own `filters`."""
        if self.query_filters is None:
            return [examples.filters[r] for r in rows]
        texts = [examples.queries[r] for r in rows]
        missing = sorted({t for t in texts if t not in self._parsed})
        if missing:
            self._parsed.update(zip(missing, self.query_filters(missing, store)))
        return [list(self._parsed[t]) for t in texts]

    def retrieve(self, index: Any, queries: np.ndarray, examples: Examples, rows: np.ndarray,
                 embed_passages: EmbedFn | None = None) -> np.ndarray:
        """(B, retriever_n_context) dense passage ids, -1 where fewer were allowed."""
        s = self.settings
        k = s.retriever_n_context
        sources = [examples.source_passages[r] for r in rows]
        exclude = s.exclude_source and any(src is not None for src in sources)
        search_k = max(k, s.rerank_n) + (1 if exclude else 0)
        texts = [examples.queries[r] for r in rows]

        def search(where):
            return np.asarray(index.search(queries, search_k, where=where, query_texts=texts,
                                           hybrid=s.hybrid,
                                           hybrid_config=self.hybrid_config).ids)
        where = None
        filters = self.filters_for(examples, rows, index.store) if s.use_filters else []
        if any(filters):
            where = np.stack([index.filter_mask(f) if f else np.ones(len(index.store), bool)
                              for f in filters])
        found = search(where)
        if where is not None and s.filter_mode == "prefer":
            found = _fill(found, search(None), search_k)
        if exclude:
            source_rows = np.array([index.store.index_of([src])[0] if src is not None else -3
                                    for src in sources])
            keep = found != source_rows[:, None]
            found = np.stack([np.concatenate([f[m], np.full((~m).sum(), -1)])[:search_k - 1]
                              for f, m in zip(found, keep)])
        if s.rerank_n and embed_passages is not None:
            found = self._rerank(found, queries, embed_passages, k)
        return found[:, :k]

    def _rerank(self, found: np.ndarray, queries: np.ndarray, embed_passages: EmbedFn,
                k: int) -> np.ndarray:
        ids, mask = self.passage_tokens(found)
        batch, n, width = ids.shape
        fresh = embed_passages(ids.reshape(batch * n, width), mask.reshape(batch * n, width))
        scores = np.einsum("bd,bnd->bn", queries, fresh.reshape(batch, n, -1))
        scores = np.where(found >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(found, order, axis=1)

    def assemble(self, examples: Examples, rows: np.ndarray, index: Any,
                 embed_queries: EmbedFn | None, embed_passages: EmbedFn | None = None,
                 keep: np.ndarray | None = None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The joint-loss batch of `rows` (see `joint_loss`) and the retrieved dense ids
        (B, retriever_n_context) (None in closed-book mode). `keep`: positions in `rows` to
        build the batch of (a host's share of a global batch,
        `distributed.local_batch_positions`); every row's query is still embedded and
        searched (both run on the whole mesh), the tensors and ids are the kept rows'."""
        local = rows if keep is None else rows[keep]
        prompts = [examples.prompts[r] for r in local]
        targets = examples.targets[local]
        batch = {"targets": targets, "target_mask": (targets != PAD_ID).astype(np.int32),
                 "decoder_input_ids": np.concatenate(
                     [np.zeros((len(local), 1), np.int32), targets[:, :-1]], axis=1)}
        if self.settings.closed_book:
            batch["reader_ids"] = self.reader_inputs(prompts, None)
            return batch, None
        queries = self.embed_query_texts([examples.queries[r] for r in rows], embed_queries)
        query_ids, query_mask = self.query_tokens([examples.queries[r] for r in rows])
        found = self.retrieve(index, queries, examples, rows, embed_passages)
        if keep is not None:
            query_ids, query_mask, found = query_ids[keep], query_mask[keep], found[keep]
        passage_ids, passage_mask = self.passage_tokens(found)
        batch.update(query_ids=query_ids, query_mask=query_mask, passage_ids=passage_ids,
                     passage_mask=passage_mask, passage_valid=found >= 0,
                     reader_ids=self.reader_inputs(prompts, found))
        if self.settings.stored_passage_embeddings:
            rows_ = np.asarray(index.embeddings[np.maximum(found, 0).reshape(-1)], np.float32)
            batch["passage_embeddings"] = np.where(
                (found >= 0).reshape(-1, 1), rows_, 0.0).reshape(found.shape + (-1,))
        return batch, found


def _fill(first: np.ndarray, rest: np.ndarray, k: int) -> np.ndarray:
    """Per row: the valid ids of `first` in order, then those of `rest` not already there,
    up to k (-1 padded)."""
    out = np.full((len(first), k), -1, first.dtype)
    for row, (a, b) in enumerate(zip(first, rest)):
        seen = [int(i) for i in a if i >= 0]
        taken = set(seen)
        seen += [int(i) for i in b if i >= 0 and int(i) not in taken]
        out[row, :min(k, len(seen))] = seen[:k]
    return out

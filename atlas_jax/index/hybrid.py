"""Hybrid retrieval: BM25 (the `bm25s` library) fused with dense search by reciprocal rank.

Tokenisation (bm25s's `Tokenizer`, lowercased, configurable stopwords) uses a splitter that
keeps structured tokens whole: `TOKEN_PATTERN` matches runs of word characters joined by
`: - . / @` (`expenses:food:groceries`, `2023-04-01`, `inv-88213`, `42.50`), and each such
compound is emitted together with its parts of two or more word characters (bm25s's default
pattern `\\w\\w+`), so `INV-88213` matches exactly through the rare token `inv-88213` while a
query for `groceries` or `2023` still finds the longer forms. Plain one-character words are
dropped, as bm25s does by default.

Only passages that contain at least one query token are returned (BM25 has nothing to say
about the others), so a result row may hold fewer than k hits, padded with -1 / -inf.

`add` re-indexes: bm25s cannot update an index in place (idf and the average length change
with every passage), so the score matrix is rebuilt from the cached token ids of all passages.

bm25s is imported where it is used: its import runs a JAX computation, which would create
the devices before a multi-host launch calls `jax.distributed.initialize`.

Save/load uses bm25s's own `save`/`load` with `allow_pickle=False`: bm25s writes its sparse
score matrix with `np.save` and its vocabulary and parameters as JSON, and reads them back with
`np.load(allow_pickle=False)` and `json` (checked in bm25s 0.3.16), so loading runs no code.
Next to it we write the tokenizer vocabulary (JSON, bm25s's `save_vocab`), the per-passage
token ids (`.npy`, for later `add`) and our settings (`bm25.json`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Sequence

import gin
import numpy as np

from atlas_jax.index import base
from atlas_jax.index.base import SearchResult

TOKEN_PATTERN = r"(?u)\w+(?:[:\-./@]\w+)*"
_PART_RE = re.compile(r"(?u)\w\w+")
_WORD_RE = re.compile(r"(?u)\w+")
_FORMAT = "atlas_jax.bm25/1"


def make_splitter(token_pattern: str = TOKEN_PATTERN, split_compounds: bool = True
                  ) -> Callable[[str], list[str]]:
    """A bm25s splitter: each match of `token_pattern` becomes a token (plain words need two
    or more characters); when `split_compounds`, a match that is not a plain word is followed
    by its `\\w\\w+` parts."""
    token_re = re.compile(token_pattern)

    def split(text: str) -> list[str]:
        tokens = []
        for match in token_re.findall(text):
            if _WORD_RE.fullmatch(match):
                if len(match) >= 2:
                    tokens.append(match)
            else:
                tokens.append(match)
                if split_compounds:
                    tokens.extend(_PART_RE.findall(match))
        return tokens

    return split


def _top_k_by_score(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (ids, scores), highest score first, ties towards the lower id."""
    if len(ids) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = scores >= kth
        scores, ids = scores[keep], ids[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


class BM25Index:
    """BM25 over passage texts (`"{title} {text}"`), addressed by dense ids 0..size-1.

    Args:
      texts: initial passages, dense ids in order.
      stopwords: bm25s stopword choice ("en", another language code, a list, or None).
      token_pattern, split_compounds: see `make_splitter`.
      k1, b, method: bm25s scoring parameters.
    """

    def __init__(self, texts: Sequence[str] = (), *, stopwords: str | Sequence[str] | None = "en",
                 token_pattern: str = TOKEN_PATTERN, split_compounds: bool = True,
                 k1: float = 1.5, b: float = 0.75, method: str = "lucene"):
        self.settings = dict(token_pattern=token_pattern, split_compounds=bool(split_compounds),
                             k1=float(k1), b=float(b), method=method)
        from bm25s.tokenization import Tokenizer
        self._tokenizer = Tokenizer(lower=True, splitter=make_splitter(token_pattern,
                                                                        split_compounds),
                                    stopwords=stopwords)
        self.settings["stopwords"] = list(self._tokenizer.stopwords)
        self._doc_tokens: list[list[int]] = []
        self._retriever = None  # a bm25s.BM25 once indexed
        if len(texts):
            self.add(texts)

    @property
    def size(self) -> int:
        """Number of indexed passages."""
        return len(self._doc_tokens)

    def tokenize(self, text: str) -> list[str]:
        """The index tokens of `text` (lowercased, stopwords removed), for inspection."""
        stopwords = set(self._tokenizer.stopwords)
        return [t for t in self._tokenizer.splitter(text.lower()) if t not in stopwords]

    def add(self, texts: Sequence[str]) -> None:
        """Append passages (the next dense ids) and rebuild the BM25 score matrix."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return
        self._doc_tokens.extend(self._tokenizer.tokenize(
            texts, update_vocab=True, return_as="ids", show_progress=False, allow_empty=True))
        self._rebuild()

    def _rebuild(self) -> None:
        bm25s = _bm25s()
        from bm25s.tokenization import Tokenized
        retriever = bm25s.BM25(k1=self.settings["k1"], b=self.settings["b"],
                               method=self.settings["method"])
        retriever.index(Tokenized(ids=self._doc_tokens, vocab=self._tokenizer.get_vocab_dict()),
                        show_progress=False)
        self._retriever = retriever

    def search(self, query_texts: Sequence[str] | str, k: int,
               filters: np.ndarray | None = None) -> SearchResult:
        """Best k passages per query by BM25 score among the allowed ones.

        Args:
          query_texts: one string per query.
          k: hits per query.
          filters: None, or a bool mask (size,) or (queries, size); True = may be returned.

        Returns:
          `SearchResult` with int64 dense ids and float32 BM25 scores, best first (ties
          towards the lower id); -1 / -inf where fewer than k allowed passages share a token
          with the query.
        """
        queries = [query_texts] if isinstance(query_texts, str) else list(query_texts)
        mask = base.check_filters(filters, len(queries), self.size)
        result = base.empty_result(len(queries), k)
        if self._retriever is None or k <= 0:
            return result
        scores_csc = self._retriever.scores
        indptr, indices = scores_csc["indptr"], scores_csc["indices"]
        query_tokens = self._tokenizer.tokenize(queries, update_vocab=False, return_as="ids",
                                                show_progress=False, allow_empty=False)
        for row, token_ids in enumerate(query_tokens):
            if not token_ids:
                continue
            allowed = np.zeros(self.size, bool)
            for token in set(token_ids):
                allowed[indices[indptr[token]:indptr[token + 1]]] = True
            if mask is not None:
                allowed &= mask[row if len(mask) > 1 else 0]
            candidates = np.flatnonzero(allowed)
            scores = self._retriever.get_scores_from_ids(token_ids)[candidates]
            ids, top_scores = _top_k_by_score(scores.astype(np.float32), candidates, k)
            result.ids[row, :len(ids)] = ids
            result.scores[row, :len(ids)] = top_scores
        return result

    def save(self, directory: str | Path) -> None:
        """Write the index under `directory` (created if needed); no pickle anywhere."""
        bm25s = _bm25s()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._retriever is not None:
            self._retriever.save(directory / "bm25s", allow_pickle=False, show_progress=False)
        self._tokenizer.save_vocab(directory, "vocab.tokenizer.json")
        lengths = np.array([len(doc) for doc in self._doc_tokens], np.int64)
        flat = np.fromiter((t for doc in self._doc_tokens for t in doc), np.int64,
                           int(lengths.sum()))
        np.save(directory / "doc_token_ids.npy", flat, allow_pickle=False)
        np.save(directory / "doc_token_counts.npy", lengths, allow_pickle=False)
        manifest = dict(format=_FORMAT, size=self.size, bm25s_version=bm25s.__version__,
                        **self.settings)
        (directory / "bm25.json").write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False) -> BM25Index:
        """Read an index written by `save` (no pickle: JSON and `np.load(allow_pickle=False)`).

        Args:
          directory: what `save` wrote.
          mmap: memory-map bm25s's score matrix instead of reading it into memory.

        Raises:
          ValueError naming the file when the directory is not a BM25 index or is inconsistent.
        """
        bm25s = _bm25s()
        directory = Path(directory)
        manifest_path = directory / "bm25.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{manifest_path}: not a BM25 index manifest ({error})") from error
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, "
                             f"expected {_FORMAT!r}")
        index = cls(stopwords=manifest["stopwords"], token_pattern=manifest["token_pattern"],
                    split_compounds=manifest["split_compounds"], k1=manifest["k1"],
                    b=manifest["b"], method=manifest["method"])
        index._tokenizer.load_vocab(directory, "vocab.tokenizer.json")
        flat = np.load(directory / "doc_token_ids.npy", allow_pickle=False)
        counts = np.load(directory / "doc_token_counts.npy", allow_pickle=False)
        if len(counts) != manifest["size"] or counts.sum() != len(flat):
            raise ValueError(f"{directory}: token id arrays do not match the manifest size "
                             f"{manifest['size']}")
        index._doc_tokens = [doc.tolist() for doc in np.split(flat, np.cumsum(counts)[:-1])] \
            if len(counts) else []
        if index.size:
            retriever = bm25s.BM25.load(directory / "bm25s", allow_pickle=False, mmap=mmap,
                                        load_corpus=False, show_progress=False)
            if retriever.scores["num_docs"] != index.size:
                raise ValueError(f"{directory / 'bm25s'}: {retriever.scores['num_docs']} "
                                 f"passages, manifest says {index.size}")
            index._retriever = retriever
        return index



@gin.configurable
@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Fusion settings: RRF weights of the dense and BM25 lists, the RRF constant, and how
    many hits each retriever contributes before fusion (at least k)."""
    dense_weight: float = 1.0
    bm25_weight: float = 1.0
    rrf_k: int = 60
    candidates: int = 100

    def __post_init__(self):
        if self.dense_weight < 0 or self.bm25_weight < 0:
            raise ValueError(f"HybridConfig weights must be >= 0, got dense_weight="
                             f"{self.dense_weight}, bm25_weight={self.bm25_weight}")
        if self.rrf_k < 0 or self.candidates < 1:
            raise ValueError(f"HybridConfig needs rrf_k >= 0 and candidates >= 1, got "
                             f"rrf_k={self.rrf_k}, candidates={self.candidates}")


def reciprocal_rank_fusion(results: Sequence[SearchResult], weights: Sequence[float], k: int,
                           rrf_k: int = 60) -> SearchResult:
    """Fuse ranked lists: score(d) = sum_i w_i / (rrf_k + rank_i(d)), ranks starting at 1.

    Args:
      results: ranked `SearchResult`s over the same queries (-1 padding is ignored; an id
        repeated within one list counts at its best rank).
      weights: one non-negative weight per list; a list of weight 0 contributes nothing.
      k: hits per query in the output.
      rrf_k: the RRF constant.

    Returns:
      `SearchResult` of the k best fused ids (ties towards the lower id) with their float32
      fused scores; -1 / -inf padding where fewer than k ids occur in the lists.
    """
    if len(results) != len(weights) or not results:
        raise ValueError(f"reciprocal_rank_fusion needs one weight per result list, got "
                         f"{len(results)} lists and {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"reciprocal_rank_fusion weights must be >= 0, got {list(weights)}")
    num_queries = {np.shape(r.ids)[0] for r in results}
    if len(num_queries) != 1:
        raise ValueError(f"result lists cover different numbers of queries: {num_queries}")
    fused = base.empty_result(num_queries.pop(), k)
    for row in range(len(fused.ids)):
        all_ids, all_scores = [], []
        for result, weight in zip(results, weights):
            ids = np.asarray(result.ids[row], np.int64)
            ranks = np.flatnonzero(ids >= 0)
            ids, first = np.unique(ids[ranks], return_index=True)
            if weight > 0 and len(ids):
                all_ids.append(ids)
                all_scores.append(weight / (rrf_k + ranks[first] + 1.0))
        if not all_ids:
            continue
        unique_ids, inverse = np.unique(np.concatenate(all_ids), return_inverse=True)
        totals = np.bincount(inverse, weights=np.concatenate(all_scores))
        order = np.lexsort((unique_ids, -totals))[:k]
        fused.ids[row, :len(order)] = unique_ids[order]
        fused.scores[row, :len(order)] = totals[order]
    return fused


def hybrid_search(dense_search_fn: Callable[[np.ndarray, int, np.ndarray | None], SearchResult],
                  bm25: BM25Index, query_embeddings: np.ndarray, query_texts: Sequence[str],
                  k: int, filters: np.ndarray | None = None,
                  config: HybridConfig | None = None) -> SearchResult:
    """Dense + BM25 retrieval fused with reciprocal rank fusion.

    Args:
      dense_search_fn: `(query_embeddings, k, filters) -> SearchResult`, e.g. a backend's
        `search`.
      bm25: the `BM25Index` over the same dense ids.
      query_embeddings: (queries, dim) for the dense side.
      query_texts: one string per query for the BM25 side.
      k: hits per query.
      filters: bool mask over dense ids, (size,) or (queries, size), given to both sides.
      config: `HybridConfig`; None = `HybridConfig()` built at call time (so gin bindings apply).

    Returns:
      `SearchResult` of the k best fused ids with fused RRF scores; each side retrieves
      `max(k, config.candidates)` before fusion.
    """
    config = HybridConfig() if config is None else config
    query_texts = [query_texts] if isinstance(query_texts, str) else list(query_texts)
    depth = max(k, config.candidates)
    dense = dense_search_fn(query_embeddings, depth, filters)
    sparse = bm25.search(query_texts, depth, filters)
    if len(dense.ids) != len(sparse.ids):
        raise ValueError(f"{len(dense.ids)} query embeddings but {len(sparse.ids)} query texts")
    return reciprocal_rank_fusion([dense, sparse], [config.dense_weight, config.bm25_weight],
                                  k, config.rrf_k)


def _bm25s():
    """bm25s, imported on first use (see the module docstring). Its logger is set to DEBUG
    at import; once another library has configured the root logger, every index build
    printed `DEBUG:bm25s:Building index from IDs objects` (in `ask` too). WARNING here."""
    import logging
    import bm25s
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s

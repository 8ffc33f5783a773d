"""Ledger question answering on a trained demo run: load once, sync with a ledger, answer.

`LedgerQA.load(run_dir)` restores the demo's jointly trained model (`runs/finetune_joint`,
latest checkpoint) and its refreshed index once; `sync(ledger_file)` makes the index mirror a
Beancount ledger (`ledger_sync.sync_index`: only added or changed entries are embedded) and
hot-swaps it in (`HotSwapIndex`: searches in flight finish on the version they started on,
never on a mix); `answer(question)` is thread-safe and is what `atlas-jax ask`, `atlas-jax
serve` and the Fava page call.

One answer: the question's filters and expected answer type are parsed
(`atlas_jax_tasks.ledger_query`), BM25 + dense retrieval (the fusion weight the demo chose on
dev) runs among the entries that satisfy the filters, the FiD reader generates from the top
`n_context` entries (greedy or beam search as the run decoded; with the run's
`answer_selector`, the beam of the asked form that the evidence states), and the answer is
checked (`checks`): it is shown as "not sure"
(`low_confidence`, with the reasons in `why_low`) when no entry satisfies the filters, when
its form is not the one the question asks for (an amount to "who was paid ..."), when no
evidence entry states it, or when the reader's per-token likelihood of it is below
`min_confidence`.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

STAGE = "finetune_joint"
INDEX_FOLDER = "index_refreshed"
COMPILATION_CACHE = "jax_cache"     # in the run folder: a later `ask` skips most compiling
DEFAULT_MIN_CONFIDENCE = 0.5


class LedgerQAError(ValueError):
    """A run folder or ledger that cannot be used; the message names the file."""


@dataclasses.dataclass
class IndexVersion:
    """One published index with what answering needs from it, built before it is swapped in
    (so no search pays for it): the reader's token table of its passages and the ledger
    vocabulary (payees, accounts) the question parser reads."""
    index: Any
    reader_tokens: Any
    vocabulary: Any
    ledger: str | None = None
    sync: dict | None = None

    def search(self, *args, **kwargs):
        return self.index.search(*args, **kwargs)


def read_json(path: Path, required: tuple[str, ...]) -> dict:
    """A JSON object file of the run folder with `required` keys; LedgerQAError naming it."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:  # malformed JSON, not UTF-8, unreadable
        raise LedgerQAError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    missing = [key for key in required if key not in value] if isinstance(value, dict) else [
        "a JSON object"]
    if missing:
        raise LedgerQAError(f"{path}: lacks {missing}; was the folder written by "
                            "`atlas-jax demo`?")
    return value


def _restore(run_dir: Path):
    """The `Inference` of the demo's fine-tuned stage (its latest checkpoint, parameters only),
    parsed from the run folder's own gin (paths resolved inside `run_dir`, so the folder can
    move)."""
    import gin

    import atlas_jax_tasks
    from atlas_jax.inference import Inference
    from atlas_jax.ledger import run_folder as demo_args
    from atlas_jax.train.config import TrainConfig
    args_path = run_dir / "demo_args.json"
    if not args_path.is_file():
        raise LedgerQAError(f"{args_path}: not found; --run must be a folder written by "
                            "`atlas-jax demo --out DIR`")
    args = read_json(args_path, ("quick", "gin_files", "bindings", "search_paths", "extra"))
    demo_args.parse_run_gin(run_dir, args)
    atlas_jax_tasks.register_configured_tasks()
    with gin.config_scope(STAGE):
        config = TrainConfig(model_dir=str(run_dir / "runs" / STAGE))
        try:
            return Inference.restore(config)
        except FileNotFoundError:
            raise LedgerQAError(f"{config.run_dir / 'checkpoints'}: no checkpoint (the demo did "
                                "not finish its fine-tuning stage)") from None


def use_compilation_cache(run_dir: str | Path) -> None:
    """JAX's persistent compilation cache in `RUN/jax_cache` for this process, unless one is
    configured already (`JAX_COMPILATION_CACHE_DIR`): a one-shot `ask` then reuses the
    compiled functions of earlier calls. A process-wide setting: commands call it, the
    library does not."""
    import jax
    if jax.config.jax_compilation_cache_dir:
        return
    folder = Path(run_dir) / COMPILATION_CACHE
    try:
        folder.mkdir(exist_ok=True)
    except OSError:             # a read-only run folder: compile every time
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _dense_weight(run_dir: Path) -> float:
    report = run_dir / "report.json"
    if not report.is_file():
        return 1.0
    try:
        return float(read_json(report, ("config",))["config"]["dense_weight"])
    except (KeyError, TypeError, ValueError) as e:
        raise LedgerQAError(f"{report}: no config.dense_weight ({e!r})") from None


class LedgerQA:
    """A demo run loaded for answering; see the module docstring."""

    def __init__(self, run_dir: Path, model: Any, index: Any, dense_weight: float,
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE):
        from atlas_jax.index import refresh
        self.run_dir, self.model = Path(run_dir), model     # model: inference.Inference
        self.dense_weight, self.min_confidence = dense_weight, min_confidence
        self.base_index = index                 # the run's own index (the demo ledger's)
        self.holder = refresh.HotSwapIndex(self.prepare(index))
        self._model_lock = threading.Lock()     # one model call at a time (2 cores)
        self._sync_lock = threading.Lock()

    @classmethod
    def load(cls, run_dir: str | Path, min_confidence: float = DEFAULT_MIN_CONFIDENCE
             ) -> "LedgerQA":
        from atlas_jax.index import passage_index
        run_dir = Path(run_dir).absolute()
        model = _restore(run_dir)
        index_dir = run_dir / INDEX_FOLDER
        if not index_dir.is_dir():
            raise LedgerQAError(f"{index_dir}: not found (the demo writes it after evaluation)")
        index = passage_index.PassageIndex.load(index_dir, mesh=model.state.mesh)
        return cls(run_dir, model, index, _dense_weight(run_dir), min_confidence)

    # ---------------------------------------------------------------- index versions
    def prepare(self, index: Any, ledger: str | None = None,
                sync: dict | None = None) -> IndexVersion:
        """An `IndexVersion` of `index` with its BM25 index and metadata table built."""
        from atlas_jax.train.data import reader_token_table
        from atlas_jax_tasks import ledger_query
        tokens = reader_token_table(index.store, self.model.vocabulary, self.model.reader_length)
        vocabulary = ledger_query.LedgerVocabulary.from_records(
            {"id": i, "metadata": m} for i, m in zip(index.store.ids, index.store.metadata))
        index.bm25, index.metadata_table  # noqa: B018 (built now, not by the first search)
        return IndexVersion(index, tokens, vocabulary, ledger, sync)

    def sync(self, ledger_file: str | Path, persist: bool = True) -> dict:
        """Makes the index mirror `ledger_file` (`ledger_sync.sync_index`) and swaps it in;
        returns the sync report. One sync at a time; searches go on meanwhile."""
        from atlas_jax.ledger import sync as ledger_sync
        ledger_file = str(Path(ledger_file).absolute())
        with self._sync_lock:
            current = self.holder.current     # only syncs replace it, and they hold the lock
            index, report = ledger_sync.sync_run_index(
                self.run_dir, self.base_index, ledger_file, self.embed_records,
                persist=persist, mesh=self.model.state.mesh,
                current=current.index if current.ledger == ledger_file else None)
            version = self.prepare(index, ledger_file, report)
            report["version"] = self.holder.swap(version)
            return report

    # ---------------------------------------------------------------- model calls
    def embed_records(self, records: list[dict]) -> np.ndarray:
        """Passage embeddings of ledger records (not under the model lock: a sync never
        holds answers up; XLA shares the cores)."""
        from atlas_jax.ledger import sync as ledger_sync
        state = self.model.state
        return ledger_sync.embed_records(state.retriever, state.passage_params(state.params),
                                         records, state.mesh)

    def _embed_query(self, question: str) -> np.ndarray:
        with self._model_lock:
            return self.model.embed_queries([question])

    def _read(self, reader_ids: np.ndarray, question: str, read: list[dict], store: Any
              ) -> tuple[list[int], float, int]:
        """The answer tokens (EOS included) as the run decodes (greedy, the best beam, or the
        beam its `answer_selector` chooses given the evidence `read`), the reader's per-token
        likelihood of them (geometric mean, teacher-forced) and the beam chosen; jit on the
        mesh."""
        from atlas_jax import inference
        model = self.model
        batch = model.state.mesh.shape["data"]
        padded = np.repeat(reader_ids, batch, axis=0)
        with self._model_lock:
            if model.answer_selector is None:
                tokens, chosen = list(model.generate(padded)[0]), 0
            else:
                beams, scores = model.generate_beams(padded)
                texts = [model.decode(t) for t in beams[0]]
                chosen = inference.select_answers(model.answer_selector, [question], [texts],
                                                  scores[:1], [read], store)[0]
                tokens = list(beams[0][chosen])
            generated = tokens[:tokens.index(1) + 1] if 1 in tokens else tokens
            targets = np.zeros((batch, model.target_length), np.int32)
            targets[:, :len(generated)] = generated
            token_logp = model.score(padded, targets)[0]
        mean = float(np.asarray(token_logp)[:len(generated)].mean()) if generated else -np.inf
        return generated, float(np.exp(mean)), chosen

    # ---------------------------------------------------------------- answering
    def answer(self, question: str, k: int | None = None) -> dict:
        """Answer, likelihood, checks and evidence for one question (thread-safe)."""
        from atlas_jax.ledger import checks as ledger_checks
        from atlas_jax.index import hybrid
        from atlas_jax.train.data import reader_inputs
        from atlas_jax_tasks import ledger_query
        if not isinstance(question, str) or not question.strip():
            raise LedgerQAError("the question is empty")
        started = time.perf_counter()
        n_context = self.model.n_context
        k = max(k or n_context, 1)
        query = self._embed_query(question)
        config = hybrid.HybridConfig(dense_weight=self.dense_weight, bm25_weight=1.0)
        with self.holder.pinned() as (version, current):
            parsed = ledger_query.parse_query(question, current.vocabulary)
            where = list(parsed.filters) or None
            result = current.search(query, k, where=where, query_texts=[question], hybrid=True,
                                    hybrid_config=config)
            unmatched = where is not None and not (np.asarray(result.ids)[0] >= 0).any()
            if unmatched:  # nothing satisfies the filters: the best unfiltered entries
                result = current.search(query, k, query_texts=[question], hybrid=True,
                                        hybrid_config=config)
            found = np.asarray(result.ids)[0]
            evidence = _evidence(current, found, np.asarray(result.scores)[0])
            rows = np.full((1, n_context), -1)
            rows[0, :min(n_context, len(found))] = found[:n_context]
            prompt = f"question: {question.strip()} answer: <extra_id_0>"
            prompts = [np.asarray(self.model.vocabulary.encode(prompt), np.int32)]
            ids = reader_inputs(prompts, rows, current.reader_tokens, self.model.reader_length)
            store = current.index.store
        generated, confidence, beam = self._read(ids, question, evidence[:n_context], store)
        text = self.model.decode(generated)
        checked = ledger_checks.check_answer(text, parsed.answer_type, evidence, confidence,
                                             self.min_confidence,
                                             list(parsed.filters) if unmatched else None)
        return {"question": question, "answer": text, "confidence": confidence,
                **checked, "filters": list(parsed.filters), "index_version": version,
                "beam": beam,
                "evidence": evidence, "seconds": time.perf_counter() - started}


def _evidence(version: IndexVersion, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
    store = version.index.store
    out = []
    for row, score in zip(rows, scores):
        if row < 0:
            continue
        metadata = store.metadata[row] or {}
        line = metadata.get("line")
        out.append({"id": store.ids[row], "date": metadata.get("date"), "score": float(score),
                    "text": store.texts[row], "metadata": metadata,
                    "location": f"{metadata.get('file')}:{line}" if line else None})
    return out

"""`TrainConfig`: what a run trains and evaluates (t5x-style macros: MODEL_DIR, TRAIN_STEPS,
MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS); the trainer runs it and inference reads a run's
settings from it (docs/design.md §3, §5)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import gin

from atlas_jax import weights
from atlas_jax.train.data import RetrievalSettings


# Registered under the trainer's module name: gin files bind `trainer.TrainConfig.*`.
@gin.configurable(module="atlas_jax.train.trainer")
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run (t5x-style macros: MODEL_DIR, TRAIN_STEPS, MIXTURE_OR_TASK_NAME,
    TASK_FEATURE_LENGTHS); see gin/runs/*.gin."""
    model_dir: str | None = None              # MODEL_DIR
    train_steps: int = 0
    task: str | None = None
    feature_lengths: Any = None              # {"inputs": L, "targets": T}
    train_split: str = "train"
    eval_split: str = "validation"
    infer_split: str = "test"
    batch_size: int = 8
    eval_batch_size: int | None = None
    eval_every: int = 0                       # 0: only at the last step (and the start)
    eval_at_start: bool = True
    eval_limit: int | None = None
    # Answer decoding in evaluation, `predict` and `ask`: 1 greedy; > 1 beam search of that
    # width (GNMT length penalty 0.6, as t5x's beam search), the best beam answers.
    beam_size: int = 1
    # Which of the beams answers (beam_size > 1): (questions, beams (texts, best first),
    # evidence (the passages read, `inference.evidence_of`), store) -> a beam index per
    # question; None: the best beam. Ledger runs bind `@filters.ledger_answer_selector`.
    answer_selector: Any = None
    recall_ks: tuple[int, ...] = (1, 5, 10, 20)
    log_every: int = 10
    checkpoint_every: int = 100
    max_to_keep: int | None = 3
    seed: int = 0
    passages_file: str | None = None          # the corpus (or a prebuilt index: index_dir)
    index_dir: str | None = None
    n_context: int = 10
    retriever_n_context: int = 10
    rerank_n: int = 0
    query_length: int = 64
    query_side: bool = False
    closed_book: bool = False
    use_filters: bool = True
    filter_mode: str = "strict"               # or "prefer": filtered passages first, then others
    exclude_source: bool = True               # pretraining: never retrieve the source passage
    query_filters: Any = None                 # (texts, store) -> filters parsed from the text
    reader_builder: Callable[[], weights.Reader] | None = None
    retriever_builder: Callable[[], weights.Retriever] | None = None
    nan_steps: tuple[int, ...] = ()           # testing: make the loss NaN at these steps
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        def fail(field, why):
            raise ValueError(f"TrainConfig.{field} = {getattr(self, field)!r}: {why}")
        if not isinstance(self.model_dir, (str, Path)) or not str(self.model_dir):
            fail("model_dir", "bind MODEL_DIR (--gin.MODEL_DIR=\"'/path/to/run'\")")
        if not isinstance(self.train_steps, int) or self.train_steps < 0:
            fail("train_steps", "must be >= 0 (TRAIN_STEPS)")
        if not isinstance(self.task, str) or not self.task:
            fail("task", "bind MIXTURE_OR_TASK_NAME")
        if not isinstance(self.feature_lengths, dict) or not {"inputs", "targets"} <= set(
                self.feature_lengths):
            fail("feature_lengths", "TASK_FEATURE_LENGTHS must be {'inputs': L, 'targets': T}")
        if self.batch_size <= 0:
            fail("batch_size", "must be positive")
        if not isinstance(self.beam_size, int) or isinstance(self.beam_size, bool) or \
                self.beam_size < 1:
            fail("beam_size", "must be an integer >= 1 (1: greedy decoding)")
        if self.answer_selector is not None and not callable(self.answer_selector):
            fail("answer_selector", "must be a function (questions, beams, evidence, store) "
                 "-> beam indices, e.g. @filters.ledger_answer_selector")
        if not self.closed_book and not (self.passages_file or self.index_dir):
            fail("passages_file", "bind PASSAGES_FILE or TrainConfig.index_dir (or set "
                 "closed_book = True)")

    @property
    def run_dir(self) -> Path:
        return Path(self.model_dir)

    def settings(self) -> RetrievalSettings:
        return RetrievalSettings(
            n_context=self.n_context, retriever_n_context=self.retriever_n_context,
            rerank_n=self.rerank_n, query_length=self.query_length,
            reader_length=int(self.feature_lengths["inputs"]), closed_book=self.closed_book,
            use_filters=self.use_filters, filter_mode=self.filter_mode,
            exclude_source=self.exclude_source)

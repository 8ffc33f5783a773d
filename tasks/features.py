"""Output features of every atlas-jax task, and the helper that (re)registers a task.

Every task yields `inputs` and `targets` token ids of the reader vocabulary, EOS appended
after trimming (t5x's default), plus string features the trainer reads beside the model
features: `id`, `query` (text for the retriever), `filters` (metadata conditions such as
`date>=2023-03-01`, possibly empty), `passage_id` (pretraining: the source passage, to
exclude from retrieval), `answers` (QA: all gold answers, for EM/F1).
"""
from __future__ import annotations

from typing import Any

import seqio

from atlas_jax_tasks.vocab import GinReaderVocabulary

# Names registered through `add_task` (ours, as opposed to other libraries' seqio tasks).
REGISTERED_TASKS: set[str] = set()


def default_vocabulary() -> seqio.Vocabulary:
    """The reader vocabulary from gin's `reader_vocabulary` binding (resolved lazily)."""
    return GinReaderVocabulary()


def output_features(vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
    """`inputs` and `targets`: rank-1 int32 ids of `vocabulary`, EOS appended."""
    vocabulary = vocabulary or default_vocabulary()
    return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=True),
            "targets": seqio.Feature(vocabulary, add_eos=True)}


def add_task(name: str, source: seqio.DataSource, preprocessors: list, *,
             vocabulary: seqio.Vocabulary | None = None, **task_kwargs: Any) -> seqio.Task:
    """Registers `name` in `seqio.TaskRegistry`, replacing an earlier registration of ours
    (so re-running a gin configuration re-points a task at new files).

    Args:
      name: task name.
      source: the seqio data source.
      preprocessors: the seqio preprocessors.
      vocabulary: the reader vocabulary (default: `default_vocabulary()`).
      **task_kwargs: `postprocess_fn`, `metric_fns`, ... for `seqio.Task`.

    Returns:
      the registered task.

    Raises:
      ValueError: `name` is already a task that atlas-jax did not register.
    """
    if name in seqio.TaskRegistry.names():
        if name not in REGISTERED_TASKS:
            raise ValueError(f"seqio task {name!r} is already registered by another library")
        seqio.TaskRegistry.remove(name)
    task = seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                                  output_features=output_features(vocabulary), **task_kwargs)
    REGISTERED_TASKS.add(name)
    return task

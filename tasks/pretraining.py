"""Pretraining tasks over a passages jsonl (`{"id", "title", "text"}`, + optional metadata).

* span corruption (T5; Atlas's MLM): noise density 0.15, mean span length 3;
  inputs "... <extra_id_0> ... <extra_id_1> ...", targets "<extra_id_0> span0 <extra_id_1> ...".
* prefix LM (Atlas's LM): the first half of the passage's tokens -> the second half.

Each example carries `passage_id` (its source passage, which retrieval should exclude) and
`query` (the decoded inputs, the retriever's input). A passage longer than the sequence
lengths allow is split into consecutive segments, each with the same `passage_id`.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import seqio

from atlas_jax_tasks import preprocessors
from atlas_jax_tasks.features import add_task
from atlas_jax_tasks.jsonl_source import JsonlDataSource, JsonlField

PASSAGE_FIELDS = (
    JsonlField("id"),
    JsonlField("title", required=False, default=""),
    JsonlField("text"),
)


def passages_source(split_to_filepattern: Mapping[str, str | Sequence[str]]
                    ) -> JsonlDataSource:
    """Jsonl source of passage records {id, title, text}."""
    return JsonlDataSource(split_to_filepattern, PASSAGE_FIELDS)


def _pretraining_preprocessors(objective, with_title: bool) -> list:
    return [functools.partial(preprocessors.rekey_passage, with_title=with_title),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            objective,
            seqio.preprocessors.append_eos_after_trim]


def register_span_corruption_task(
        name: str, split_to_filepattern: Mapping[str, str | Sequence[str]],
        vocabulary: seqio.Vocabulary | None = None, noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0, with_title: bool = True) -> seqio.Task:
    """Registers a T5 span-corruption task over passages.

    Args:
      name: task name.
      split_to_filepattern: split -> passages jsonl pattern (usually just "train").
      vocabulary: reader vocabulary (default: gin's `reader_vocabulary`).
      noise_density: fraction of tokens masked.
      mean_noise_span_length: mean masked span length.
      with_title: corrupt "{title} {text}" (else the text alone).

    Returns:
      the registered seqio.Task (features: inputs, targets, passage_id, query).
    """
    objective = functools.partial(preprocessors.span_corruption, noise_density=noise_density,
                                  mean_noise_span_length=mean_noise_span_length)
    return add_task(name, passages_source(split_to_filepattern),
                    _pretraining_preprocessors(objective, with_title), vocabulary=vocabulary)


def register_prefix_lm_task(
        name: str, split_to_filepattern: Mapping[str, str | Sequence[str]],
        vocabulary: seqio.Vocabulary | None = None, split_ratio: float = 0.5,
        with_title: bool = True) -> seqio.Task:
    """Registers a prefix-LM task over passages: first `split_ratio` of the tokens -> rest.

    Returns:
      the registered seqio.Task (features: inputs, targets, passage_id, query).
    """
    objective = functools.partial(preprocessors.prefix_lm, split_ratio=split_ratio)
    return add_task(name, passages_source(split_to_filepattern),
                    _pretraining_preprocessors(objective, with_title), vocabulary=vocabulary)

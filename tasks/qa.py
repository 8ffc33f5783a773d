"""Open-domain QA tasks (NQ-open / TriviaQA format) from jsonl files.

A record is `{"id", "question", "answers": [...]}` (+ optional `"filters": [...]`; a missing
id becomes `{file stem}-{line}`). Each example becomes

    inputs   "question: {question} answer: <extra_id_0>"
    targets  "<extra_id_0> {answer}"   (one gold answer, chosen per (answer_seed, id))
    query    the question (the retriever's input)
    answers  every gold answer (EM / F1 take the max over them)
    id, filters (and any extra fields the task declares, e.g. the ledger's kind, bql)

Metrics: `em` and `f1` in percent, SQuAD-normalised (`atlas_jax.evaluation`).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from atlas_jax import evaluation
from atlas_jax.vocabulary import SENTINEL_0, strip_sentinels  # noqa: F401 (re-exported)
from atlas_jax_tasks.features import add_task
from atlas_jax_tasks.jsonl_source import STRING_LIST, JsonlDataSource, JsonlField, line_id


QA_FIELDS = (
    JsonlField("id", required=False, default=line_id),
    JsonlField("question"),
    JsonlField("answers", STRING_LIST, non_empty=True),
    JsonlField("filters", STRING_LIST, required=False),
)


def choose_answer(answers: tf.Tensor, example_id: tf.Tensor, answer_seed: int) -> tf.Tensor:
    """One of `answers`, a function of (answer_seed, example_id) only: the same example gets
    the same answer in every epoch, shard and shuffle order.

    Args:
      answers: (n,) tf.string; n = 0 gives "".
      example_id: tf.string scalar.
      answer_seed: int seed.

    Returns:
      tf.string scalar.
    """
    count = tf.size(answers)
    fingerprint = tf.strings.to_hash_bucket_fast(example_id, 2**31 - 1)  # int64, stable
    seed = tf.stack([tf.constant(answer_seed, tf.int64), fingerprint])
    index = tf.random.stateless_uniform([], seed=seed, minval=0, maxval=tf.maximum(count, 1),
                                        dtype=tf.int32)
    return tf.concat([answers, [""]], axis=0)[index]


def qa_prompt(question: tf.Tensor) -> tf.Tensor:
    """"question: {q} answer: <extra_id_0>" (Atlas's QA prompt), for tf.string tensors."""
    return tf.strings.join(["question: ", tf.strings.strip(question), " answer: ", SENTINEL_0])


def qa_target(answer: tf.Tensor) -> tf.Tensor:
    """"<extra_id_0> {answer}"."""
    return tf.strings.join([SENTINEL_0, " ", tf.strings.strip(answer)])


def format_qa(dataset: tf.data.Dataset, answer_seed: int = 0, random_answer: bool = True
              ) -> tf.data.Dataset:
    """QA records -> {inputs, targets (strings), query, answers, id, filters, *others}.

    Args:
      answer_seed: seed of the training answer choice.
      random_answer: choose a random gold answer (else the first) as the target.
    """
    def format_example(features):
        answers = features["answers"]
        if random_answer:
            answer = choose_answer(answers, features["id"], answer_seed)
        else:
            answer = tf.concat([answers, [""]], axis=0)[0]
        others = {key: value for key, value in features.items() if key != "question"}
        return {**others, "inputs": qa_prompt(features["question"]),
                "targets": qa_target(answer), "query": features["question"]}
    return dataset.map(format_example, num_parallel_calls=tf.data.AUTOTUNE)


def qa_preprocessors(answer_seed: int = 0, random_answer: bool = True) -> list:
    """format_qa, tokenize (keeping `*_pretokenized`), EOS after trimming."""
    return [functools.partial(format_qa, answer_seed=answer_seed, random_answer=random_answer),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim]


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def qa_postprocessor(output: Any, example: Mapping[str, Any] | None = None,
                     is_target: bool = False) -> Any:
    """seqio postprocess_fn: a target becomes the example's gold answer list; a prediction
    becomes its answer text (sentinels stripped)."""
    if is_target:
        if example is not None and "answers" in example:
            return [_as_str(answer) for answer in np.asarray(example["answers"]).ravel()]
        return [strip_sentinels(_as_str(output))]
    return strip_sentinels(_as_str(output))


def qa_metrics(targets: Sequence[Sequence[str]], predictions: Sequence[str]
               ) -> dict[str, float]:
    """seqio metric_fn: exact match and token F1 (max over each example's gold answers).

    Args:
      targets: per example, its gold answers (a str is one answer).
      predictions: per example, the predicted answer.

    Returns:
      {"em": percent, "f1": percent}.
    """
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets for {len(predictions)} predictions")
    golds = [[gold] if isinstance(gold, str) else list(gold) for gold in targets]
    em = [evaluation.exact_match(p, gold) for p, gold in zip(predictions, golds)]
    f1 = [evaluation.f1(p, gold) for p, gold in zip(predictions, golds)]
    return {"em": 100.0 * float(np.mean(em)) if em else 0.0,
            "f1": 100.0 * float(np.mean(f1)) if f1 else 0.0}


def qa_source(split_to_filepattern: Mapping[str, str | Sequence[str]],
              extra_fields: Sequence[JsonlField] = ()) -> JsonlDataSource:
    """Jsonl source of QA records (`QA_FIELDS` + `extra_fields`)."""
    return JsonlDataSource(split_to_filepattern, QA_FIELDS + tuple(extra_fields))


def register_qa_task(name: str, split_to_filepattern: Mapping[str, str | Sequence[str]],
                     vocabulary: seqio.Vocabulary | None = None, answer_seed: int = 0,
                     random_answer: bool = True, extra_fields: Sequence[JsonlField] = (),
                     source: seqio.DataSource | None = None) -> seqio.Task:
    """Registers a QA task over jsonl files.

    Args:
      name: task name.
      split_to_filepattern: split -> jsonl file pattern.
      vocabulary: reader vocabulary (default: gin's `reader_vocabulary`, resolved lazily).
      answer_seed: seed of the deterministic training-answer choice.
      random_answer: random gold answer as target (else the first).
      extra_fields: more record fields to carry as features (ledger: kind, bql, ...).
      source: a ready data source yielding QA records (then `split_to_filepattern` and
        `extra_fields` are ignored); the TFDS tasks use this.

    Returns:
      the registered seqio.Task.
    """
    source = source or qa_source(split_to_filepattern, extra_fields)
    return add_task(name, source, qa_preprocessors(answer_seed, random_answer),
                    vocabulary=vocabulary, postprocess_fn=qa_postprocessor,
                    metric_fns=[qa_metrics])

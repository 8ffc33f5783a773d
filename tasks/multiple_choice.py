"""Multiple-choice tasks (MMLU format) with answer-option permutations, and their metrics.

A record is `{"id", "question", "options": {"A": text, "B": text, ...}, "answer": "B"}`.
An example shows the options under the record's letters (sorted) in some order:

    inputs   "question: {q} options: (A) {text} (B) {text} ... answer: <extra_id_0>"
    targets  "<extra_id_0> {letter of the correct option in this order}"

Permutations (Atlas): `single` (the record's order), `cyclic` (the n cyclic shifts; shift 0
is the record's order), `all` (the n! orders). Training usually uses the train mode and
evaluation `cyclic`, which gives both plain accuracy (shift 0) and debiased accuracy
(`multiple_choice_accuracy`: per-option probabilities averaged over the shifts).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from atlas_jax_tasks.features import add_task
from atlas_jax_tasks.jsonl_source import STRING_LIST, JsonlDataSource, JsonlField, line_id
from atlas_jax_tasks.qa import SENTINEL_0, strip_sentinels

PERMUTATION_MODES = ("single", "cyclic", "all")
MAX_OPTIONS_FOR_ALL = 7  # 7! = 5040 examples per record

MULTIPLE_CHOICE_FIELDS = (
    JsonlField("id", required=False, default=line_id),
    JsonlField("question"),
    JsonlField("option_letters", STRING_LIST, non_empty=True),
    JsonlField("option_texts", STRING_LIST, non_empty=True),
    JsonlField("answer"),
)


def split_options(record: Any, path: str, line_number: int) -> Any:
    """Record fn: `options` {letter: text} -> `option_letters`, `option_texts` (letters
    sorted); checks that `answer` is one of the letters."""
    where = f"{path}:{line_number}"
    if not isinstance(record, dict):
        return record  # parse_record reports it
    options = record.get("options")
    if not isinstance(options, dict) or not options or not all(
            isinstance(text, str) for text in options.values()):
        raise ValueError(f"{where}: 'options' must be a non-empty object of letter -> text")
    if record.get("answer") not in options:
        raise ValueError(f"{where}: answer {record.get('answer')!r} is not one of the "
                         f"options {sorted(options)}")
    letters = sorted(options)
    return {**record, "option_letters": letters,
            "option_texts": [options[letter] for letter in letters]}


def _all_permutations_table() -> tuple[np.ndarray, np.ndarray]:
    # Every n <= MAX_OPTIONS_FOR_ALL: its n! orders (itertools order, identity first)
    # flattened into one vector; offsets[n] is where n's block starts.
    blocks = [np.asarray(list(itertools.permutations(range(n))), np.int32).reshape(-1)
              for n in range(MAX_OPTIONS_FOR_ALL + 1)]
    offsets = np.cumsum([0] + [block.size for block in blocks]).astype(np.int32)
    return np.concatenate(blocks), offsets


_ALL_FLAT, _ALL_OFFSETS = _all_permutations_table()


def permutation_orders(num_options: tf.Tensor, mode_index: tf.Tensor) -> tf.Tensor:
    """The option orders of one example.

    Args:
      num_options: int32 scalar n.
      mode_index: int32 scalar, index into PERMUTATION_MODES.

    Returns:
      (k, n) int32: row r lists, for each display position, the original option index
      shown there. k = 1, n or n!; row 0 is the identity.
    """
    positions = tf.range(num_options)

    def single():
        return positions[tf.newaxis, :]

    def cyclic():  # shift s shows original option (i + s) % n at position i
        return (positions[tf.newaxis, :] + positions[:, tf.newaxis]) % num_options

    def all_orders():
        check = tf.debugging.assert_less_equal(
            num_options, MAX_OPTIONS_FOR_ALL,
            message=f"'all' permutations support at most {MAX_OPTIONS_FOR_ALL} options")
        with tf.control_dependencies([check]):
            offsets = tf.constant(_ALL_OFFSETS)
            flat = tf.constant(_ALL_FLAT)[offsets[num_options]:offsets[num_options + 1]]
            return tf.reshape(flat, [-1, num_options])

    return tf.switch_case(mode_index, [single, cyclic, all_orders])


def expand_permutations(dataset: tf.data.Dataset, train_permutations: str = "single",
                        eval_permutations: str = "cyclic",
                        train_splits: Sequence[str] = ("train",)) -> tf.data.Dataset:
    """One multiple-choice record -> one example per option order.

    Records need `split` (the source adds it): `train_permutations` applies to
    `train_splits`, `eval_permutations` to the others.

    Returns:
      examples {inputs, targets (strings), id ("{example_id}/{order}"), example_id, query,
      option_letters (display letters), options_order (original letters in display order),
      answer (display letter), original_answer, split}.
    """
    for mode in (train_permutations, eval_permutations):
        if mode not in PERMUTATION_MODES:
            raise ValueError(f"permutations must be one of {PERMUTATION_MODES}, got {mode!r}")
    train_splits = tf.constant(list(train_splits) or [""])
    train_mode = PERMUTATION_MODES.index(train_permutations)
    eval_mode = PERMUTATION_MODES.index(eval_permutations)

    def permuted_examples(features):
        letters, texts = features["option_letters"], features["option_texts"]
        is_train = tf.reduce_any(tf.equal(features["split"], train_splits))
        mode_index = tf.where(is_train, train_mode, eval_mode)
        orders = permutation_orders(tf.size(letters), mode_index)  # (k, n)
        answer_index = tf.argmax(tf.cast(tf.equal(letters, features["answer"]), tf.int32),
                                 output_type=tf.int32)
        # The retriever query is the same for every order: question + options as given.
        query = tf.strings.join(
            [features["question"], tf.strings.reduce_join(texts, separator=" ")], separator=" ")

        def one_order(order):  # order: (n,) original index per display position
            shown_texts = tf.gather(texts, order)
            options = tf.strings.reduce_join(
                tf.strings.join(["(", letters, ") ", shown_texts]), separator=" ")
            answer = letters[tf.argmax(tf.cast(tf.equal(order, answer_index), tf.int32),
                                       output_type=tf.int32)]
            options_order = tf.gather(letters, order)
            return {
                "inputs": tf.strings.join(["question: ", features["question"], " options: ",
                                           options, " answer: ", SENTINEL_0]),
                "targets": tf.strings.join([SENTINEL_0, " ", answer]),
                "id": tf.strings.join([features["id"], "/",
                                       tf.strings.reduce_join(options_order)]),
                "example_id": features["id"], "query": query, "option_letters": letters,
                "options_order": options_order, "answer": answer,
                "original_answer": features["answer"], "split": features["split"],
            }

        return tf.data.Dataset.from_tensor_slices(orders).map(one_order)

    return dataset.flat_map(permuted_examples)


def multiple_choice_metrics(targets: Sequence[str], predictions: Sequence[str]
                            ) -> dict[str, float]:
    """seqio metric_fn: percent of predicted letters equal to the target letter."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets for {len(predictions)} predictions")
    hits = [p.strip() == t.strip() for t, p in zip(targets, predictions)]
    return {"accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0}


def multiple_choice_postprocessor(output: Any, example: Mapping[str, Any] | None = None,
                                  is_target: bool = False) -> str:
    """seqio postprocess_fn: "<extra_id_0> B" -> "B" (targets and predictions alike)."""
    del example, is_target
    return strip_sentinels(output.decode("utf-8") if isinstance(output, bytes) else output)


def _softmax(log_likelihoods: np.ndarray) -> np.ndarray:
    shifted = np.exp(log_likelihoods - log_likelihoods.max())
    return shifted / shifted.sum()


def multiple_choice_accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Plain and debiased accuracy from option-letter log-likelihoods.

    Args:
      records: one per (example, order): `example_id`; `options_order` (original letter at
        each display position, e.g. ["B", "C", "A"]); `letter_log_likelihoods` {display
        letter: log p("<extra_id_0> {letter}" | inputs)}; `original_answer`.

    Returns:
      {"accuracy": percent, argmax letter of the identity order;
       "debiased_accuracy": percent, argmax over original options of the probabilities
         (softmax over the letters) averaged over all given orders (Atlas: cyclic);
       "examples": number of examples}.

    Raises:
      ValueError: an example without its identity order, or inconsistent records.
    """
    by_example: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_example.setdefault(str(record["example_id"]), []).append(record)
    plain_hits, debiased_hits = [], []
    for example_id, group in by_example.items():
        letters = sorted(group[0]["options_order"])
        answer = group[0]["original_answer"]
        plain, summed = None, np.zeros(len(letters))
        for record in group:
            order = list(record["options_order"])
            if sorted(order) != letters or record["original_answer"] != answer:
                raise ValueError(f"example {example_id}: inconsistent permutation records")
            scores = np.asarray([record["letter_log_likelihoods"][letter] for letter in letters],
                                np.float64)  # by display letter
            probabilities = _softmax(scores)
            for display_index, original_letter in enumerate(order):
                summed[letters.index(original_letter)] += probabilities[display_index]
            if order == letters:
                plain = order[int(np.argmax(scores))]
        if plain is None:
            raise ValueError(f"example {example_id}: no record in the identity order")
        plain_hits.append(plain == answer)
        debiased_hits.append(letters[int(np.argmax(summed))] == answer)
    count = len(by_example)
    return {"accuracy": 100.0 * float(np.mean(plain_hits)) if count else 0.0,
            "debiased_accuracy": 100.0 * float(np.mean(debiased_hits)) if count else 0.0,
            "examples": float(count)}


def expected_orders(num_options: int, mode: str) -> int:
    """How many examples one record expands into: 1, n or n!."""
    return {"single": 1, "cyclic": num_options, "all": math.factorial(num_options)}[mode]


def register_multiple_choice_task(
        name: str, split_to_filepattern: Mapping[str, str | Sequence[str]],
        vocabulary: seqio.Vocabulary | None = None, train_permutations: str = "single",
        eval_permutations: str = "cyclic", train_splits: Sequence[str] = ("train",)
        ) -> seqio.Task:
    """Registers a multiple-choice task over jsonl files.

    Args:
      name: task name.
      split_to_filepattern: split -> jsonl pattern.
      vocabulary: reader vocabulary (default: gin's `reader_vocabulary`).
      train_permutations: "single" | "cyclic" | "all" for `train_splits`.
      eval_permutations: the same for the other splits ("cyclic" gives debiased accuracy).
      train_splits: the splits that use `train_permutations`.

    Returns:
      the registered seqio.Task.
    """
    for mode in (train_permutations, eval_permutations):
        if mode not in PERMUTATION_MODES:
            raise ValueError(f"permutations must be one of {PERMUTATION_MODES}, got {mode!r}")
    source = JsonlDataSource(split_to_filepattern, MULTIPLE_CHOICE_FIELDS, add_split=True,
                             record_fn=split_options)
    expand = functools.partial(expand_permutations, train_permutations=train_permutations,
                               eval_permutations=eval_permutations,
                               train_splits=tuple(train_splits))
    return add_task(name, source, [expand, seqio.preprocessors.tokenize,
                                   seqio.preprocessors.append_eos_after_trim],
                    vocabulary=vocabulary, postprocess_fn=multiple_choice_postprocessor,
                    metric_fns=[multiple_choice_metrics])

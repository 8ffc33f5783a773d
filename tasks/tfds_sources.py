"""TFDS-backed QA tasks: `natural_questions_open` and `trivia_qa`.

They read data the user has already prepared (`tfds build natural_questions_open
--data_dir DIR`); they never download. The data directory is, in order: the
`data_dir` given to `register_tfds_qa_tasks` (gin: `register_tfds_qa_tasks.data_dir =
%TFDS_DATA_DIR`; `atlas-jax --tfds_data_dir`), seqio's `set_tfds_data_dir_override`, TFDS's
default (`~/tensorflow_datasets`). Their records become QA records (see `qa.py`):

    natural_questions_open  question, answer[]      -> id "nq-{fingerprint of question}"
    trivia_qa (unfiltered.nocontext)  question_id, question, answer.value + answer.aliases
"""
from __future__ import annotations

from typing import Callable

import gin
import seqio
import tensorflow as tf

from atlas_jax_tasks.qa import register_qa_task

NATURAL_QUESTIONS_OPEN = "natural_questions_open:1.0.0"
TRIVIA_QA = "trivia_qa/{config}:1.1.0"


def natural_questions_open_to_qa(features: dict) -> dict:
    """NQ-open features {question, answer (n,)} -> QA record {id, question, answers,
    filters}; the id is a stable fingerprint of the question (NQ-open has none)."""
    fingerprint = tf.strings.to_hash_bucket_fast(features["question"], 2**62)
    return {"id": tf.strings.join(["nq-", tf.strings.as_string(fingerprint)]),
            "question": features["question"], "answers": features["answer"],
            "filters": tf.constant([], tf.string)}


def trivia_qa_to_qa(features: dict) -> dict:
    """TriviaQA features -> QA record; answers: the answer value then its aliases
    (duplicates dropped, first occurrence kept)."""
    answer = features["answer"]
    answers, _ = tf.unique(tf.concat([[answer["value"]], answer["aliases"]], axis=0))
    return {"id": features["question_id"], "question": features["question"],
            "answers": tf.boolean_mask(answers, tf.strings.length(answers) > 0),
            "filters": tf.constant([], tf.string)}


class LocalTfdsDataSource(seqio.TfdsDataSource):
    """A read-only `seqio.TfdsDataSource` that maps records through `to_record` and says
    where it looked when the data is not prepared."""

    def __init__(self, tfds_name: str, to_record: Callable[[dict], dict],
                 tfds_data_dir: str | None = None, splits=None):
        super().__init__(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=splits,
                         read_only=True)
        self._to_record = to_record

    def get_dataset(self, split: str | None = None, shuffle: bool = True,
                    seed: int | None = None, shard_info: seqio.ShardInfo | None = None,
                    **kwargs) -> tf.data.Dataset:
        """The split's records mapped to QA records; FileNotFoundError if not prepared."""
        builder = self.tfds_dataset.builder
        if not builder.is_prepared():
            name = self.tfds_dataset.name.split(":")[0]
            raise FileNotFoundError(
                f"TFDS dataset {self.tfds_dataset.name} is not prepared in {builder.data_dir} "
                f"(data_dir {self.tfds_dataset.data_dir or 'default'}); atlas-jax never "
                f"downloads it: run `tfds build {name} --data_dir DIR` where you can, then "
                "pass --tfds_data_dir DIR (gin: TFDS_DATA_DIR)")
        dataset = super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
        return dataset.map(self._to_record, num_parallel_calls=tf.data.AUTOTUNE)


TFDS_QA_TASKS = ("natural_questions_open", "trivia_qa")


@gin.configurable
def register_tfds_qa_tasks(data_dir: str | None = None,
                           vocabulary: seqio.Vocabulary | None = None, answer_seed: int = 0,
                           trivia_qa_config: str = "unfiltered.nocontext") -> list[str]:
    """Registers (or re-registers) `natural_questions_open` and `trivia_qa`.

    Args:
      data_dir: TFDS data directory (None: seqio's override, else TFDS's default).
      vocabulary: reader vocabulary (default: gin's `reader_vocabulary`, resolved lazily).
      answer_seed: seed of the training-answer choice.
      trivia_qa_config: TriviaQA builder config (Atlas / FiD use the unfiltered set).

    Returns:
      the task names.
    """
    register_qa_task("natural_questions_open", {}, vocabulary=vocabulary,
                     answer_seed=answer_seed, source=LocalTfdsDataSource(
                         NATURAL_QUESTIONS_OPEN, natural_questions_open_to_qa, data_dir,
                         splits=("train", "validation")))
    # TriviaQA's test split has no answers: train and validation only.
    register_qa_task("trivia_qa", {}, vocabulary=vocabulary, answer_seed=answer_seed,
                     source=LocalTfdsDataSource(
                         TRIVIA_QA.format(config=trivia_qa_config), trivia_qa_to_qa,
                         data_dir, splits=("train", "validation")))
    return list(TFDS_QA_TASKS)

"""Which atlas-jax SeqIO tasks exist, and how the ones whose data paths come from gin
get registered.

On import, `atlas_jax_tasks` registers the TFDS tasks (no path needed: TFDS's data directory).
The others read files named in gin; t5x-style run configs bind macros

    from atlas_jax_tasks import registry, ledger_tasks, vocab
    vocab.reader_vocabulary.spiece_model = %READER_SPM
    registry.register_jsonl_tasks.qa_train_file = %QA_TRAIN_FILE
    registry.register_jsonl_tasks.qa_validation_file = %QA_VALIDATION_FILE
    registry.register_jsonl_tasks.passages_file = %PASSAGES_FILE
    registry.register_jsonl_tasks.mc_train_file = %MC_TRAIN_FILE
    ledger_tasks.register_ledger_tasks.ledger_dir = %LEDGER_DIR

and the program calls `register_configured_tasks()` once gin is parsed, before it looks up
`MIXTURE_OR_TASK_NAME`. `list_tasks()` names every task (for `atlas-jax data list`).
"""
from __future__ import annotations

import gin
import seqio

from atlas_jax_tasks.features import REGISTERED_TASKS
from atlas_jax_tasks.ledger_tasks import register_ledger_tasks
from atlas_jax_tasks.multiple_choice import register_multiple_choice_task
from atlas_jax_tasks.pretraining import register_prefix_lm_task, register_span_corruption_task
from atlas_jax_tasks.qa import register_qa_task
from atlas_jax_tasks.synthetic import register_synthetic_tasks
from atlas_jax_tasks.tfds_sources import register_tfds_qa_tasks

TASK_DESCRIPTIONS = {
    "natural_questions_open": "QA, TFDS natural_questions_open (--tfds_data_dir / TFDS_DATA_DIR)",
    "trivia_qa": "QA, TFDS trivia_qa/unfiltered.nocontext (--tfds_data_dir / TFDS_DATA_DIR)",
    "jsonl_qa": "QA from jsonl {id, question, answers} (QA_TRAIN_FILE, QA_VALIDATION_FILE, "
                "QA_TEST_FILE)",
    "passages_mlm": "T5 span corruption (0.15, mean span 3) over a passages jsonl "
                    "(PASSAGES_FILE)",
    "passages_prefix_lm": "prefix LM (split 0.5) over a passages jsonl (PASSAGES_FILE)",
    "jsonl_multiple_choice": "multiple choice, MMLU-format jsonl with option permutations "
                             "(MC_TRAIN_FILE, MC_VALIDATION_FILE, MC_TEST_FILE)",
    "ledger_qa": "Beancount ledger QA: train, validation, test, new, train_64 (LEDGER_DIR)",
    "ledger_mlm": "span corruption over the ledger's passages (LEDGER_DIR)",
    "synthetic_qa": "synthetic joint-training QA: one passage states each answer "
                    "(SYNTHETIC_DIR, generated when missing)",
}


def list_tasks() -> list[str]:
    """Every atlas-jax task name, registered yet or not (for `atlas-jax data list`)."""
    return sorted(TASK_DESCRIPTIONS)


def describe_tasks() -> dict[str, str]:
    """Task name -> one line: what it is and which flag / gin macro gives its data."""
    return dict(sorted(TASK_DESCRIPTIONS.items()))


def registered_tasks() -> list[str]:
    """The atlas-jax tasks registered in `seqio.TaskRegistry` right now."""
    return sorted(name for name in REGISTERED_TASKS if name in seqio.TaskRegistry.names())


def _splits(**files: str | None) -> dict[str, str]:
    return {split: str(path) for split, path in files.items() if path}


@gin.configurable
def register_jsonl_tasks(qa_train_file: str | None = None,
                         qa_validation_file: str | None = None,
                         qa_test_file: str | None = None,
                         passages_file: str | None = None,
                         mc_train_file: str | None = None,
                         mc_validation_file: str | None = None,
                         mc_test_file: str | None = None,
                         mc_train_permutations: str = "single",
                         mc_eval_permutations: str = "cyclic",
                         answer_seed: int = 0,
                         vocabulary: seqio.Vocabulary | None = None) -> list[str]:
    """Registers the file-backed tasks whose files are given (each may be a glob).

    Args:
      qa_*_file: QA jsonl per split -> `jsonl_qa`.
      passages_file: passages jsonl -> `passages_mlm` and `passages_prefix_lm` (split train).
      mc_*_file: multiple-choice jsonl per split -> `jsonl_multiple_choice`.
      mc_train_permutations, mc_eval_permutations: "single" | "cyclic" | "all".
      answer_seed: seed of the QA training-answer choice.
      vocabulary: reader vocabulary (default: gin's `reader_vocabulary`, resolved lazily).

    Returns:
      the registered task names.
    """
    names = []
    qa_splits = _splits(train=qa_train_file, validation=qa_validation_file, test=qa_test_file)
    if qa_splits:
        register_qa_task("jsonl_qa", qa_splits, vocabulary=vocabulary, answer_seed=answer_seed)
        names.append("jsonl_qa")
    if passages_file:
        register_span_corruption_task("passages_mlm", {"train": str(passages_file)},
                                      vocabulary=vocabulary)
        register_prefix_lm_task("passages_prefix_lm", {"train": str(passages_file)},
                                vocabulary=vocabulary)
        names += ["passages_mlm", "passages_prefix_lm"]
    mc_splits = _splits(train=mc_train_file, validation=mc_validation_file, test=mc_test_file)
    if mc_splits:
        register_multiple_choice_task("jsonl_multiple_choice", mc_splits, vocabulary=vocabulary,
                                      train_permutations=mc_train_permutations,
                                      eval_permutations=mc_eval_permutations)
        names.append("jsonl_multiple_choice")
    return names


def register_configured_tasks() -> list[str]:
    """Registers every task whose data the gin configuration names (call after parsing
    gin); the TFDS tasks are re-registered with the configured data directory.

    Returns:
      the names registered by this call.
    """
    return (register_tfds_qa_tasks() + register_jsonl_tasks() + register_ledger_tasks()
            + register_synthetic_tasks())

"""SeqIO task registrations of atlas-jax; installed as `atlas_jax_tasks`.

Importing the package registers the TFDS QA tasks (`natural_questions_open`, `trivia_qa`);
tasks over files named in gin (`jsonl_qa`, `passages_mlm`, `passages_prefix_lm`,
`jsonl_multiple_choice`, `ledger_qa`, `ledger_mlm`) register when
`register_configured_tasks()` runs after gin is parsed. `list_tasks()` names them all.

Modules: vocab (reader vocabulary), jsonl_source (jsonl data source), features (output
features, task registration), preprocessors (span corruption, prefix LM), qa,
pretraining, multiple_choice, tfds_sources, ledger_tasks, ledger_salient (salient-span
masking of ledger entries), registry.
"""
from atlas_jax_tasks.registry import (describe_tasks, list_tasks, register_configured_tasks,
                                      register_jsonl_tasks, registered_tasks)
from atlas_jax_tasks.ledger_tasks import register_ledger_tasks
from atlas_jax_tasks.tfds_sources import register_tfds_qa_tasks
from atlas_jax_tasks.vocab import reader_vocabulary, train_reader_spiece

register_tfds_qa_tasks()

__all__ = ["describe_tasks", "list_tasks", "reader_vocabulary", "register_configured_tasks",
           "register_jsonl_tasks", "register_ledger_tasks", "register_tfds_qa_tasks",
           "registered_tasks", "train_reader_spiece"]

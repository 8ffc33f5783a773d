"""SeqIO tasks over a generated Beancount ledger folder (`atlas-jax data ledger --out DIR`).

The folder holds `passages.jsonl` (one passage per transaction / balance assertion) and
`qa_{train,dev,test,new}.jsonl` + `qa_train_64.jsonl` (QA records with `kind`, `gold_ids`,
`filters`, `bql`, `phrasing`). Tasks:

    ledger_qa   QA (qa.py) over the splits train, validation (= dev), test, new, train_64;
                features also carry kind, gold_ids, bql, phrasing (as JSON text)
    ledger_mlm  T5 span corruption over the ledger passages' text (split train)

They register when `register_ledger_tasks` runs with the folder, e.g. from gin:

    from atlas_jax_tasks import ledger_tasks
    LEDGER_DIR = '/data/ledger'
    ledger_tasks.register_ledger_tasks.ledger_dir = %LEDGER_DIR

and `atlas_jax_tasks.register_configured_tasks()` is called after parsing.
"""
from __future__ import annotations

from pathlib import Path

import gin
import seqio

from atlas_jax_tasks.jsonl_source import JSON, STRING_LIST, JsonlField
from atlas_jax_tasks.pretraining import register_span_corruption_task
from atlas_jax_tasks.qa import register_qa_task

PASSAGES_FILE = "passages.jsonl"
# seqio split -> file in the ledger folder.
QA_SPLIT_FILES = {
    "train": "qa_train.jsonl",
    "validation": "qa_dev.jsonl",
    "test": "qa_test.jsonl",
    "new": "qa_new.jsonl",
    "train_64": "qa_train_64.jsonl",
}
LEDGER_QA_FIELDS = (
    JsonlField("kind", required=False, default=""),
    JsonlField("gold_ids", STRING_LIST, required=False),
    JsonlField("bql", required=False, default=""),
    # {"date", "amount", "payee", "template"}: the surface forms used; kept as JSON text.
    JsonlField("phrasing", JSON, required=False, default=""),
)
LEDGER_TASKS = ("ledger_qa", "ledger_mlm")


@gin.configurable
def register_ledger_tasks(ledger_dir: str | None = None,
                          vocabulary: seqio.Vocabulary | None = None,
                          random_answer: bool = False, answer_seed: int = 0,
                          qa_task: str = "ledger_qa", mlm_task: str = "ledger_mlm"
                          ) -> list[str]:
    """Registers (or re-registers) `ledger_qa` and `ledger_mlm` over `ledger_dir`.

    Args:
      ledger_dir: the generated folder (gin macro `LEDGER_DIR`); None registers nothing.
      vocabulary: reader vocabulary (default: gin's `reader_vocabulary`, resolved lazily).
      random_answer: train on a random gold answer; by default the first, the ledger's own
        form (the others are the same value written differently, e.g. "$45.60").
      answer_seed: seed of the training-answer choice when `random_answer`.
      qa_task, mlm_task: task names (to register several ledgers side by side).

    Returns:
      the registered task names.

    Raises:
      FileNotFoundError: the folder, its passages or its train questions are missing.
    """
    if ledger_dir is None:
        return []
    folder = Path(ledger_dir)
    for required in (PASSAGES_FILE, QA_SPLIT_FILES["train"]):
        if not (folder / required).is_file():
            raise FileNotFoundError(
                f"{folder / required}: not found (gin: register_ledger_tasks.ledger_dir / "
                f"LEDGER_DIR = {str(ledger_dir)!r}); generate the folder with "
                "`atlas-jax data ledger --out DIR`")
    # Splits whose file exists (an older folder may lack train_64 or new).
    splits = {split: str(folder / name) for split, name in QA_SPLIT_FILES.items()
              if (folder / name).is_file()}
    register_qa_task(qa_task, splits, vocabulary=vocabulary, answer_seed=answer_seed,
                     random_answer=random_answer, extra_fields=LEDGER_QA_FIELDS)
    # A ledger passage's text is the whole entry (its title repeats the date and payee).
    register_span_corruption_task(mlm_task, {"train": str(folder / PASSAGES_FILE)},
                                  vocabulary=vocabulary, with_title=False)
    return [qa_task, mlm_task]

"""What ledger runs bind in `TrainConfig` (gin: `from atlas_jax.ledger import filters`):

  * `query_filters = @filters.ledger_filter_parser`: structured filters (dates, accounts,
    amounts, payees) read off each question by `atlas_jax_tasks.ledger_query`, against the
    vocabulary of the passage store's own metadata;
  * `answer_selector = @filters.ledger_answer_selector`: of the beams, the most likely answer
    of the form the question asks for that the evidence read states, an entry that satisfies
    the question's filters first (`checks.choose_beam`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

_VOCABULARIES: dict[tuple[int, int], Any] = {}


def ledger_vocabulary(store):
    """The accounts, payees and currencies of a passage store's entries (cached per store and
    size: a synced store that grew gets a new one)."""
    from atlas_jax_tasks import ledger_query
    key = id(store), len(store)
    if key not in _VOCABULARIES:
        _VOCABULARIES[key] = ledger_query.LedgerVocabulary.from_records(
            {"id": i, "metadata": m} for i, m in zip(store.ids, store.metadata))
    return _VOCABULARIES[key]


def ledger_filter_parser(texts, store) -> list[list[str]]:
    """`TrainConfig.query_filters` for ledger questions: filters parsed from the text."""
    from atlas_jax_tasks import ledger_query
    vocabulary = ledger_vocabulary(store)
    return [list(ledger_query.parse_query(t, vocabulary).filters) for t in texts]


def satisfying(entries, conditions) -> list:
    """The evidence entries ({"metadata": ...}) whose metadata satisfies every `--where`
    condition; a field none of them has is satisfied by none."""
    from atlas_jax.index.filters import MetadataTable
    table = MetadataTable([e.get("metadata") or {} for e in entries])
    keep = np.ones(len(entries), bool)
    for condition in conditions:
        try:
            keep &= table.condition_mask(condition)
        except ValueError:          # no entry read has the field
            keep[:] = False
    return [e for e, k in zip(entries, keep) if k]


def ledger_answer_selector(questions, beams, evidence, store) -> list[int]:
    """`TrainConfig.answer_selector` for ledger questions: `checks.choose_beam` with the answer
    type and filters parsed from each question (grounding in an entry read that satisfies
    the filters first, then in any entry read). An amount asked over a span of days and no
    single day (`How much did I spend on food in May 2023?`) is a total no entry states:
    form only."""
    from atlas_jax.ledger import checks
    from atlas_jax_tasks import ledger_query
    vocabulary = None if store is None else ledger_vocabulary(store)
    chosen = []
    for question, answers, read in zip(questions, beams, evidence):
        parsed = ledger_query.parse_query(question, vocabulary)
        if parsed.answer_type == "amount" and parsed.date is None and \
                parsed.date_range is not None:
            read = []
        preferred = satisfying(read, parsed.filters) if parsed.filters else []
        chosen.append(checks.choose_beam(answers, parsed.answer_type, read, preferred))
    return chosen

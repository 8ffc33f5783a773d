"""The ledger filter parser bound as `TrainConfig.query_filters` (gin: `from atlas_jax.ledger
import filters`, then `@filters.ledger_filter_parser`): structured filters (dates, accounts,
amounts, payees) read off each question by `atlas_jax_tasks.ledger_query`, against the
vocabulary of the passage store's own metadata."""
from __future__ import annotations

from typing import Any

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

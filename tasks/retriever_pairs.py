"""Training pairs of the shipped ledger retriever (`atlas-jax retriever pretrain`).

The same unsupervised material as the shipped reader (`reader_corpus`): Beancount ledgers
generated with seeds and years no evaluation uses, and the entries' own fields. A query is a
*probe* of an entry (`payee? 5 Jan 2012 $40.88`: one field named, the date and one other field
as cues in the surface forms people write them in; half the time without the field name), its
positive the entry, and its hard negatives entries of the same day, nearby days or the same
payee (`reader_corpus.Distractors`). Never a QA template, question or answer.

    pools = [Pool.build(records) for records in ledgers]
    queries, passages = pairs(pools, step, seed, batch_size=32, hard_negatives=1)
    # passages: for query i, rows i * (1 + hard_negatives) (positive) and the next ones
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from atlas_jax_tasks import reader_corpus


def passage_text(record: dict) -> str:
    """What the index embeds for a passage record: `"{title} {text}"`."""
    return f"{record.get('title', '')} {record['text']}".strip()


@dataclasses.dataclass
class Pool:
    """One ledger's entries and their hard distractors."""
    records: list[dict]
    distractors: reader_corpus.Distractors

    @classmethod
    def build(cls, records: Sequence[dict]) -> "Pool":
        return cls(list(records), reader_corpus.Distractors(records))


def probe(record: dict, rng: random.Random, name_fraction: float = 0.5
          ) -> tuple[str, str] | None:
    """(field, query text) of one random probe of `record` (None if it has none)."""
    options = list(reader_corpus.probes(record, rng))
    if not options:
        return None
    field, text, _ = rng.choice(options)
    if rng.random() >= name_fraction:
        text = text.split("? ", 1)[1]        # the cues alone: `5 Jan 2012 $40.88`
    return field, text


def pairs(pools: Sequence[Pool], step: int, seed: int, batch_size: int,
          hard_negatives: int = 1, name_fraction: float = 0.5
          ) -> tuple[list[str], list[str]]:
    """The batch of `step`: `batch_size` queries and `batch_size * (1 + hard_negatives)`
    passages (each query's positive, then its hard negatives). A function of (seed, step)."""
    rng = random.Random(seed * 1_000_003 + step)
    weights = [len(p.records) for p in pools]
    queries: list[str] = []
    passages: list[str] = []
    while len(queries) < batch_size:
        pool = rng.choices(pools, weights)[0]
        row = rng.randrange(len(pool.records))
        drawn = probe(pool.records[row], rng, name_fraction)
        if drawn is None:
            continue
        queries.append(drawn[1])
        passages.append(passage_text(pool.records[row]))
        passages += [passage_text(pool.records[r])
                     for r in pool.distractors.sample(row, hard_negatives, rng)]
    return queries, passages


def eval_probes(records: Sequence[dict], per_field: int, seed: int = 0
                ) -> list[tuple[str, str, int]]:
    """(field, query, source row) for at most `per_field` probes of each field, drawn once
    from a fixed seed (the held-out set of the model card)."""
    rng = random.Random(seed)
    by_field: dict[str, list[tuple[str, str, int]]] = {}
    for row, record in enumerate(records):
        for field, text, _ in reader_corpus.probes(record, rng):
            by_field.setdefault(field, []).append((field, text, row))
    out = []
    for field in sorted(by_field):
        found = by_field[field]
        out += rng.sample(found, min(per_field, len(found)))
    return out

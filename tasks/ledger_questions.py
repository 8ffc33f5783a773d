"""Ledger QA questions: candidates from the entries, phrasing, BQL proof, splits.

Split out of `ledger.py` (which re-exports these names): see its docstring for the kinds of
question, how each is proven with BQL, and how questions are split by time and by entry.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import random
import re
from decimal import Decimal
from typing import Any, Sequence

from atlas_jax_tasks import ledger_phrasing as phrasing

SPLIT_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
SPLITS = ("train", "dev", "test", "new")
KINDS = ("payment_amount", "expense_account", "payee_of", "balance", "monthly_total")
AGGREGATE_KINDS = ("monthly_total",)
USD = phrasing.OPERATING_CURRENCY

# One BQL template per kind; `%(name)s` placeholders are filled with BQL literals.
BQL_TEMPLATES = {
    "payment_amount": ("SELECT number, currency WHERE date = %(date)s AND payee = %(payee)s "
                       "AND account ~ '^Expenses:'"),
    "expense_account": ("SELECT account WHERE date = %(date)s AND payee = %(payee)s "
                        "AND account ~ '^Expenses:'"),
    "payee_of": ("SELECT DISTINCT payee WHERE date = %(date)s AND currency = 'USD' "
                 "AND abs(number) = %(amount)s"),
    "balance": "SELECT amount FROM #balances WHERE date = %(date)s AND account = %(account)s",
    "monthly_total": ("SELECT sum(number) AS total, currency WHERE account ~ %(pattern)s "
                      "AND currency = 'USD' AND date >= %(first)s AND date <= %(last)s "
                      "GROUP BY currency"),
}
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class LedgerError(ValueError):
    """A ledger that cannot be generated, parsed or validated; the message carries the
    ledger's own `file:line: message` lines."""


# ------------------------------------------------------------------------------------- BQL

def bql_literal(value: Any) -> str:
    """A BQL literal: dates bare (`2023-03-14`), numbers plain, strings quoted."""
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'  # BQL has no escapes; a quote-carrying string is double-quoted
    raise ValueError(f"cannot write {text!r} as a BQL string: it has both kinds of quotes")


def render_bql(template: str, params: dict) -> str:
    """Fills `%(name)s` placeholders with `bql_literal`s: the self-contained query."""
    return _PLACEHOLDER.sub(lambda m: bql_literal(params[m.group(1)]), template)


def run_bql(entries: Sequence[Any], options: dict, query: str) -> list[tuple]:
    """Runs one BQL query with beanquery over loaded entries; returns the result rows."""
    import beanquery

    connection = beanquery.connect("beancount:", entries=entries, errors=[], options=options)
    return connection.execute(query).fetchall()


def answers_from_rows(kind: str, rows: Sequence[tuple]) -> list[str]:
    """The acceptable answers of a question of `kind` from its BQL rows (exactly one)."""
    if len(rows) != 1:
        raise LedgerError(f"a {kind} query returned {len(rows)} rows, expected 1: {rows!r}")
    row = rows[0]
    if kind in ("payment_amount", "monthly_total"):
        return phrasing.answer_forms_amount(row[0], row[1])
    if kind == "balance":
        return phrasing.answer_forms_amount(row[0].number, row[0].currency)
    if kind == "expense_account":
        return phrasing.answer_forms_account(row[0])
    if kind == "payee_of":
        return [row[0]]
    raise ValueError(f"unknown question kind {kind!r}")


# ------------------------------------------------------------------------------- questions

@dataclasses.dataclass
class _Candidate:
    """A question before phrasing: what to ask, how to prove it, where its answer lives."""
    kind: str
    split_group: str          # questions sharing a group share a split (an entry, a month)
    first_date: datetime.date
    params: dict              # BQL parameters
    phrase_args: dict         # arguments of `phrasing.phrase_question`
    gold_ids: list[str]
    filters: list[str]
    record_id: str


def _payment_posting(entry: Any) -> Any | None:
    """The expense posting of a payment (see the module doc), else None."""
    if not entry.payee or entry.payee != entry.payee.strip() or len(entry.postings) != 2:
        return None
    expenses = [p for p in entry.postings if p.account.startswith("Expenses:")]
    if len(expenses) != 1:
        return None
    posting = expenses[0]
    return posting if posting.units.currency == USD and posting.units.number > 0 else None


def _entry_candidates(passages: list[tuple[dict, Any]]) -> list[_Candidate]:
    from beancount.core import data

    transactions = [(r, e) for r, e in passages if isinstance(e, data.Transaction)]
    payees_per_day = collections.Counter((e.date, (e.payee or "").casefold())
                                         for _, e in transactions if e.payee)
    amounts_per_day = collections.Counter()
    for _, entry in transactions:
        for number in {abs(p.units.number) for p in entry.postings if p.units.currency == USD}:
            amounts_per_day[(entry.date, number)] += 1

    candidates = []
    for record, entry in passages:
        pid, day = record["id"], entry.date
        if isinstance(entry, data.Balance):
            candidates.append(_Candidate(
                "balance", pid, day, {"date": day, "account": entry.account},
                {"day": day, "account": entry.account}, [pid],
                [f"date={day}", f"accounts={entry.account}"], f"balance:{pid}"))
            continue
        posting = _payment_posting(entry)
        if posting is None:
            continue
        payee = entry.payee
        if payees_per_day[(day, payee.casefold())] == 1:
            filters = [f"date={day}", f"payee={payee}", "accounts^=Expenses:"]
            for kind in ("payment_amount", "expense_account"):
                candidates.append(_Candidate(
                    kind, pid, day, {"date": day, "payee": payee},
                    {"day": day, "payee": payee}, [pid], filters, f"{kind}:{pid}"))
        number = posting.units.number
        if amounts_per_day[(day, number)] == 1:
            candidates.append(_Candidate(
                "payee_of", pid, day, {"date": day, "amount": number},
                {"day": day, "amount": (number, USD)}, [pid],
                [f"date={day}", f"amount={format(number, 'f')}"], f"payee_of:{pid}"))
    return candidates


def _month_bounds(year: int, month: int) -> tuple[datetime.date, datetime.date]:
    first = datetime.date(year, month, 1)
    following = (first.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    return first, following - datetime.timedelta(days=1)


def _monthly_candidates(passages: list[tuple[dict, Any]], start: datetime.date,
                        end: datetime.date, cutoff: datetime.date) -> list[_Candidate]:
    """USD totals of `Expenses:X` categories over months wholly inside [start, end] and
    wholly on one side of the cutoff."""
    from beancount.core import data

    categories_per_month = collections.defaultdict(set)
    all_accounts = set()
    for _, entry in passages:
        if not isinstance(entry, data.Transaction):
            continue
        for posting in entry.postings:
            all_accounts.add(posting.account)
            parts = posting.account.split(":")
            if parts[0] == "Expenses" and len(parts) >= 2 and posting.units.currency == USD:
                month = (entry.date.year, entry.date.month)
                categories_per_month[month].add(":".join(parts[:2]))

    def prefix_is_exact(category: str) -> bool:  # `accounts^=category` selects only it
        return all(a == category or a.startswith(category + ":")
                   for a in all_accounts if a.startswith(category))

    candidates = []
    for (year, month) in sorted(categories_per_month):
        first, last = _month_bounds(year, month)
        if first < start or last > end or first < cutoff <= last:
            continue
        for category in sorted(categories_per_month[(year, month)]):
            if not prefix_is_exact(category):
                continue
            params = {"pattern": f"^{re.escape(category)}(:|$)", "first": first, "last": last}
            candidates.append(_Candidate(
                "monthly_total", f"month-{first:%Y-%m}", first, params,
                {"month": (year, month), "category": category}, [],
                [f"date>={first}", f"date<={last}", f"accounts^={category}"],
                f"monthly_total:{first:%Y-%m}:{category}"))
    return candidates


def build_questions(entries: Sequence[Any], options: dict, passages: list[tuple[dict, Any]],
                    seed: int, start: datetime.date, end: datetime.date,
                    cutoff: datetime.date) -> dict[str, list[dict]]:
    """Question records per split (`train`, `dev`, `test`, `new`), answers from beanquery."""
    import beanquery
    from beanquery import parser as bql_parser

    candidates = (_entry_candidates(passages)
                  + _monthly_candidates(passages, start, end, cutoff))
    connection = beanquery.connect("beancount:", entries=entries, errors=[], options=options)
    parsed = {kind: bql_parser.parse(template) for kind, template in BQL_TEMPLATES.items()}
    phrasing_rng = random.Random(f"atlas-jax-ledger-phrasing-{seed}")
    records = []
    for candidate in candidates:
        # Each template is parsed once; the record's `bql` is the same query written out.
        rows = connection.execute(parsed[candidate.kind], candidate.params).fetchall()
        question, used = phrasing.phrase_question(candidate.kind, phrasing_rng,
                                                  **candidate.phrase_args)
        records.append((candidate, {
            "id": candidate.record_id, "question": question,
            "answers": answers_from_rows(candidate.kind, rows), "kind": candidate.kind,
            "gold_ids": candidate.gold_ids, "filters": candidate.filters,
            "bql": render_bql(BQL_TEMPLATES[candidate.kind], candidate.params),
            "phrasing": used,
        }))
    return _split(records, seed, cutoff)


def _split(records: list[tuple[_Candidate, dict]], seed: int,
           cutoff: datetime.date) -> dict[str, list[dict]]:
    """`new` for groups on/after the cutoff; the others by a seeded shuffle of the groups
    of each type (`txn`, `bal`, `month`), 80/10/10."""
    groups_by_type = collections.defaultdict(set)
    for candidate, _ in records:
        if candidate.first_date < cutoff:
            group_type = candidate.split_group.split("-", 1)[0]
            groups_by_type[group_type].add(candidate.split_group)
    rng = random.Random(f"atlas-jax-ledger-split-{seed}")
    split_of = {}
    for group_type in sorted(groups_by_type):
        groups = sorted(groups_by_type[group_type])
        rng.shuffle(groups)
        # With 3 or more groups, dev and test get at least one each.
        least = 1 if len(groups) >= 3 else 0
        num_dev = max(least, round(SPLIT_FRACTIONS["dev"] * len(groups)))
        num_test = max(least, round(SPLIT_FRACTIONS["test"] * len(groups)))
        num_train = len(groups) - num_dev - num_test
        for i, group in enumerate(groups):
            split_of[group] = ("train" if i < num_train else
                               "dev" if i < num_train + num_dev else "test")
    splits = {name: [] for name in SPLITS}
    for candidate, record in records:
        name = "new" if candidate.first_date >= cutoff else split_of[candidate.split_group]
        splits[name].append(record)
    return splits


def few_shot_sample(train: list[dict], count: int, seed: int) -> list[dict]:
    """`count` train records, round-robin over kinds after a seeded shuffle."""
    shuffled = list(train)
    random.Random(f"atlas-jax-ledger-few-shot-{seed}").shuffle(shuffled)
    by_kind = {kind: [r for r in shuffled if r["kind"] == kind] for kind in KINDS}
    picked = []
    while len(picked) < min(count, len(train)):
        for kind in KINDS:
            if by_kind[kind] and len(picked) < count:
                picked.append(by_kind[kind].pop(0))
    return picked

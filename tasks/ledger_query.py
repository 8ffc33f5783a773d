"""Ledger question -> metadata filters: the `--where` conditions a question about a ledger implies.

`parse_query("How much did I pay onion market on 2/1/2022?", vocabulary)` gives
`["date=2022-02-01", "payee=Onion Market", "accounts^=Expenses:"]`, the filters that
`tasks/ledger.py` records as gold for that question. The parser reads only the question text
and a `LedgerVocabulary` (the payees and accounts of the ledger's passages):

  dates     any form of `ledger_phrasing` (`2023-03-14`, `March 14, 2023`, `14 Mar 2023`,
            `3/14/2023`, `the 14th of March 2023`; also `14.03.2023`, day first) ->
            `date=2023-03-14`; months (`2023-03`, `March 2023`, `Mar 2023`, `3/2023`,
            `the 3rd month of 2023`) and years (`in 2023`)
            -> `date>=first`, `date<=last`; several date mentions -> the range spanning them;
            with `today`: `today`, `yesterday`, `this|last month`, `this|last year`.
            Candidate spans are found by pattern, dateutil parses them.
  amounts   `45.60 USD`, `$45.60`, `$2,400.00`, `45.6 dollars`, a bare `45.60` ->
            `amount=45.60` (dollars with the ledger's two decimals; absolute value, as the
            metadata `amount` is the largest absolute USD posting).
  payees    a vocabulary payee, case-insensitive, whole words, longest first -> its ledger
            spelling.
  accounts  a full account name (`Assets:US:BofA:Checking`; dropped if the vocabulary has
            accounts but neither it nor any account under it) -> `accounts=`; a category, i.e.
            a proper prefix of vocabulary accounts (`Expenses:Health`), or any account named in
            a question over a month or year -> `accounts^=`; an expense category word that
            names exactly one `Expenses:` prefix by its last component (`groceries`, `food`,
            `rent`) -> `accounts^=` that prefix; a payment question (a payee with pay/spend
            wording) or expense wording without a more specific account -> `accounts^=Expenses:`.
            Category words count only in questions about spending or totals.

Nothing here raises on odd text: what is not understood adds no filter.
"""
from __future__ import annotations

import calendar
import dataclasses
import datetime
import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable, Iterator

from dateutil import parser as date_parser
from dateutil.relativedelta import relativedelta

EXPENSES = "Expenses:"
ACCOUNT_ROOTS = ("Assets", "Liabilities", "Equity", "Income", "Expenses")
# Dollar amounts are written with the ledger's (and the gold filters') two decimals.
DOLLAR_PLACES = Decimal("0.01")
MIN_CATEGORY_WORD = 3     # shorter components (`US`) are ordinary words too often

_MONTH_NAMES = sorted((name for names in date_parser.parserinfo().MONTHS for name in names),
                      key=len, reverse=True)
_MONTH = r"\b(?:" + "|".join(_MONTH_NAMES) + r")\b\.?"
_ORDINAL_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_YEAR = r"\d{4}"
_NOT_AFTER_NUMBER = r"(?<![\w.,/$:-])"     # a number span does not continue another token
_NOT_BEFORE_NUMBER = r"(?![\w/-]|[.,]\d)"

# (kind, pattern): `day` spans name one date, `month` and `year` spans a calendar range.
# Earlier patterns claim their text first, so `2023-03-14` is never also read as `2023-03`.
_DATE_PATTERNS = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in (
    ("day", _NOT_AFTER_NUMBER + r"\d{4}[-/]\d{1,2}[-/]\d{1,2}" + _NOT_BEFORE_NUMBER),
    ("day", _NOT_AFTER_NUMBER + r"\d{1,2}/\d{1,2}/\d{4}" + _NOT_BEFORE_NUMBER),
    ("dotted_day", _NOT_AFTER_NUMBER + r"\d{1,2}\.\d{1,2}\.\d{4}" + _NOT_BEFORE_NUMBER),
    ("day", rf"(?:\bthe\s+)?\b{_ORDINAL_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}\b"),
    ("day", rf"{_MONTH}\s+(?:the\s+)?{_ORDINAL_DAY}\b(?:,\s*|\s+){_YEAR}\b"),
    ("ordinal_month", r"\bthe\s+(\d{1,2})(?:st|nd|rd|th)\s+month\s+of\s+(\d{4})\b"),
    ("month", _NOT_AFTER_NUMBER + r"\d{4}-\d{1,2}" + _NOT_BEFORE_NUMBER),
    ("month", _NOT_AFTER_NUMBER + r"\d{1,2}/\d{4}" + _NOT_BEFORE_NUMBER),
    ("month", rf"{_MONTH},?\s+(?:of\s+)?{_YEAR}\b"),
    ("year", _NOT_AFTER_NUMBER + r"(?:1[89]|2\d)\d{2}" + _NOT_BEFORE_NUMBER),
)]
_RELATIVE_DATE = re.compile(r"\b(today|yesterday|(?:this|last|previous)\s+(?:month|year))\b",
                            re.IGNORECASE)

_NUMBER = r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
_CURRENCY = r"(USD|dollars?|bucks|EUR|GBP|CAD|AUD|CHF|JPY|[A-Z]{2,}USD|VACHR)"
# (dollars?, pattern): group 1 is the number; a currency code other than dollars keeps the
# digits as written (`12.000 IRAUSD`).
_AMOUNT_PATTERNS = (
    re.compile(r"(?<![\w.,])-?\$\s?" + _NUMBER + r"(?![\d])"),
    re.compile(_NOT_AFTER_NUMBER + r"-?" + _NUMBER + r"\s*" + _CURRENCY + r"\b"),
    re.compile(_NOT_AFTER_NUMBER + r"-?(\d{1,3}(?:,\d{3})+\.\d{2}|\d+\.\d{2})(?!\.?\d|[\w/-])"),
)
_DOLLAR_CURRENCIES = {"usd", "dollar", "dollars", "bucks"}

_ACCOUNT = re.compile(r"\b(?:" + "|".join(ACCOUNT_ROOTS) + r")(?::[A-Z0-9][\w-]*)+")
_SPENDING_WORDS = re.compile(r"\b(?:pay|paid|payments?|spen[dt]|spending|expenses?|cost|"
                             r"bought|charged?|went\s+to)\b", re.IGNORECASE)
_EXPENSE_WORDS = re.compile(r"\b(?:expenses?|spen[dt]|spending)\b", re.IGNORECASE)
# Category words (`rent`, `state`, `home`) are ordinary words too: read only in questions
# about spending or totals.
_CATEGORY_CONTEXT = re.compile(r"\b(?:expenses?|spen[dt]|spending|totals?|booked|cost|"
                               r"paid|pay)\b", re.IGNORECASE)

# The answer a question asks for, read from its wording without names, amounts and dates
# (a payee called "Balance Fitness" does not make a balance question); first match wins.
ANSWER_TYPES = ("date", "balance", "account", "payee", "amount")
_ANSWER_TYPE_WORDING = (
    ("date", re.compile(r"\bwhen\b|\b(?:what|which)\s+(?:date|day)\b", re.IGNORECASE)),
    ("balance", re.compile(r"\bbalances?\b", re.IGNORECASE)),
    ("account", re.compile(r"\b(?:what|which)\b(?:\s+\w+){0,2}?\s+(?:account|category)\b",
                           re.IGNORECASE)),
    ("payee", re.compile(r"\bwho(?:m)?\b|\bwhich\s+(?:payee|merchant|store|shop|vendor)\b|"
                         r"\bpayee\b", re.IGNORECASE)),
    ("amount", re.compile(r"\bhow\s+much\b|\bamount\b|\btotals?\b|\badd(?:ed)?\s+up\b|"
                          r"\bcost\b|\bsum\b", re.IGNORECASE)),
)
# What an answer looks like: an ISO date, an amount (`40.88 USD`, `-1,200.00`), an account.
_DATE_ANSWER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_AMOUNT_ANSWER = re.compile(r"^[-+]?\$?\d[\d,]*(?:\.\d+)?(?:\s+[A-Z][A-Z0-9'._-]{0,23})?$")
_ACCOUNT_ANSWER = re.compile(r"^(?:" + "|".join(ACCOUNT_ROOTS) + r")(?::[A-Z0-9][\w-]*)+$")


def answer_type_of(answer: str) -> str | None:
    """The form of an answer text: `date`, `amount`, `account`, `text` (a name, e.g. a
    payee), or None when it is empty."""
    answer = answer.strip()
    if not answer:
        return None
    for kind, pattern in (("date", _DATE_ANSWER), ("amount", _AMOUNT_ANSWER),
                          ("account", _ACCOUNT_ANSWER)):
        if pattern.match(answer):
            return kind
    return "text"


def answer_fits(expected: str | None, answer: str) -> bool:
    """Whether `answer`'s form is what a question expecting `expected` asks for (a balance
    is an amount, a payee a name); any non-empty answer fits an unknown type."""
    form = answer_type_of(answer)
    if form is None:
        return False
    wanted = {"balance": "amount", "payee": "text"}.get(expected, expected)
    return expected is None or form == wanted


@dataclasses.dataclass(frozen=True)
class LedgerVocabulary:
    """What the ledger knows by name: its payees and accounts (sorted, distinct)."""
    payees: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "LedgerVocabulary":
        """From passage records (`{"metadata": {...}}`) or bare metadata dicts."""
        payees, accounts = set(), set()
        for record in records:
            metadata = record.get("metadata", record) if isinstance(record, dict) else None
            if not isinstance(metadata, dict):
                continue
            payee = metadata.get("payee")
            if isinstance(payee, str) and payee.strip():
                payees.add(payee)
            listed = metadata.get("accounts") or ()
            accounts.update(a for a in listed if isinstance(a, str) and a)
        return cls(tuple(sorted(payees)), tuple(sorted(accounts)))

    @classmethod
    def from_passages_file(cls, path: str | Path) -> "LedgerVocabulary":
        """From a `passages.jsonl` (one passage record a line, blank lines skipped)."""
        with open(path, encoding="utf-8") as lines:
            return cls.from_records(json.loads(line) for line in lines if line.strip())

    def is_category(self, prefix: str) -> bool:
        """True if `prefix` is a proper prefix (at a `:`) of some account but no account."""
        return prefix not in self.accounts and any(
            a.startswith(prefix + ":") for a in self.accounts)

    def category_words(self) -> dict[str, str]:
        """{lower-cased last component: `Expenses:` prefix} for the components that name one
        prefix only (`groceries` -> `Expenses:Food:Groceries`, `food` -> `Expenses:Food`)."""
        prefixes_per_word: dict[str, set[str]] = {}
        for account in self.accounts:
            parts = account.split(":")
            if parts[0] + ":" != EXPENSES:
                continue
            for depth in range(2, len(parts) + 1):
                word = parts[depth - 1].replace("-", " ").lower()
                if len(word) >= MIN_CATEGORY_WORD:
                    prefixes_per_word.setdefault(word, set()).add(":".join(parts[:depth]))
        return {word: prefixes.pop() for word, prefixes in prefixes_per_word.items()
                if len(prefixes) == 1}


@dataclasses.dataclass(frozen=True)
class ParsedQuery:
    """The filters a question implies and the values they came from.

    `filters` are `--where` strings (atlas_jax/index/filters.py); `date` is set for a single
    day, `date_range` (first, last) for a month, year or several dates; `spans` lists
    (kind, matched text) in question order, for display and debugging.
    """
    filters: tuple[str, ...] = ()
    date: str | None = None
    date_range: tuple[str, str] | None = None
    amount: str | None = None
    payee: str | None = None
    accounts: tuple[str, ...] = ()
    account_prefixes: tuple[str, ...] = ()
    spans: tuple[tuple[str, str], ...] = ()
    answer_type: str | None = None     # one of ANSWER_TYPES, None when the wording is unclear


class _Claims:
    """Character ranges of the question already explained by an earlier extractor."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []
        self.spans: list[tuple[int, str, str]] = []   # (start, kind, text)

    def free(self, start: int, end: int) -> bool:
        return all(end <= lo or start >= hi for lo, hi in self.ranges)

    def matches(self, pattern: re.Pattern, text: str) -> Iterator[re.Match]:
        """Matches of `pattern` in `text` that overlap no claimed range."""
        for match in pattern.finditer(text):
            if self.free(*match.span()):
                yield match

    def unclaimed(self, text: str) -> str:
        """`text` with the claimed ranges blanked (`Expenses:Food` is no expense wording)."""
        for lo, hi in self.ranges:
            text = text[:lo] + " " * (hi - lo) + text[hi:]
        return text

    def claim(self, match: re.Match, kind: str) -> None:
        self.ranges.append(match.span())
        self.spans.append((match.start(), kind, match.group(0)))


def _month_range(year: int, month: int) -> tuple[datetime.date, datetime.date]:
    return (datetime.date(year, month, 1),
            datetime.date(year, month, calendar.monthrange(year, month)[1]))


def _parse_date_span(kind: str, match: re.Match) -> tuple[datetime.date, datetime.date] | None:
    """(first, last) day of a date span, or None where dateutil rejects it (`2/30/2023`)."""
    text = match.group(0)
    if kind == "ordinal_month":      # `the 3rd month of 2023`: dateutil reads `2023-03`
        text = f"{int(match.group(2)):04d}-{int(match.group(1)):02d}"
    elif kind == "year":
        year = int(text)
        return datetime.date(year, 1, 1), datetime.date(year, 12, 31)
    text = re.sub(r"^the\s+", "", text, flags=re.IGNORECASE)
    try:  # `14.03.2023` is day first; `3/14/2023` month first (dateutil's default)
        parsed = date_parser.parse(text, default=datetime.datetime(2000, 1, 1),
                                   dayfirst=kind == "dotted_day").date()
    except (ValueError, OverflowError):
        return None
    if kind.endswith("day"):
        return parsed, parsed
    return _month_range(parsed.year, parsed.month)


def _relative_range(phrase: str, today: datetime.date) -> tuple[datetime.date, datetime.date]:
    phrase = " ".join(phrase.lower().split())
    if phrase in ("today", "yesterday"):
        day = today - datetime.timedelta(days=phrase == "yesterday")
        return day, day
    back = 0 if phrase.startswith("this") else 1
    if phrase.endswith("month"):
        first = today.replace(day=1) - relativedelta(months=back)
        return _month_range(first.year, first.month)
    year = today.year - back
    return datetime.date(year, 1, 1), datetime.date(year, 12, 31)


def _find_dates(question: str, claims: _Claims, today: datetime.date | None
                ) -> list[tuple[str, datetime.date, datetime.date]]:
    """(kind, first, last) of every date mention; kind `day` for a single date."""
    found = []
    for kind, pattern in _DATE_PATTERNS:
        for match in claims.matches(pattern, question):
            bounds = _parse_date_span(kind, match)
            if bounds is not None:
                single = kind.endswith("day")
                claims.claim(match, "date" if single else kind.replace("ordinal_", ""))
                found.append(("day" if single else "range", *bounds))
    if today is not None:
        for match in claims.matches(_RELATIVE_DATE, question):
            first, last = _relative_range(match.group(1), today)
            claims.claim(match, "date" if first == last else "range")
            found.append(("day" if first == last else "range", first, last))
    return found


def _find_amount(question: str, claims: _Claims) -> str | None:
    """The first amount mentioned, as the filter value (`2400.00`), or None."""
    amount = None
    for index, pattern in enumerate(_AMOUNT_PATTERNS):
        for match in claims.matches(pattern, question):
            try:
                number = abs(Decimal(match.group(1).replace(",", "")))
            except InvalidOperation:
                continue
            currency = match.group(2).lower() if index == 1 else "usd"
            if currency in _DOLLAR_CURRENCIES and number.as_tuple().exponent >= -2:
                number = number.quantize(DOLLAR_PLACES)
            claims.claim(match, "amount")
            amount = amount or format(number, "f")
    return amount


def _word_pattern(phrases: Iterable[str]) -> re.Pattern | None:
    """Case-insensitive whole-word alternation, longest phrase first (so it wins)."""
    ordered = sorted(set(phrases), key=lambda p: (-len(p), p))
    if not ordered:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(p) for p in ordered) + r")(?!\w)",
                      re.IGNORECASE)


def _find_payee(question: str, claims: _Claims, vocabulary: LedgerVocabulary) -> str | None:
    by_folded = {payee.casefold(): payee for payee in vocabulary.payees}
    pattern = _word_pattern(vocabulary.payees)
    payee = None
    for match in claims.matches(pattern, question) if pattern else ():
        claims.claim(match, "payee")
        payee = payee or by_folded.get(match.group(0).casefold())
    return payee


def parse_query(question: str, vocabulary: LedgerVocabulary | None = None,
                today: datetime.date | None = None) -> ParsedQuery:
    """The metadata filters a natural-language ledger question implies (module doc).

    Args:
      question: the question text; anything not understood is ignored.
      vocabulary: payees and accounts of the ledger; without it payees and category words
        are not recognised (full account names still are).
      today: the date that `today`, `yesterday`, `last month`, ... are relative to; without
        it those phrases add no filter.

    Returns:
      The `ParsedQuery`; its `filters` are empty when nothing was recognised.
    """
    if not isinstance(question, str):
        return ParsedQuery()
    vocabulary = vocabulary or LedgerVocabulary()
    claims = _Claims()

    named_accounts = []
    for match in claims.matches(_ACCOUNT, question):
        claims.claim(match, "account")
        named_accounts.append(match.group(0))
    payee = _find_payee(question, claims, vocabulary)
    amount = _find_amount(question, claims)
    dates = _find_dates(question, claims, today)

    date = date_range = None
    if len(dates) == 1 and dates[0][0] == "day":
        date = dates[0][1].isoformat()
    elif dates:
        date_range = (min(d[1] for d in dates).isoformat(), max(d[2] for d in dates).isoformat())

    accounts, prefixes = [], []
    for name in dict.fromkeys(named_accounts):
        if vocabulary.accounts and not (name in vocabulary.accounts
                                        or vocabulary.is_category(name)):
            continue      # the ledger has no such account: a filter would keep nothing
        if vocabulary.is_category(name) or date_range is not None:
            prefixes.append(name)
        else:
            accounts.append(name)
    wording = claims.unclaimed(question)   # without names, amounts and dates
    answer_type = next((kind for kind, pattern in _ANSWER_TYPE_WORDING
                        if pattern.search(wording)), None)
    category_words = vocabulary.category_words() if _CATEGORY_CONTEXT.search(wording) else {}
    pattern = _word_pattern(category_words)
    for match in claims.matches(pattern, question) if pattern else ():
        claims.claim(match, "category")
        prefixes.append(category_words[match.group(0).lower()])
    specific_expense = any(a.startswith(EXPENSES) for a in accounts + prefixes)
    payment = payee is not None and _SPENDING_WORDS.search(wording)
    if not specific_expense and (payment or _EXPENSE_WORDS.search(wording)):
        prefixes.append(EXPENSES)
    prefixes = list(dict.fromkeys(prefixes))

    filters = []
    if date is not None:
        filters.append(f"date={date}")
    elif date_range is not None:
        filters += [f"date>={date_range[0]}", f"date<={date_range[1]}"]
    if payee is not None:
        filters.append(f"payee={payee}")
    if amount is not None:
        filters.append(f"amount={amount}")
    filters += [f"accounts={a}" for a in accounts] + [f"accounts^={p}" for p in prefixes]
    return ParsedQuery(
        filters=tuple(filters), date=date, date_range=date_range, amount=amount, payee=payee,
        accounts=tuple(accounts), account_prefixes=tuple(prefixes),
        spans=tuple((kind, text) for _, kind, text in sorted(claims.spans)),
        answer_type=answer_type)

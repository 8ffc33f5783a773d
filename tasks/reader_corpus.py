"""Pre-training data of the shipped ledger reader (`atlas-jax reader pretrain`).

The corpus is Beancount ledgers from beancount's own generator (`bean-example`) with seeds
and years that no evaluation uses (the demo: seed 0, 2021-2023; the README: seed 0,
2019-2023; the tests: seeds 0 and 3, 2022), plus one held-out ledger for the model card's
copy accuracy. Only the entries' text is read: never a QA template, question or answer.

Four unsupervised objectives, each example in the reader's FiD format (`"question: {q}
answer: <extra_id_0>"` prepended to each passage's `"title: {t} context: {p}"`):

  read      multi-passage reading: the probe names one field of an entry and gives two of
            its other fields as cues (`payee? 5 Jan 2012 $40.88`; dates and
            amounts in the surface forms people write them in); the entry sits among
            `n_passages - 1` distractors (same day, nearby days, same payee, random), so the
            reader learns to pick the passage that matches the cues and copy the field
  salient   salient-span masking (REALM; `ledger_salient`): the entry with one field masked,
            among the same distractors
  span      T5 span corruption of an entry (noise density 0.15, mean span 3), no passages
  prefix    prefix LM: the first half of an entry's tokens -> the rest, no passages

    ledgers = generate_ledgers(out_dir)                 # [(name, passages.jsonl), ...]
    records = read_passages(path)                       # passage records of one ledger
    examples = reading_examples(records, rng, "read")   # [ReadingExample, ...]
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import random
import re
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Sequence

from atlas_jax import fileio
from atlas_jax_tasks import ledger, ledger_phrasing as phrasing
from atlas_jax_tasks.ledger_salient import salient_examples

# (seed, start, end, birth): seeds and years that no demo, test or README run evaluates on.
PRETRAIN_LEDGERS: tuple[tuple[int, str, str, str], ...] = (
    (1001, "2008-01-01", "2010-12-31", "1975-03-02"),
    (1002, "2009-01-01", "2011-12-31", "1981-07-14"),
    (1003, "2010-01-01", "2012-12-31", "1968-11-20"),
    (1004, "2011-01-01", "2013-12-31", "1990-01-09"),
    (1005, "2012-01-01", "2014-12-31", "1979-05-30"),
    (1006, "2013-01-01", "2015-12-31", "1985-09-03"),
    (1007, "2015-01-01", "2017-12-31", "1972-12-12"),
    (1008, "2016-01-01", "2018-12-31", "1988-04-18"),
)
# (beancount's generator asserts a wrong 401k balance on ledgers that start mid-year.)
# The held-out ledger of the model card (copy accuracy per field): never trained on.
HELDOUT_LEDGER = (1099, "2017-01-01", "2018-12-31", "1983-06-06")
FIELDS = ("payee", "amount", "account", "balance", "narration")
# Years ending in 19-25 are the years the demo, the README, the tests and `bench.ask_unseen`
# evaluate on (2019-2025): no pre-training date, re-dated or not, has such a year, so a year
# piece the evaluation uses (`21`, `23`) is never a *year* in pre-training
# (`ReaderPretrainConfig.redate_copies`).
EVALUATED_YEAR_SUFFIXES = frozenset(range(19, 26))
REDATE_YEARS = (1904, 2096)   # re-dated years stay in here: a 4-year shift keeps 29 Feb valid
_DATE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)")
SENTINEL = "<extra_id_0>"


@dataclasses.dataclass(frozen=True)
class ReadingExample:
    """One example: the question text, the source passage row, the answer text, its field."""
    question: str
    source: int
    answer: str
    field: str


def generate_ledgers(out_dir: str | Path, ledgers: Sequence[tuple] = PRETRAIN_LEDGERS
                     ) -> list[tuple[str, Path]]:
    """Writes `seed_{seed}/ledger.beancount` and its `passages.jsonl` for each ledger (kept
    when present: the generator is deterministic); returns [(name, passages path)]."""
    out = []
    for seed, start, end, birth in ledgers:
        folder = Path(out_dir) / f"seed_{seed}"
        passages = folder / "passages.jsonl"
        if not passages.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "ledger.beancount"
            ledger.write_example_ledger(path, seed, ledger.parse_date(start, "start"),
                                        ledger.parse_date(end, "end"),
                                        ledger.parse_date(birth, "birth"))
            entries = ledger.load_ledger(path)
            fileio.atomic_write_lines(passages, (json.dumps(record, ensure_ascii=False)
                                                  for record, _ in ledger.build_passages(entries, folder)))
        out.append((folder.name, passages))
    return out


def read_passages(path: str | Path) -> list[dict]:
    """The passage records of a `passages.jsonl`; a bad line raises naming file:line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["id"], record["text"], record["metadata"]["date"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a ledger passage record "
                                 f"({type(e).__name__}: {e})") from None
            records.append(record)
    return records


# ----------------------------------------------------------------------------- re-dating

def redate(records: Sequence[dict], years: int) -> list[dict]:
    """The ledger's passage records with every date (text, title, metadata) `years` later.

    `years` is a multiple of 4 (29 February stays a date). Only `YYYY-MM-DD` dates move, so
    amounts and the days between entries are unchanged; ids keep their original dates."""
    if years % 4:
        raise ValueError(f"redate: years={years} is not a multiple of 4 (29 Feb would move)")
    shift = lambda text: _DATE.sub(  # noqa: E731
        lambda m: f"{int(m.group(1)) + years:04d}-{m.group(2)}-{m.group(3)}", text)
    out = []
    for record in records:
        record = dict(record, title=shift(record["title"]), text=shift(record["text"]))
        record["metadata"] = dict(record["metadata"], date=shift(record["metadata"]["date"]))
        out.append(record)
    return out


def redate_offsets(start: str, end: str, copies: int, rng: random.Random) -> list[int]:
    """`copies` distinct year shifts (multiples of 4) that move [start, end] into
    `REDATE_YEARS` with no year ending in `EVALUATED_YEAR_SUFFIXES`."""
    first, last = int(start[:4]), int(end[:4])
    allowed = [k for k in range(-400, 401, 4)
               if k and REDATE_YEARS[0] <= first + k and last + k <= REDATE_YEARS[1]
               and not any((y + k) % 100 in EVALUATED_YEAR_SUFFIXES
                           for y in range(first, last + 1))]
    return sorted(rng.sample(allowed, min(copies, len(allowed))))


# ----------------------------------------------------------------------------- probes

def _postings(text: str) -> list[tuple[str, Decimal, str]]:
    """(account, number, currency) of each posting line of an entry's text."""
    out = []
    for line in text.split("\n")[1:]:
        parts = line.split()
        if len(parts) >= 3 and ":" in parts[0]:
            try:
                out.append((parts[0], Decimal(parts[1].replace(",", "")), parts[2]))
            except ArithmeticError:
                continue
    return out


def _main_posting(record: dict) -> tuple[str, Decimal, str] | None:
    """The leg a reader is asked about: the expense leg (else the first positive one)."""
    postings = _postings(record["text"])
    chosen = next((p for p in postings if p[0].startswith("Expenses:") and p[1] > 0), None)
    return chosen or next((p for p in postings if p[1] > 0), None)


def _date(record: dict) -> datetime.date:
    return datetime.date.fromisoformat(record["metadata"]["date"])


def probes(record: dict, rng: random.Random) -> Iterator[tuple[str, str, str]]:
    """(field, probe text, answer) for an entry: the name of the field asked, then the date
    and one other field as bare values (`payee? 5 Jan 2012 $40.88`), in randomly drawn
    surface forms (`ledger_phrasing`'s date / amount / payee styles). Only the asked field
    is named: with `payee: ? date: ... amount: ...` the probes for the payee and for the
    amount of one entry hold the same words, and the reader learnt neither (held-out copy
    accuracy at 50/50 between the two fields for 300 steps)."""
    day = _date(record)
    date = phrasing.format_date(day, rng.choice(phrasing.DATE_STYLES))
    meta = record["metadata"]
    if meta.get("type") == "balance":
        account, number, currency = _balance(record)
        amount = phrasing.format_amount(number, currency, rng.choice(phrasing.AMOUNT_STYLES))
        yield "balance", f"balance? {date} {account}", f"{format(number, 'f')} {currency}"
        yield "account", f"account? {date} {amount}", account
        return
    posting = _main_posting(record)
    payee = meta.get("payee") or ""
    if posting is None:
        return
    account, number, currency = posting
    amount = phrasing.format_amount(number, currency, rng.choice(phrasing.AMOUNT_STYLES))
    cues = {"amount": amount, "account": account}
    if payee:
        cues["payee"] = phrasing.format_payee(payee, rng.choice(phrasing.PAYEE_STYLES))
    answers = {"payee": payee, "amount": f"{format(number, 'f')} {currency}",
               "account": account, "narration": meta.get("narration") or ""}
    for field, answer in answers.items():
        others = [c for name, c in cues.items() if name != field]
        if not answer or not others:
            continue
        cue = rng.choice(others)
        yield field, f"{field}? {date} {cue}", answer


def _balance(record: dict) -> tuple[str, Decimal, str]:
    """(account, number, currency) of a balance assertion's text."""
    head = record["text"].split("\n")[0].split()
    # YYYY-MM-DD balance Account  NUMBER CUR
    return head[2], Decimal(head[3].replace(",", "")), head[4]


def reading_examples(records: Sequence[dict], rng: random.Random, kind: str
                     ) -> list[ReadingExample]:
    """Every entry's examples of one kind: `read` (probes) or `salient` (masked fields)."""
    out = []
    for row, record in enumerate(records):
        if kind == "read":
            for field, question, answer in probes(record, rng):
                out.append(ReadingExample(question, row, answer, field))
        elif kind == "salient":
            for example in salient_examples(record):
                out.append(ReadingExample(example["question"], row, example["answers"][0],
                                          example["kind"]))
        else:
            raise ValueError(f"unknown reading example kind {kind!r} (read, salient)")
    return out


class Distractors:
    """Distractors for an entry of one ledger. Hard: the same day, days nearby, the same
    payee, then any entry. Easy: entries of another day (a week or more away) and another
    payee, which the probe's date or cue alone tells apart."""

    def __init__(self, records: Sequence[dict]):
        self.days = [_date(r).toordinal() for r in records]
        self.by_day: dict[int, list[int]] = {}
        self.by_payee: dict[str, list[int]] = {}
        for row, record in enumerate(records):
            self.by_day.setdefault(self.days[row], []).append(row)
            payee = record["metadata"].get("payee")
            if payee:
                self.by_payee.setdefault(payee, []).append(row)
        self.payees = [r["metadata"].get("payee") or "" for r in records]
        self.count = len(records)

    def sample(self, row: int, k: int, rng: random.Random, easy: bool = False) -> list[int]:
        """`k` distinct rows other than `row` (hard ones, or `easy` ones)."""
        if easy:
            return self._easy(row, k, rng)
        chosen: list[int] = []
        pools = [self.by_day.get(self.days[row], []),
                 [r for d in range(-6, 7) if d for r in self.by_day.get(self.days[row] + d, [])],
                 self.by_payee.get(self.payees[row], [])]
        for pool in pools:
            candidates = [r for r in pool if r != row and r not in chosen]
            rng.shuffle(candidates)
            chosen += candidates[:max(1, (k - len(chosen)) // 2) if pool is not pools[0]
                                 else k // 2]
            if len(chosen) >= k:
                return chosen[:k]
        while len(chosen) < k and len(chosen) < self.count - 1:
            r = rng.randrange(self.count)
            if r != row and r not in chosen:
                chosen.append(r)
        return chosen

    def _easy(self, row: int, k: int, rng: random.Random) -> list[int]:
        chosen: list[int] = []
        for _ in range(50 * max(k, 1)):
            if len(chosen) >= k or len(chosen) >= self.count - 1:
                break
            r = rng.randrange(self.count)
            if (r != row and r not in chosen and abs(self.days[r] - self.days[row]) >= 7
                    and (not self.payees[row] or self.payees[r] != self.payees[row])):
                chosen.append(r)
        return chosen

"""Ledger QA data: a reproducible Beancount ledger, its passages, and questions proven by BQL.

`generate(out_dir, seed, start, end, cutoff, birth)` writes into `out_dir`:

  ledger.beancount   beancount's example ledger (`bean-example --seed S --date-begin START
                     --date-end END --date-birth BIRTH`, byte for byte), `bean-check` clean
  passages.jsonl     one passage per transaction and per balance assertion (docs/design.md §4):
                     text = the entry as beancount's printer writes it; metadata `type`
                     (transaction|balance), `date` (ISO), `payee`, `narration`, `accounts`,
                     `amounts` (["45.60 USD", ...]), `amount` (float: the largest absolute
                     USD posting amount, for range filters), `tags`, `file` and `line` (where
                     the entry is written); ids are content-addressed (`entry_id`)
  qa_{train,dev,test,new}.jsonl, qa_train_64.jsonl
                     `{"id", "question", "answers", "kind", "gold_ids", "filters", "bql",
                     "phrasing"}`; the first answer is the ledger's own form
  summary.json       counts per split, kind and phrasing, and the sha256 of every other file

Question kinds (uniqueness is checked against the whole ledger, so each question has one
answer): `payment_amount` / `expense_account` (a payment: a transaction with a payee and
exactly two postings, one of them a positive USD amount on an `Expenses:` account; asked only
when that payee, compared case-insensitively, has no other transaction that day), `payee_of`
(asked only when no other transaction that day has a USD posting of the same absolute
amount), `balance` (every balance assertion; beancount asserts the balance at the start of
the day) and `monthly_total` (an aggregate: the USD total of an `Expenses:X` category over a
calendar month that lies wholly inside [start, end]; no gold passages).

Every gold answer is the result of the record's `bql`, executed with beanquery. Splits are by
time: entries dated before the cutoff feed train/dev/test (80/10/10 by a seeded shuffle of
the entries, so all questions about one entry, or one month, share a split); `new` asks only
about entries on or after it. A month that straddles the cutoff is skipped. The default
cutoff is the first day of the month on or after the point 80% of the way from start to end
(2023-01-01 for 2019-01-01..2023-12-31).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import io
import json
import random
import re
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Sequence

from atlas_jax import fileio
from atlas_jax_tasks.ledger_questions import (  # noqa: F401 (the task's public names)
    AGGREGATE_KINDS, BQL_TEMPLATES, KINDS, SPLIT_FRACTIONS, SPLITS, USD, LedgerError,
    answers_from_rows, bql_literal, build_questions, few_shot_sample, render_bql, run_bql)

DEFAULT_SEED = 0
DEFAULT_START = "2019-01-01"
DEFAULT_END = "2023-12-31"
DEFAULT_BIRTH = "1980-05-12"
DEFAULT_TRAIN_FEW_SHOT = 64
CUTOFF_FRACTION = 0.8
LEDGER_FILE = "ledger.beancount"
PASSAGES_FILE = "passages.jsonl"
SUMMARY_FILE = "summary.json"
OUTPUT_KIND = "ledger-qa"       # the kind in the folder's .atlas-jax.json marker
# ---------------------------------------------------------------------------- dates, ledger

def parse_date(text: str | datetime.date, what: str) -> datetime.date:
    """`YYYY-MM-DD` -> date; ValueError naming `what` (e.g. `--start`) otherwise."""
    if isinstance(text, datetime.date):
        return text
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(text)):
            raise ValueError
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what}: expected a date YYYY-MM-DD, got {text!r}") from None


def default_cutoff(start: datetime.date, end: datetime.date) -> datetime.date:
    """The first day of the month on or after the point `CUTOFF_FRACTION` (80%) of the way
    from `start` to `end` (that point itself if the month start would pass `end`)."""
    point = start + datetime.timedelta(days=round(CUTOFF_FRACTION * (end - start).days))
    if point.day == 1:
        return point
    month_start = (point.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    return month_start if month_start <= end else point


def write_example_ledger(path: str | Path, seed: int, start: datetime.date,
                         end: datetime.date, birth: datetime.date) -> None:
    """Writes beancount's example ledger, as `bean-example --seed S --date-begin START
    --date-end END --date-birth BIRTH` would (that script's only other input is today's
    date, used for defaults we always pass). The generator draws from the global `random`
    module: it is seeded here and its previous state restored afterwards."""
    from beancount.scripts import example

    state = random.getstate()
    buffer = io.StringIO()
    try:
        random.seed(seed)
        example.write_example_file(birth, start, end, True, buffer)
    except Exception as error:  # the generator's own failure, e.g. on a too-short range
        raise LedgerError(f"beancount's example generator failed for seed {seed}, "
                          f"{start}..{end} ({type(error).__name__}: {error}); it needs a "
                          f"range of a few months or more") from error
    finally:
        random.setstate(state)
    fileio.atomic_write_text(path, buffer.getvalue())


def format_ledger_errors(errors: Sequence[Any], limit: int = 20) -> str:
    """beancount errors as `file:line: message` lines (the first `limit` of them)."""
    lines = []
    for error in errors[:limit]:
        source = getattr(error, "source", None) or {}
        where = f"{source.get('filename', '<unknown>')}:{source.get('lineno', '?')}"
        lines.append(f"{where}: {str(getattr(error, 'message', error)).strip()}")
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more errors")
    return "\n".join(lines)


def load_ledger(path: str | Path, *, with_options: bool = False):
    """Parses, books and validates a Beancount file (what `bean-check` does).

    The pickle load cache of `beancount.loader.load_file` is bypassed: loading never writes
    `.picklecache` files next to the ledger nor unpickles one (docs/design.md §3).

    Returns:
      The date-sorted entries, or `(entries, options_map)` with `with_options=True`.

    Raises:
      LedgerError (a ValueError) whose message lists the ledger's own `file:line: message`
      for every parse or validation error, or names a missing file.
    """
    from beancount import loader

    path = Path(path).absolute()
    if not path.is_file():
        raise LedgerError(f"{path}: no such ledger file")
    entries, errors, options = loader._load([(str(path), True)], None, None, None)
    if errors:
        raise LedgerError(f"{path}: {len(errors)} error(s) in the ledger:\n"
                          + format_ledger_errors(errors))
    return (entries, options) if with_options else entries


# -------------------------------------------------------------------------------- passages

def _amount_text(number: Decimal, currency: str) -> str:
    return f"{format(number, 'f')} {currency}"


def _largest_amount(units: Sequence[Any]) -> float:
    """Largest |number| over the USD units, or over all units if none is in USD."""
    usd = [abs(u.number) for u in units if u.currency == USD]
    return float(max(usd or [abs(u.number) for u in units] or [Decimal(0)]))


ID_DIGEST_CHARS = 12   # hex digits of sha256 in an entry id: 48 bits


def entry_id(prefix: str, date: datetime.date | str, text: str, occurrence: int = 1) -> str:
    """The content-addressed id of an entry: `{prefix}-{date}-{12 hex of sha256(text)}`, with
    `-{n}` appended for the n-th (n >= 2) entry of identical printed text in one ledger.
    Changing anything the printer shows (payee, amount, account, metadata, ...) changes it;
    moving the entry within the ledger, or to another file, does not."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_DIGEST_CHARS]
    return f"{prefix}-{date}-{digest}" + (f"-{occurrence}" if occurrence > 1 else "")


def entry_location(entry: Any, root: str | Path | None = None) -> tuple[str, int | None]:
    """(file, line) of an entry, the file relative to `root` when it lies under it."""
    meta = getattr(entry, "meta", None) or {}
    filename, line = str(meta.get("filename", "")), meta.get("lineno")
    if root is not None and filename:
        try:
            filename = Path(filename).relative_to(Path(root).absolute()).as_posix()
        except ValueError:
            pass
    return filename, int(line) if isinstance(line, int) else None


def build_passages(entries: Sequence[Any], root: str | Path | None = None
                   ) -> list[tuple[dict, Any]]:
    """(passage record, entry) for every transaction and balance assertion, in ledger order.

    Ids are content-addressed (`entry_id`): the same entry gets the same id in every ledger
    and every run (`data ledger`, the demo, `ask`, `ledger sync`), so an index is diffed
    against a ledger by id. Metadata `file` / `line` say where the entry is written (the file
    relative to `root`, e.g. the main ledger's folder)."""
    from beancount.core import data
    from beancount.parser import printer

    passages, seen = [], collections.Counter()
    for entry in entries:
        if isinstance(entry, data.Transaction):
            prefix, payee = "txn", entry.payee or ""
            units = [posting.units for posting in entry.postings]
            accounts = list(dict.fromkeys(posting.account for posting in entry.postings))
            title, narration = f"{entry.date} {payee or entry.narration}", entry.narration
            tags = sorted(entry.tags or ())
        elif isinstance(entry, data.Balance):
            prefix, payee, narration, tags = "bal", "", "", []
            units, accounts = [entry.amount], [entry.account]
            title = f"{entry.date} balance {entry.account}"
        else:
            continue
        text = printer.format_entry(entry).rstrip("\n")
        seen[(prefix, text)] += 1
        filename, line = entry_location(entry, root)
        record = {
            "id": entry_id(prefix, entry.date, text, seen[(prefix, text)]),
            "title": title.strip(),
            "text": text,
            "metadata": {
                "type": "transaction" if prefix == "txn" else "balance",
                "date": entry.date.isoformat(), "payee": payee, "narration": narration,
                "accounts": accounts,
                "amounts": [_amount_text(u.number, u.currency) for u in units],
                "amount": _largest_amount(units), "tags": tags,
                "file": filename, "line": line,
            },
        }
        passages.append((record, entry))
    return passages


# ------------------------------------------------------------------------------- generate

def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    fileio.atomic_write_lines(path, (json.dumps(record, ensure_ascii=False)
                                     for record in records))


def is_legacy_ledger_folder(folder: Path) -> bool:
    """A folder `generate` wrote before output markers existed: its summary.json has the
    generator's own fields (not merely a file of that name)."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return (isinstance(summary, dict) and isinstance(summary.get("sha256"), dict)
            and {"args", "ledger", "passages", "questions"} <= set(summary))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate(out_dir: str | Path, seed: int = DEFAULT_SEED, start: str = DEFAULT_START,
             end: str = DEFAULT_END, cutoff: str | None = None, birth: str = DEFAULT_BIRTH,
             train_few_shot: int = DEFAULT_TRAIN_FEW_SHOT) -> dict:
    """Generates the ledger QA folder (files in the module doc).

    Args:
      out_dir: folder to write: new, empty, or an earlier output of `generate` (its files
        are overwritten); any other existing folder is refused.
      seed: seeds the ledger generator, the phrasing choices and the splits.
      start, end: the ledger's date range, `YYYY-MM-DD`.
      cutoff: first date of the `new` split (`YYYY-MM-DD`, start < cutoff <= end); default
        `default_cutoff(start, end)`.
      birth: the fictional owner's birth date (bean-example `--date-birth`).
      train_few_shot: size of `qa_train_64.jsonl`.

    Returns:
      The summary written to summary.json (counts per split, kind and phrasing; sha256 of
      the files) plus `seconds` (timings, kept out of the file so that it stays
      byte-identical) and `out_dir`.

    Raises:
      ValueError (LedgerError for the ledger itself) for bad arguments; OSError if the
      folder cannot be written.
    """
    started = time.perf_counter()
    start_date, end_date = parse_date(start, "start"), parse_date(end, "end")
    birth_date = parse_date(birth, "birth")
    if not start_date < end_date:
        raise ValueError(f"start {start_date} must be before end {end_date}")
    cutoff_date = (default_cutoff(start_date, end_date) if cutoff is None
                   else parse_date(cutoff, "cutoff"))
    if not start_date < cutoff_date <= end_date:
        raise ValueError(f"cutoff {cutoff_date} must lie in ({start_date}, {end_date}]")
    if not birth_date < start_date:
        raise ValueError(f"birth {birth_date} must be before start {start_date}")
    if isinstance(seed, bool) or not isinstance(seed, int) or train_few_shot < 0:
        raise ValueError(f"seed must be an int and train_few_shot >= 0, got {seed!r}, "
                         f"{train_few_shot!r}")
    # Only a folder `generate` wrote (its .atlas-jax.json marker) is overwritten: a folder of
    # the user's own (e.g. their real ledger) is never touched (fileio.OutputFolderError).
    out = fileio.prepare_output(out_dir, OUTPUT_KIND, legacy=is_legacy_ledger_folder)
    seconds = {}

    ledger_path = out / LEDGER_FILE
    write_example_ledger(ledger_path, seed, start_date, end_date, birth_date)
    seconds["ledger"] = time.perf_counter() - started
    entries, options = load_ledger(ledger_path, with_options=True)
    passages = build_passages(entries, root=out)
    _write_jsonl(out / PASSAGES_FILE, [record for record, _ in passages])
    seconds["load_and_passages"] = time.perf_counter() - started - seconds["ledger"]

    mark = time.perf_counter()
    splits = build_questions(entries, options, passages, seed, start_date, end_date,
                             cutoff_date)
    splits["train_64"] = few_shot_sample(splits["train"], train_few_shot, seed)
    for name, records in splits.items():
        _write_jsonl(out / f"qa_{name}.jsonl", records)
    seconds["questions"] = time.perf_counter() - mark

    summary = _summary(out, passages, splits, entries, seed=seed, start=start_date,
                       end=end_date, cutoff=cutoff_date, birth=birth_date,
                       train_few_shot=train_few_shot)
    fileio.atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    seconds["total"] = time.perf_counter() - started
    return {**summary, "out_dir": str(out),
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _summary(out: Path, passages, splits, entries, **args) -> dict:
    before = sum(1 for record, _ in passages if record["metadata"]["date"] < str(args["cutoff"]))
    phrasing_counts = {key: collections.Counter() for key in ("date", "amount", "payee")}
    template_counts = collections.Counter()
    for name in SPLITS:
        for record in splits[name]:
            for key, counter in phrasing_counts.items():
                counter[record["phrasing"][key]] += 1
            template_counts[f"{record['kind']}/{record['phrasing']['template']}"] += 1
    files = [LEDGER_FILE, PASSAGES_FILE] + [f"qa_{name}.jsonl" for name in splits]
    return {
        "args": {key: str(value) if isinstance(value, datetime.date) else value
                 for key, value in args.items()},
        "ledger": {"lines": (out / LEDGER_FILE).read_text(encoding="utf-8").count("\n"),
                   "entries": len(entries),
                   "first_date": str(entries[0].date) if entries else None,
                   "last_date": str(entries[-1].date) if entries else None},
        "passages": {"total": len(passages),
                     "transactions": sum(r["id"].startswith("txn-") for r, _ in passages),
                     "balances": sum(r["id"].startswith("bal-") for r, _ in passages),
                     "before_cutoff": before, "on_or_after_cutoff": len(passages) - before},
        "questions": {name: len(records) for name, records in splits.items()},
        "kinds": {kind: {name: sum(r["kind"] == kind for r in splits[name])
                         for name in splits} for kind in KINDS},
        "phrasing": {key: dict(sorted(counter.items()))
                     for key, counter in phrasing_counts.items()},
        "templates": dict(sorted(template_counts.items())),
        "sha256": {name: _sha256(out / name) for name in files},
    }


# ------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `atlas-jax data ledger`; sets `run` as the subcommand's handler."""
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the ledger, the phrasing and the splits")
    parser.add_argument("--start", default=DEFAULT_START, help="first date, YYYY-MM-DD")
    parser.add_argument("--end", default=DEFAULT_END, help="last date, YYYY-MM-DD")
    parser.add_argument("--cutoff", default=None,
                        help="first date of the `new` split (default: the first of the "
                             "month on/after 80%% of the way from start to end)")
    parser.add_argument("--birth", default=DEFAULT_BIRTH,
                        help="the fictional owner's birth date (bean-example --date-birth)")
    parser.add_argument("--train-few-shot", type=int, default=DEFAULT_TRAIN_FEW_SHOT,
                        help="examples in qa_train_64.jsonl")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Generates the folder and prints the summary as JSON; exit code 2 and a message on
    stderr for bad input."""
    try:
        summary = generate(args.out, seed=args.seed, start=args.start, end=args.end,
                           cutoff=args.cutoff, birth=args.birth,
                           train_few_shot=args.train_few_shot)
    except (ValueError, OSError) as error:
        print(f"atlas-jax data ledger: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m atlas_jax_tasks.ledger --out DIR ...` (the same flags as the subcommand)."""
    parser = argparse.ArgumentParser(prog="atlas-jax data ledger",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Salient-span masking over ledger passages: the pre-training task of the ledger demo.

REALM (Guu et al., 2020) showed that masking *salient* spans (named entities, dates) rather
than random ones is what teaches a retrieval-augmented reader to look facts up; for a
Beancount entry the salient spans are its fields. Each passage gives one example per field:

    payee      2021-01-05 * "<extra_id_0>" "Eating out with Joe" ...      -> Kin Soy
    amount     ... Expenses:Food:Restaurant  <extra_id_0>  (counter-leg <extra_id_1>)
                                                                            -> 40.88 USD
    account    ... <extra_id_0>  40.88 USD                                 -> Expenses:Food:Restaurant

(balance assertions: amount and account). Records are QA records (`qa.py`: prompt
"question: {masked entry} answer: <extra_id_0>", target "<extra_id_0> {field}") with
`gold_ids` = the source passage, which stays retrievable: the masked field is nowhere else,
so the reader learns to find the entry that matches the rest of the masked one and copy the
field out of it — the skill ledger questions need — and PDist learns which candidate that is.
Only the passages' text is used: no question templates, no answers of any QA split.

    write_salient_records(passages_jsonl, out_jsonl) -> count
    register_salient_task(name, out_jsonl)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import seqio

from atlas_jax import fileio
from atlas_jax_tasks.ledger_tasks import LEDGER_QA_FIELDS
from atlas_jax_tasks.qa import SENTINEL_0, register_qa_task

SENTINEL_1 = "<extra_id_1>"
# "  Account:Name   -40.88 USD {cost} @ price": indent, account, gap, number, currency, rest.
POSTING = re.compile(r"^(\s+)(\S+)(\s+)(-?[\d,]*\.?\d+)( [A-Z][A-Z0-9'._-]*)(.*)$")
BALANCE = re.compile(r"^(\S+ balance )(\S+)(\s+)(-?[\d,]*\.?\d+)( [A-Z][A-Z0-9'._-]*)(.*)$")
HEADER_PAYEE = re.compile(r'^(\S+ [*!] )"([^"]+)"( ".*)$')
KINDS = ("payee", "amount", "account")


def salient_examples(record: dict) -> Iterator[dict]:
    """The masked-field QA records of one ledger passage record ({id, text, metadata})."""
    lines = record["text"].split("\n")
    passage_id = record["id"]

    def example(kind: str, masked_lines: list[str], answer: str) -> dict:
        return {"id": f"salient_{kind}:{passage_id}", "question": "\n".join(masked_lines),
                "answers": [answer], "kind": f"salient_{kind}", "gold_ids": [passage_id]}

    balance = BALANCE.match(lines[0])
    if balance:
        head, account, gap, number, currency, rest = balance.groups()
        yield example("amount", [f"{head}{account}{gap}{SENTINEL_0}{rest}"] + lines[1:],
                      number + currency)
        yield example("account", [f"{head}{SENTINEL_0}{gap}{number}{currency}{rest}"]
                      + lines[1:], account)
        return
    header = HEADER_PAYEE.match(lines[0])
    if header:
        date, payee, rest = header.groups()
        yield example("payee", [f'{date}"{SENTINEL_0}"{rest}'] + lines[1:], payee)
    postings = [(n, POSTING.match(line)) for n, line in enumerate(lines) if n]
    postings = [(n, m) for n, m in postings if m]
    if not postings:
        return
    # The field a question asks about: an expense leg (else the first positive amount).
    chosen = next((p for p in postings if p[1].group(2).startswith("Expenses:")
                   and not p[1].group(4).startswith("-")), None)
    chosen = chosen or next((p for p in postings if not p[1].group(4).startswith("-")),
                            postings[0])
    n, match = chosen
    indent, account, gap, number, currency, rest = match.groups()
    masked = list(lines)
    masked[n] = f"{indent}{account}{gap}{SENTINEL_0}{rest}"
    # The balancing leg would give the amount away: mask it too (a second sentinel).
    negated = number[1:] if number.startswith("-") else "-" + number
    for other, m in postings:
        if other != n and m.group(4) == negated and m.group(5) == currency:
            o_indent, o_account, o_gap, _, _, o_rest = m.groups()
            masked[other] = f"{o_indent}{o_account}{o_gap}{SENTINEL_1}{o_rest}"
            break
    yield example("amount", masked, number + currency)
    masked = list(lines)
    masked[n] = f"{indent}{SENTINEL_0}{gap}{number}{currency}{rest}"
    yield example("account", masked, account)


def write_salient_records(passages_jsonl: str | Path, out_jsonl: str | Path) -> int:
    """Writes every passage's salient-span records to `out_jsonl`; returns their count.

    Raises:
      ValueError: a line of `passages_jsonl` is not a passage record (file and line named).
    """
    count = 0
    path = Path(passages_jsonl)
    with path.open(encoding="utf-8") as f, fileio.atomic_open(out_jsonl, "w") as out:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records = list(salient_examples(record))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{line_number}: not a ledger passage record "
                                 f"({type(e).__name__}: {e})") from None
            for example in records:
                out.write(json.dumps(example, ensure_ascii=False) + "\n")
                count += 1
    return count


def register_salient_task(name: str, records_jsonl: str | Path,
                          vocabulary: seqio.Vocabulary | None = None) -> seqio.Task:
    """A QA task (split `train`) over `write_salient_records`' output."""
    return register_qa_task(name, {"train": str(records_jsonl)}, vocabulary=vocabulary,
                            random_answer=False, extra_fields=LEDGER_QA_FIELDS)

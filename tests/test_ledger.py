"""Ledger QA data (tasks/ledger.py): determinism, bean-check, BQL-proven answers, splits."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

pytest.importorskip("beancount")
pytest.importorskip("beanquery")

from atlas_jax.index.filters import MetadataTable, parse_where  # noqa: E402
from atlas_jax.index.passages import PassageStore  # noqa: E402
from atlas_jax_tasks import ledger  # noqa: E402
from atlas_jax_tasks import ledger_phrasing as phrasing  # noqa: E402

# A small ledger keeps re-parsing every BQL query (~40 ms each with beanquery's parser) cheap.
SEED, START, END = 3, "2022-01-01", "2022-06-30"
CUTOFF = "2022-06-01"  # the default for this range: 80% of the way, then the next month start
FILES = ["ledger.beancount", "passages.jsonl", "qa_train.jsonl", "qa_dev.jsonl",
         "qa_test.jsonl", "qa_new.jsonl", "qa_train_64.jsonl", "summary.json"]
QA_SPLITS = ("train", "dev", "test", "new")
DATE_RE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger")
    summary = ledger.generate(out, seed=SEED, start=START, end=END)
    return out, summary


@pytest.fixture(scope="module")
def loaded(generated):
    out, _ = generated
    entries, options = ledger.load_ledger(out / "ledger.beancount", with_options=True)
    store = PassageStore.from_jsonl(out / "passages.jsonl")
    questions = {split: _read_jsonl(out / f"qa_{split}.jsonl") for split in QA_SPLITS}
    return entries, options, store, questions


def _all_questions(questions: dict) -> list[dict]:
    return [record for split in QA_SPLITS for record in questions[split]]


def test_files_and_summary(generated):
    out, summary = generated
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES + [".atlas-jax.json"])
    assert summary["args"]["cutoff"] == CUTOFF
    assert json.loads((out / "summary.json").read_text()) == {
        k: v for k, v in summary.items() if k not in ("seconds", "out_dir")}
    assert summary["seconds"]["total"] > 0
    for kind in ledger.KINDS:
        assert all(summary["kinds"][kind][split] > 0 for split in QA_SPLITS), kind
    assert summary["questions"]["train_64"] == 64


def test_regeneration_is_byte_identical(generated, tmp_path):
    """Same arguments, another process and another hash seed: identical bytes, all files;
    also exercises the CLI's success path (exit code 0, the summary on stdout)."""
    out, _ = generated
    code = ("import sys; from atlas_jax_tasks import ledger; "
            "sys.exit(ledger.main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", code, "--seed", str(SEED), "--start", START, "--end", END,
         "--cutoff", CUTOFF, "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["questions"]["train_64"] == 64
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_ledger_matches_bean_example_and_is_bean_check_clean(generated, tmp_path):
    out, _ = generated
    entries = ledger.load_ledger(out / "ledger.beancount")  # raises on any bean-check error
    assert len(entries) > 300
    text = (out / "ledger.beancount").read_text()
    assert f";; Dates: {START} - {END}" in text and ";; Birth: 1980-05-12" in text
    # Loading writes no pickle cache next to the ledger.
    assert not list(out.glob(".*picklecache"))
    bean_example = Path(sys.executable).parent / "bean-example"
    if bean_example.exists():
        result = subprocess.run(
            [str(bean_example), "--seed", str(SEED), "--date-begin", START, "--date-end", END,
             "--date-birth", "1980-05-12", "-o", str(tmp_path / "cli.beancount")],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "cli.beancount").read_bytes() == text.encode()


def test_every_bql_reproduces_its_answer(loaded):
    """Each record's `bql`, parsed and run as written, gives its first (ledger-form) answer."""
    import beanquery

    entries, options, _, questions = loaded
    connection = beanquery.connect("beancount:", entries=entries, errors=[], options=options)
    for record in _all_questions(questions):
        rows = connection.execute(record["bql"]).fetchall()
        assert len(rows) == 1, (record["id"], rows)
        row, answer = rows[0], record["answers"][0]
        if record["kind"] in ("payment_amount", "monthly_total"):
            number, currency = answer.split()
            assert (row[0], row[1]) == (Decimal(number), currency), record["id"]
        elif record["kind"] == "balance":
            number, currency = answer.split()
            assert (row[0].number, row[0].currency) == (Decimal(number), currency)
        else:
            assert row[0] == answer, record["id"]
        assert record["answers"] == ledger.answers_from_rows(record["kind"], rows)


def test_answers_appear_in_gold_passages(loaded):
    _, _, store, questions = loaded
    for record in _all_questions(questions):
        if record["kind"] in ledger.AGGREGATE_KINDS:
            assert record["gold_ids"] == []
            continue
        assert record["gold_ids"], record["id"]
        texts = [store.texts[row] for row in store.index_of(record["gold_ids"])]
        assert any(answer in text for answer in record["answers"] for text in texts), record


def test_questions_are_unambiguous(loaded):
    """Payee-and-date questions name a payee paid once that day; amount-and-date questions
    an amount that only one transaction of the day carries."""
    _, _, store, questions = loaded
    txns = [m for m in store.metadata if m["type"] == "transaction"]
    for record in _all_questions(questions):
        gold = store.metadata[store.index_of(record["gold_ids"])[0]] if record["gold_ids"] \
            else None
        if record["kind"] in ("payment_amount", "expense_account"):
            same = [m for m in txns if m["date"] == gold["date"]
                    and m["payee"].casefold() == gold["payee"].casefold()]
            assert len(same) == 1, record["id"]
        elif record["kind"] == "payee_of":
            amount = Decimal(record["bql"].rsplit("=", 1)[1].strip())
            same = [m for m in txns if m["date"] == gold["date"] and any(
                Decimal(a.split()[0]).copy_abs() == amount and a.endswith(" USD")
                for a in m["amounts"])]
            assert len(same) == 1, record["id"]


def test_splits_respect_the_cutoff(loaded, generated):
    _, _, store, questions = loaded
    out, _ = generated
    for split in QA_SPLITS:
        for record in questions[split]:
            dates = [store.metadata[row]["date"] for row in store.index_of(record["gold_ids"])]
            dates += DATE_RE.findall(record["bql"])
            assert dates, record["id"]
            if split == "new":
                assert all(d >= CUTOFF for d in dates), record
            else:
                assert all(d < CUTOFF for d in dates), record
    ids = {split: {r["id"] for r in questions[split]} for split in QA_SPLITS}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values()))  # disjoint, unique
    few_shot = _read_jsonl(out / "qa_train_64.jsonl")
    assert len(few_shot) == 64 and {r["id"] for r in few_shot} <= ids["train"]
    assert {r["kind"] for r in few_shot} == set(ledger.KINDS)
    # Questions about one entry share a split.
    split_of_gold = {}
    for split in QA_SPLITS:
        for record in questions[split]:
            for gold in record["gold_ids"]:
                assert split_of_gold.setdefault(gold, split) == split


def test_passages_well_formed(loaded):
    from beancount.core import data

    entries, _, store, _ = loaded
    expected = [e for e in entries if isinstance(e, (data.Transaction, data.Balance))]
    assert len(store) == len(expected)
    for row, entry in enumerate(expected):
        meta = store.metadata[row]
        assert meta["date"] == entry.date.isoformat()
        assert store.ids[row].startswith("txn-" if isinstance(entry, data.Transaction)
                                         else "bal-")
        assert store.texts[row].startswith(entry.date.isoformat())
        assert store.titles[row].startswith(entry.date.isoformat())
        assert set(meta) >= {"date", "payee", "narration", "accounts", "amounts", "amount"}
        assert all(a in store.texts[row] for a in meta["accounts"])
        assert all(re.fullmatch(r"-?\d+(\.\d+)? [A-Z][A-Z0-9_'.-]*", a) for a in meta["amounts"])
        assert meta["amount"] == max(abs(float(a.split()[0])) for a in meta["amounts"]
                                     if a.endswith(" USD") or not any(
                                         x.endswith(" USD") for x in meta["amounts"]))


def test_filters_parse_and_hold_for_gold_passages(loaded):
    _, _, store, questions = loaded
    table = MetadataTable(store.metadata)
    for record in _all_questions(questions):
        assert record["filters"], record["id"]
        for expression in record["filters"]:
            parse_where(expression)
        mask = table.mask(record["filters"])
        if record["gold_ids"]:
            assert mask[store.index_of(record["gold_ids"])].all(), record
        else:
            assert mask.any(), record


def _check_surface_forms(record: dict) -> None:
    """The question contains the date / amount / payee in the recorded styles."""
    used, question = record["phrasing"], record["question"]
    filters = dict(re.match(r"(\w+)(=|>=|<=|\^=)(.*)", f).group(1, 3) for f in record["filters"])
    day = datetime.date.fromisoformat(filters["date"])
    if record["kind"] == "monthly_total":
        assert phrasing.format_month(day.year, day.month, used["date"]) in question, record
    else:
        assert phrasing.format_date(day, used["date"]) in question, record
    if used["payee"] != phrasing.NOT_MENTIONED:
        payee = filters["payee"]
        assert phrasing.format_payee(payee, used["payee"]) in question, record
    if used["amount"] != phrasing.NOT_MENTIONED:
        amount = phrasing.format_amount(Decimal(filters["amount"]), "USD", used["amount"])
        assert amount in question, record


def test_record_schema_and_phrasing(loaded):
    _, _, _, questions = loaded
    records = _all_questions(questions)
    styles = {"date": phrasing.DATE_STYLES, "amount": phrasing.AMOUNT_STYLES,
              "payee": phrasing.PAYEE_STYLES}
    for record in records:
        assert set(record) == {"id", "question", "answers", "kind", "gold_ids", "filters",
                               "bql", "phrasing"}
        assert record["kind"] in ledger.KINDS and record["answers"]
        assert len(set(record["answers"])) == len(record["answers"])
        for key, allowed in styles.items():
            assert record["phrasing"][key] in allowed + (phrasing.NOT_MENTIONED,)
        _check_surface_forms(record)
    for key, allowed in styles.items():
        used = {r["phrasing"][key] for r in records} - {phrasing.NOT_MENTIONED}
        assert used == set(allowed), key
    for kind in ledger.KINDS:
        templates = {r["phrasing"]["template"] for r in records if r["kind"] == kind}
        assert len(templates) >= 2, kind


def test_surface_forms():
    day = datetime.date(2023, 3, 14)
    assert [phrasing.format_date(day, s) for s in phrasing.DATE_STYLES] == [
        "2023-03-14", "March 14, 2023", "14 Mar 2023", "3/14/2023", "the 14th of March 2023"]
    assert phrasing.format_date(datetime.date(2023, 3, 22), "ordinal") == \
        "the 22nd of March 2023"
    assert phrasing.format_date(datetime.date(2023, 3, 11), "ordinal") == \
        "the 11th of March 2023"
    assert phrasing.format_month(2023, 3, "long") == "March 2023"
    amount = Decimal("45.60")
    assert [phrasing.format_amount(amount, "USD", s) for s in phrasing.AMOUNT_STYLES] == [
        "45.60 USD", "$45.60", "45.6 dollars"]
    assert phrasing.format_amount(Decimal("2400.00"), "USD", "dollar_sign") == "$2,400.00"
    assert phrasing.format_amount(Decimal("2400.00"), "USD", "words") == "2400 dollars"
    assert phrasing.answer_forms_amount(amount, "USD")[:3] == ["45.60 USD", "45.60", "$45.60"]
    assert phrasing.answer_forms_amount(Decimal("-1234.50"), "USD")[:3] == [
        "-1234.50 USD", "-1234.50", "-$1234.50"]
    assert phrasing.answer_forms_amount(Decimal("12"), "VACHR") == ["12 VACHR", "12"]
    assert ledger.default_cutoff(datetime.date(2019, 1, 1), datetime.date(2023, 12, 31)) == \
        datetime.date(2023, 1, 1)
    assert ledger.render_bql("x = %(d)s AND p = %(p)s", {
        "d": day, "p": "Giacomo's"}) == "x = 2023-03-14 AND p = \"Giacomo's\""


def test_malformed_ledger_reports_file_and_line(tmp_path):
    path = tmp_path / "broken.beancount"
    path.write_text('2022-01-01 open Assets:Cash USD\n2022-01-01 open Expenses:Food USD\n\n'
                    '2022-01-05 * "Shop" "groceries"\n  Assets:Cash  -10.00 USD\n'
                    '  Expenses:Food  9.00 USD\n\n2022-13-01 open Assets:Other\n')
    with pytest.raises(ValueError) as error:
        ledger.load_ledger(path)
    message = str(error.value)
    assert f"{path}:4: Transaction does not balance" in message
    assert f"{path}:8:" in message
    with pytest.raises(ValueError, match="no such ledger file"):
        ledger.load_ledger(tmp_path / "missing.beancount")


@pytest.mark.parametrize("flags, expected", [
    (["--start", "2022-02-30"], "start: expected a date YYYY-MM-DD, got '2022-02-30'"),
    (["--start", "2022-06-01", "--end", "2022-01-01"], "must be before end"),
    (["--start", "2022-01-01", "--end", "2022-06-30", "--cutoff", "2023-01-01"],
     "cutoff 2023-01-01 must lie in"),
    (["--cutoff", "soon"], "cutoff: expected a date"),
])
def test_cli_bad_input_exit_code_2(flags, expected, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ledger.add_arguments(parser)
    args = parser.parse_args(flags + ["--out", str(tmp_path / "out")])
    assert args.run(args) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and "Traceback" not in captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()

"""Ledger question -> `--where` filters (tasks/ledger_query.py): every surface form of
ledger_phrasing, no false dates from amounts, and agreement with the generator's gold filters."""
from __future__ import annotations

import collections
import datetime
import json

import pytest

from atlas_jax.index.filters import MetadataTable, parse_where
from atlas_jax_tasks.ledger_query import LedgerVocabulary, ParsedQuery, parse_query

VOCABULARY = LedgerVocabulary.from_records([
    {"metadata": {"payee": "Onion Market", "accounts": ["Expenses:Food:Groceries",
                                                        "Liabilities:US:Chase:Slate"]}},
    {"metadata": {"payee": "Chipotle", "accounts": ["Expenses:Food:Restaurant"]}},
    {"metadata": {"payee": "Chichipotle", "accounts": ["Expenses:Food:Restaurant"]}},
    {"metadata": {"payee": "BANK FEES", "accounts": ["Expenses:Financial:Fees"]}},
    {"metadata": {"payee": "RiverBank Properties", "accounts": ["Expenses:Home:Rent"]}},
    {"payee": "E.B.'s Beer and Wine", "accounts": ["Expenses:Food:Alcohol"]},   # bare metadata
    {"metadata": {"payee": "", "accounts": ["Assets:US:BofA:Checking",
                                            "Expenses:Health:Dental:Insurance",
                                            "Expenses:Health:Vision:Insurance"]}},
])
DAY_FORMS = ["2023-03-14", "March 14, 2023", "14 Mar 2023", "3/14/2023",
             "the 14th of March 2023", "Mar. 14 2023", "14.03.2023"]
MONTH_FORMS = ["2023-03", "March 2023", "Mar 2023", "3/2023", "the 3rd month of 2023"]
AMOUNT_FORMS = [("133.51 USD", "133.51"), ("$133.51", "133.51"), ("133.51 dollars", "133.51"),
                ("45.6 dollars", "45.60"), ("$2,400.00", "2400.00"), ("2400.00 USD", "2400.00"),
                ("$4", "4.00"), ("-$45.60", "45.60"), ("133.51", "133.51"),
                ("12.000 IRAUSD", "12.000")]


def test_vocabulary_from_records_and_file(tmp_path):
    assert "Onion Market" in VOCABULARY.payees and "" not in VOCABULARY.payees
    assert "E.B.'s Beer and Wine" in VOCABULARY.payees
    assert VOCABULARY.accounts == tuple(sorted(VOCABULARY.accounts))
    path = tmp_path / "passages.jsonl"
    path.write_text(json.dumps({"metadata": {"payee": "Kin Soy", "accounts": ["A:B"]}})
                    + "\n\n")
    assert LedgerVocabulary.from_passages_file(path) == LedgerVocabulary(("Kin Soy",), ("A:B",))


@pytest.mark.parametrize("form", DAY_FORMS)
def test_every_day_form(form):
    parsed = parse_query(f"Who did I pay on {form}?")
    assert parsed.date == "2023-03-14" and parsed.date_range is None
    assert parsed.filters == ("date=2023-03-14",)
    assert parsed.spans == (("date", form),)


@pytest.mark.parametrize("form", MONTH_FORMS)
def test_every_month_form_is_a_range(form):
    parsed = parse_query(f"In {form}, what did my food expenses add up to?", VOCABULARY)
    assert parsed.date is None and parsed.date_range == ("2023-03-01", "2023-03-31")
    assert parsed.filters == ("date>=2023-03-01", "date<=2023-03-31", "accounts^=Expenses:Food")


def test_month_ends_and_years():
    assert parse_query("in Feb 2024").date_range == ("2024-02-01", "2024-02-29")
    assert parse_query("in 2/2023").date_range == ("2023-02-01", "2023-02-28")
    assert parse_query("What did I spend in 2022?").filters == (
        "date>=2022-01-01", "date<=2022-12-31", "accounts^=Expenses:")
    # Several mentions: the range spanning them.
    assert parse_query("between March 1, 2022 and 2022-03-15").date_range == (
        "2022-03-01", "2022-03-15")


def test_relative_dates_need_today():
    today = datetime.date(2023, 3, 14)
    assert parse_query("What did I pay yesterday?", today=today).date == "2023-03-13"
    assert parse_query("today", today=today).date == "2023-03-14"
    assert parse_query("last month", today=today).date_range == ("2023-02-01", "2023-02-28")
    assert parse_query("this month", today=today).date_range == ("2023-03-01", "2023-03-31")
    assert parse_query("last year", today=today).date_range == ("2022-01-01", "2022-12-31")
    assert parse_query("last month").filters == ()


@pytest.mark.parametrize("form, value", AMOUNT_FORMS)
def test_every_amount_form(form, value):
    parsed = parse_query(f"Who was paid {form} on 2022-01-06?")
    assert parsed.amount == value
    assert parsed.filters == ("date=2022-01-06", f"amount={value}")


@pytest.mark.parametrize("question", ["Who was paid 133.51 USD?", "Who was paid $2,400.00?",
                                      "Who was paid 2022.00 dollars?", "Who got $3.14?",
                                      "Who got 12.20?", "Who was paid $1,203.2022?"])
def test_amounts_are_not_dates(question):
    parsed = parse_query(question)
    assert parsed.date is None and parsed.date_range is None
    assert len(parsed.filters) == 1 and parsed.filters[0].startswith("amount=")


def test_amount_and_date_side_by_side():
    parsed = parse_query("On 3/14/2023, who was paid $2,400.00? Not 14.03.")
    assert parsed.filters == ("date=2023-03-14", "amount=2400.00")
    assert parse_query("in 3/2023 who was paid 3.20 USD").filters == (
        "date>=2023-03-01", "date<=2023-03-31", "amount=3.20")


@pytest.mark.parametrize("written", ["Onion Market", "onion market", "ONION MARKET"])
def test_payee_any_casing_gives_ledger_spelling(written):
    parsed = parse_query(f"How much did I pay {written} on 2022-02-01?", VOCABULARY)
    assert parsed.payee == "Onion Market"
    assert parsed.filters == ("date=2022-02-01", "payee=Onion Market", "accounts^=Expenses:")


def test_payee_longest_match_and_word_boundaries():
    assert parse_query("What did I pay chichipotle?", VOCABULARY).payee == "Chichipotle"
    assert parse_query("What did I pay Chipotle?", VOCABULARY).payee == "Chipotle"
    assert parse_query("What did I pay Chipotles?", VOCABULARY).payee is None
    assert parse_query("How much did I pay e.b.'s beer and wine?",
                       VOCABULARY).payee == "E.B.'s Beer and Wine"
    assert parse_query("What did I pay bank fees?", VOCABULARY).payee == "BANK FEES"
    # Without a vocabulary no payee is known; payee_of wording adds no account prefix.
    assert parse_query("How much did I pay Onion Market?").payee is None
    assert parse_query("Who did I pay $4.00 on 2022-01-04?",
                       VOCABULARY).filters == ("date=2022-01-04", "amount=4.00")


def test_accounts_and_categories():
    balance = parse_query("What was the balance of Assets:US:BofA:Checking on 2022-01-27?",
                          VOCABULARY)
    assert balance.accounts == ("Assets:US:BofA:Checking",) and balance.account_prefixes == ()
    assert balance.filters == ("date=2022-01-27", "accounts=Assets:US:BofA:Checking")
    total = parse_query("What was the total booked to Expenses:Health in Jan 2022?", VOCABULARY)
    assert total.filters == ("date>=2022-01-01", "date<=2022-01-31", "accounts^=Expenses:Health")
    assert parse_query("What were my total groceries expenses for 2022-01?",
                       VOCABULARY).account_prefixes == ("Expenses:Food:Groceries",)
    assert parse_query("How much rent did I pay in 2022?",
                       VOCABULARY).account_prefixes == ("Expenses:Home:Rent",)
    # `insurance` names two prefixes (dental, vision): ambiguous, so only the expense prefix.
    assert parse_query("My insurance expenses in 2022?",
                       VOCABULARY).account_prefixes == ("Expenses:",)
    assert parse_query("Expenses:Food in 2022", VOCABULARY).account_prefixes == (
        "Expenses:Food",)
    # A category word outside a question about spending is an ordinary word.
    assert parse_query("Is food on my mind?", VOCABULARY).filters == ()


@pytest.mark.parametrize("question", ["", "???", "asdf 99999 :: $ USD", "on 2/30/2023",
                                      "the 45th of Smarch", "13/13/2023",
                                      "Expenses:Travel:Air is unknown"])
def test_odd_text_gives_no_filters(question):
    assert parse_query(question, VOCABULARY).filters == ()


def test_non_string_gives_empty_query():
    assert parse_query(None) == ParsedQuery()


def test_filters_parse_as_where():
    parsed = parse_query("Which expense account was the RiverBank Properties payment on "
                         "January 6, 2022 booked to?", VOCABULARY)
    assert [str(parse_where(f)) for f in parsed.filters] == list(parsed.filters)
    assert parsed.filters == ("date=2022-01-06", "payee=RiverBank Properties",
                              "accounts^=Expenses:")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    pytest.importorskip("beancount")
    pytest.importorskip("beanquery")
    from atlas_jax_tasks import ledger
    out = tmp_path_factory.mktemp("ledger")
    ledger.generate(out, seed=0, start="2022-01-01", end="2022-12-31")
    return out


def _by_field(filters) -> dict[str, list[str]]:
    """Filters grouped by field (date, amount, payee, accounts, accounts prefix)."""
    fields = collections.defaultdict(list)
    for text in filters:
        where = parse_where(text)
        fields[f"{where.field} {where.op}"].append(str(where))
    return {field: sorted(values) for field, values in fields.items()}


def test_parsed_filters_equal_the_gold_filters_on_every_split(generated):
    """The README's claim: on every split the parser's filters equal the generator's gold
    filters, field by field, for every question (aggregates included)."""
    passages = [json.loads(line) for line in (generated / "passages.jsonl").open()]
    vocabulary = LedgerVocabulary.from_records(passages)
    table = MetadataTable([p["metadata"] for p in passages])
    row_of = {p["id"]: row for row, p in enumerate(passages)}
    counts = collections.Counter()
    for split in ("train", "dev", "test", "new"):
        for line in (generated / f"qa_{split}.jsonl").open():
            record = json.loads(line)
            parsed = parse_query(record["question"], vocabulary)
            counts[record["kind"]] += 1
            assert _by_field(parsed.filters) == _by_field(record["filters"]), (
                split, record["question"])
            mask = table.mask(list(parsed.filters))
            assert all(mask[row_of[g]] for g in record["gold_ids"]), record["question"]
    # every kind of question is covered, with the payee and amount filters among them
    assert set(counts) == {"balance", "expense_account", "monthly_total", "payee_of",
                           "payment_amount"} and min(counts.values()) >= 20, counts

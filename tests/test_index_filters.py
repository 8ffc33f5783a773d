"""Metadata filters: `--where` parsing and vectorised masks over passage metadata."""
from __future__ import annotations

import numpy as np
import pytest

from atlas_jax.index.filters import Condition, MetadataTable, parse_where

LEDGER = [
    {"date": "2023-04-01", "accounts": ["Expenses:Food:Groceries", "Assets:Bank:Checking"],
     "payee": "Whole Foods", "amount": 42.5},
    {"date": "2023-04-15", "accounts": ["Expenses:Rent", "Assets:Bank:Checking"],
     "payee": "Landlord", "amount": 1500},
    {"date": "2022-12-31", "accounts": ["Expenses:Food:Restaurant"], "payee": "whole foods",
     "amount": "9.75"},
    None,
    {},
    {"date": "2024-01-02", "accounts": [], "payee": "Bank", "amount": -3},
]


@pytest.fixture
def table():
    return MetadataTable(LEDGER)


def rows(mask):
    return np.flatnonzero(mask).tolist()


@pytest.mark.parametrize("expression, expected", [
    ("payee=Whole Foods", Condition("payee", "=", "Whole Foods")),
    ("  amount >= 10 ", Condition("amount", ">=", "10")),
    ("a.b_c<=x", Condition("a.b_c", "<=", "x")),
    ("date>2023-01-01", Condition("date", ">", "2023-01-01")),
    ("date<2023-01-01", Condition("date", "<", "2023-01-01")),
    ("accounts^=Expenses:Food", Condition("accounts", "^=", "Expenses:Food")),
    ("payee!=Bank", Condition("payee", "!=", "Bank")),
    ("payee==Bank", Condition("payee", "=", "Bank")),
    ("payee='Whole Foods'", Condition("payee", "=", "Whole Foods")),
    ('payee=""', Condition("payee", "=", "")),
    ("note=a=b", Condition("note", "=", "a=b")),
])
def test_parse_where(expression, expected):
    assert parse_where(expression) == expected


@pytest.mark.parametrize("expression", ["amount", "=5", "a b=3", "1x=2", "x=", "x~3", ""])
def test_parse_where_rejects_bad_expressions(expression):
    with pytest.raises(ValueError) as error:
        parse_where(expression)
    assert repr(expression) in str(error.value)
    assert "field^=prefix" in str(error.value) and "field<=value" in str(error.value)


def test_equality_is_exact_and_case_sensitive(table):
    assert rows(table.mask(["payee=Whole Foods"])) == [0]
    assert rows(table.mask(["payee=whole foods"])) == [2]
    assert rows(table.mask(["payee=Whole"])) == []


def test_prefix(table):
    assert rows(table.mask(["accounts^=Expenses:Food"])) == [0, 2]
    assert rows(table.mask(["accounts^=Expenses:"])) == [0, 1, 2]
    assert rows(table.mask(["payee^=W"])) == [0]
    assert rows(table.mask(["accounts^=Zzz"])) == []


def test_list_field_matches_if_any_element_matches(table):
    assert rows(table.mask(["accounts=Assets:Bank:Checking"])) == [0, 1]
    assert rows(table.mask(["accounts=Expenses:Rent"])) == [1]


def test_numbers_compare_numerically(table):
    # As strings "1500" < "42.5" < "9.75"; numerically 9.75 < 42.5 < 1500.
    assert rows(table.mask(["amount>10"])) == [0, 1]
    assert rows(table.mask(["amount>=42.5"])) == [0, 1]
    assert rows(table.mask(["amount<10"])) == [2, 5]
    assert rows(table.mask(["amount<=-3"])) == [5]
    assert rows(table.mask(["amount=9.750"])) == [2]     # string "9.75" parses as a number
    assert rows(table.mask(["amount=1500.0"])) == [1]


def test_strings_compare_as_strings_when_either_side_is_not_a_number(table):
    assert rows(table.mask(["payee>M"])) == [0, 2]       # "Whole Foods", "whole foods"
    assert rows(table.mask(["payee<Bz"])) == [5]
    assert rows(table.mask(["amount>=a"])) == []          # digits sort before letters


def test_iso_dates(table):
    assert rows(table.mask(["date>=2023-01-01"])) == [0, 1, 5]
    assert rows(table.mask(["date<2023-04-15"])) == [0, 2]
    assert rows(table.mask(["date<=2023-04-15"])) == [0, 1, 2]
    assert rows(table.mask(["date^=2023-04"])) == [0, 1]
    assert rows(table.mask(["date>2023"])) == [0, 1, 5]  # "2023-..." sorts after "2023"


def test_missing_fields_never_match_except_not_equal(table):
    # Rows 3 (None) and 4 ({}) have no fields; row 5 has an empty accounts list.
    assert rows(table.mask(["amount>-1000"])) == [0, 1, 2, 5]
    assert rows(table.mask(['accounts^=""'])) == [0, 1, 2]  # any account at all
    assert rows(table.mask(["payee^=''"])) == [0, 1, 2, 5]


def test_not_equal_is_the_complement_of_equal(table):
    assert rows(table.mask(["accounts!=Assets:Bank:Checking"])) == [2, 3, 4, 5]
    assert rows(table.mask(["payee!=Bank"])) == [0, 1, 2, 3, 4]
    assert rows(table.mask(["amount!=1500"])) == [0, 2, 3, 4, 5]


def test_and_of_several_conditions(table):
    mask = table.mask(["date>=2023-01-01", "accounts^=Expenses:", "amount<100"])
    assert rows(mask) == [0]
    conditions = [parse_where("date>=2023-04-01"), parse_where("date<=2023-04-30")]
    assert rows(table.mask(conditions)) == [0, 1]
    assert rows(table.mask([])) == [0, 1, 2, 3, 4, 5]


def test_unknown_field_names_it_and_lists_known_fields(table):
    with pytest.raises(ValueError) as error:
        table.mask(["payer=Bank"])
    message = str(error.value)
    assert "'payer'" in message
    for field in ("accounts", "amount", "date", "payee"):
        assert field in message


def test_nested_dicts_use_dotted_names_and_booleans_are_strings():
    table = MetadataTable([{"meta": {"source": "bank", "tags": ["a", "b"]}, "cleared": True},
                           {"meta": {"source": "card"}, "cleared": False}])
    assert table.fields == ["cleared", "meta.source", "meta.tags"]
    assert rows(table.mask(["meta.source=card"])) == [1]
    assert rows(table.mask(["meta.tags=b"])) == [0]
    assert rows(table.mask(["cleared=true"])) == [0]


def test_append_adds_rows_and_fields(table):
    table.mask(["amount>0"])                              # columns built, then appended to
    table.append([{"amount": 5, "memo": "INV-88213"}, None])
    assert len(table) == len(LEDGER) + 2
    assert rows(table.mask(["amount<10"])) == [2, 5, 6]
    assert rows(table.mask(["memo=INV-88213"])) == [6]
    assert rows(table.mask(["memo!=INV-88213"])) == [0, 1, 2, 3, 4, 5, 7]


def test_rejects_non_dict_metadata():
    with pytest.raises(ValueError, match="passage 1"):
        MetadataTable([{}, "date=2023"])


def test_large_table_matches_a_python_reference():
    rng = np.random.default_rng(0)
    num_rows = 200_000
    days = rng.integers(1, 29, num_rows)
    months = rng.integers(1, 13, num_rows)
    amounts = np.round(rng.uniform(-500, 500, num_rows), 2)
    account_names = ["Expenses:Food:Groceries", "Expenses:Food:Restaurant", "Expenses:Rent",
                     "Assets:Bank:Checking", "Income:Salary"]
    picks = rng.integers(0, len(account_names), (num_rows, 2))
    metadatas = []
    for i in range(num_rows):
        if i % 97 == 0:
            metadatas.append(None)
            continue
        metadatas.append({"date": f"2023-{months[i]:02d}-{days[i]:02d}",
                          "accounts": [account_names[j] for j in picks[i]],
                          "amount": float(amounts[i])})
    table = MetadataTable(metadatas)
    mask = table.mask(["date>=2023-03-01", "date<2023-07-01", "accounts^=Expenses:Food",
                       "amount>-100.5"])
    present = np.array([m is not None for m in metadatas])
    food = (picks < 2).any(axis=1)
    expected = (present & (months >= 3) & (months < 7) & food & (amounts > -100.5))
    assert mask.shape == (num_rows,) and mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(table.mask(["accounts!=Income:Salary"]),
                                  ~(present & (picks == 4).any(axis=1)))

"""Salient-span masking of ledger entries (tasks/ledger_salient.py): the fields masked, the
balancing leg hidden, no answer left in its question, the task's examples, bad input named."""
from __future__ import annotations

import json
import re

import pytest

from atlas_jax_tasks import ledger_salient
from tests.test_tasks_vocab import make_vocabulary

MEAL = {"id": "txn-2021-01-14-1", "metadata": {"type": "transaction"},
        "text": '2021-01-14 * "Kin Soy" "Eating out"\n'
                "  Liabilities:US:Chase:Slate  -25.84 USD\n"
                "  Expenses:Food:Restaurant     25.84 USD"}
TRADE = {"id": "txn-2022-03-18-2", "metadata": {"type": "transaction"},
         "text": '2022-03-18 * "Buy shares of GLD"\n'
                 "  Assets:US:ETrade:Cash           -1189.19 USD\n"
                 "  Assets:US:ETrade:GLD                   8 GLD {147.53 USD, 2022-03-18}\n"
                 "  Expenses:Financial:Commissions      8.95 USD"}
BALANCE = {"id": "bal-2021-02-10-1", "metadata": {"type": "balance"},
           "text": "2021-02-10 balance Assets:US:BofA:Checking    2973.33 USD"}


def by_kind(record):
    return {e["kind"]: e for e in ledger_salient.salient_examples(record)}


def test_transaction_with_payee_gives_three_fields():
    examples = by_kind(MEAL)
    assert set(examples) == {"salient_payee", "salient_amount", "salient_account"}
    assert examples["salient_payee"]["question"].startswith('2021-01-14 * "<extra_id_0>" "Eat')
    assert examples["salient_payee"]["answers"] == ["Kin Soy"]
    amount = examples["salient_amount"]
    assert amount["answers"] == ["25.84 USD"]
    # the expense leg is the field; its balancing leg is hidden behind a second sentinel
    assert amount["question"].splitlines()[1:] == [
        "  Liabilities:US:Chase:Slate  <extra_id_1>",
        "  Expenses:Food:Restaurant     <extra_id_0>"]
    assert examples["salient_account"]["answers"] == ["Expenses:Food:Restaurant"]
    assert "  <extra_id_0>     25.84 USD" in examples["salient_account"]["question"]
    for example in examples.values():
        assert example["gold_ids"] == [MEAL["id"]]
        assert example["id"] == f"{example['kind']}:{MEAL['id']}"


def test_narration_only_entry_and_cost_annotations():
    examples = by_kind(TRADE)
    assert set(examples) == {"salient_amount", "salient_account"}   # no payee to mask
    assert examples["salient_amount"]["answers"] == ["8.95 USD"]      # the expense leg
    assert examples["salient_account"]["answers"] == ["Expenses:Financial:Commissions"]
    # other legs (not its negation) stay; the cost annotation survives untouched
    assert "8 GLD {147.53 USD, 2022-03-18}" in examples["salient_amount"]["question"]


def test_balance_assertion():
    examples = by_kind(BALANCE)
    assert examples["salient_amount"]["question"] == (
        "2021-02-10 balance Assets:US:BofA:Checking    <extra_id_0>")
    assert examples["salient_amount"]["answers"] == ["2973.33 USD"]
    assert examples["salient_account"]["answers"] == ["Assets:US:BofA:Checking"]


def test_write_and_register(tmp_path):
    import seqio
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps(r) + "\n" for r in (MEAL, TRADE, BALANCE)) + "\n")
    out = tmp_path / "salient.jsonl"
    assert ledger_salient.write_salient_records(passages, out) == 7
    task = ledger_salient.register_salient_task("test_ledger_salient", out, make_vocabulary(tmp_path))
    examples = list(task.get_dataset({"inputs": 96, "targets": 16}, split="train",
                                     shuffle=False).as_numpy_iterator())
    assert len(examples) == 7
    first = examples[0]
    assert first["inputs_pretokenized"].decode().startswith("question: 2021-01-14 * \"")
    assert first["targets_pretokenized"].decode() == "<extra_id_0> Kin Soy"
    assert first["query"].decode() == by_kind(MEAL)["salient_payee"]["question"]
    assert [g.decode() for g in first["gold_ids"]] == [MEAL["id"]]
    seqio.TaskRegistry.remove("test_ledger_salient")


def test_malformed_line_is_named(tmp_path):
    passages = tmp_path / "passages.jsonl"
    passages.write_text(json.dumps(MEAL) + "\n{\"id\": \"x\"}\n")
    with pytest.raises(ValueError, match=r"passages.jsonl:2: not a ledger passage record"):
        ledger_salient.write_salient_records(passages, tmp_path / "out.jsonl")


def test_generated_ledger_no_answer_leaks(tmp_path):
    """On a generated ledger: every passage gives an amount and an account example, the
    answer is in the source entry and nowhere in its masked question."""
    pytest.importorskip("beancount")
    pytest.importorskip("beanquery")
    from atlas_jax_tasks import ledger
    ledger.generate(tmp_path / "ledger", seed=3, start="2022-01-01", end="2022-06-30")
    records = [json.loads(line) for line in (tmp_path / "ledger" / "passages.jsonl").open()]
    texts = {r["id"]: r["text"] for r in records}
    count = ledger_salient.write_salient_records(tmp_path / "ledger" / "passages.jsonl",
                                                 tmp_path / "salient.jsonl")
    examples = [json.loads(line) for line in (tmp_path / "salient.jsonl").open()]
    assert count == len(examples) >= 2 * len(records)
    kinds = {}
    for example in examples:
        kinds.setdefault(example["kind"], set()).add(example["gold_ids"][0])
        answer = example["answers"][0]
        assert answer in texts[example["gold_ids"][0]]
        number = answer.split()[0].lstrip("-")
        question = re.sub(r"<extra_id_\d+>", "", example["question"])
        if example["kind"] == "salient_amount":
            assert not re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", question), example
        elif example["kind"] == "salient_payee":   # (an employer may name an account)
            assert f'"{answer}"' not in question, example
        else:
            assert answer not in question, example
    assert kinds["salient_amount"] == kinds["salient_account"] == set(texts)
    assert kinds["salient_payee"]      # the payee-bearing entries

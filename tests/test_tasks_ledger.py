"""Ledger tasks on a fake ledger folder, and registration from gin (`LEDGER_DIR`,
`QA_TRAIN_FILE`, `PASSAGES_FILE`, `READER_SPM`) plus the task list for `atlas-jax data list`."""
from __future__ import annotations

import json

import gin
import pytest
import seqio

import atlas_jax_tasks
from atlas_jax_tasks import ledger_tasks
from tests.test_tasks_vocab import make_vocabulary

LENGTHS = {"inputs": 64, "targets": 24}
PASSAGES = [
    {"id": "txn-2023-03-14-1", "title": "2023-03-14 Whole Foods",
     "text": "2023-03-14 * \"Whole Foods\" \"\"\n  Expenses:Food:Groceries  45.60 USD\n"
             "  Assets:Bank:Checking", "metadata": {"date": "2023-03-14", "payee": "Whole Foods"}},
    {"id": "bal-2023-03-15-1", "title": "2023-03-15 balance Assets:Bank:Checking",
     "text": "2023-03-15 balance Assets:Bank:Checking  1200.00 USD",
     "metadata": {"date": "2023-03-15", "accounts": ["Assets:Bank:Checking"]}},
]


def qa_record(n, question, answers, kind, gold_ids, phrasing):
    return {"id": f"q{n}", "question": question, "answers": answers, "kind": kind,
            "gold_ids": gold_ids, "filters": ["date>=2023-03-14", "date<=2023-03-14"],
            "bql": "SELECT sum(position) WHERE payee = 'Whole Foods' AND date = 2023-03-14",
            "phrasing": {"date": phrasing, "amount": "none", "payee": "ledger", "template": 0}}


def write_ledger(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "passages.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PASSAGES))
    records = {
        "train": [qa_record(1, "How much was paid to Whole Foods on March 14, 2023?",
                            ["45.60 USD", "$45.60", "45.6 dollars"], "payee_amount",
                            ["txn-2023-03-14-1"], "long_date")],
        "dev": [qa_record(2, "Which account paid Whole Foods on 2023-03-14?",
                          ["Expenses:Food:Groceries"], "expense_account",
                          ["txn-2023-03-14-1"], "iso")],
        "test": [qa_record(3, "balance of Assets:Bank:Checking on March 14, 2023?",
                           ["1200.00 USD"], "balance", ["bal-2023-03-15-1"], "long_date")],
        "new": [qa_record(4, "who was paid 45.60 USD on 2023-03-14?", ["Whole Foods"],
                          "payee", ["txn-2023-03-14-1"], "iso")],
        "train_64": [qa_record(5, "How much was paid to Whole Foods on March 14, 2023?",
                               ["45.60 USD"], "payee_amount", ["txn-2023-03-14-1"], "long_date")],
    }
    for split, rows in records.items():
        (folder / f"qa_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return records


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    return make_vocabulary(tmp_path_factory.mktemp("vocab"))


def test_ledger_qa_splits_and_features(tmp_path, vocabulary):
    records = write_ledger(tmp_path / "ledger")
    names = ledger_tasks.register_ledger_tasks(str(tmp_path / "ledger"), vocabulary=vocabulary)
    assert names == ["ledger_qa", "ledger_mlm"]
    task = seqio.get_mixture_or_task("ledger_qa")
    assert set(task.splits) == {"train", "validation", "test", "new", "train_64"}
    for split, file_split in (("train", "train"), ("validation", "dev"), ("test", "test"),
                              ("new", "new"), ("train_64", "train_64")):
        [example] = list(task.get_dataset(LENGTHS, split=split, shuffle=False)
                         .as_numpy_iterator())
        [record] = records[file_split]
        assert example["id"].decode() == record["id"]
        assert example["query"].decode() == record["question"]
        assert [a.decode() for a in example["answers"]] == record["answers"]
        assert [g.decode() for g in example["gold_ids"]] == record["gold_ids"]
        assert [f.decode() for f in example["filters"]] == record["filters"]
        assert example["kind"].decode() == record["kind"]
        assert example["bql"].decode() == record["bql"]
        # The target is the first answer: the ledger's own form.
        assert example["targets_pretokenized"].decode() == f"<extra_id_0> {record['answers'][0]}"
        assert json.loads(example["phrasing"]) == record["phrasing"]
    rows = list(seqio.EncDecFeatureConverter(pack=False)(
        task.get_dataset(LENGTHS, split="validation", shuffle=False), LENGTHS)
        .as_numpy_iterator())
    assert vocabulary.decode(rows[0]["encoder_input_tokens"]) == (
        "question: Which account paid Whole Foods on 2023-03-14? answer: <extra_id_0>")
    assert vocabulary.decode(rows[0]["decoder_target_tokens"]) == (
        "<extra_id_0> Expenses:Food:Groceries")


def test_ledger_mlm_corrupts_ledger_passages(tmp_path, vocabulary):
    write_ledger(tmp_path / "ledger")
    ledger_tasks.register_ledger_tasks(str(tmp_path / "ledger"), vocabulary=vocabulary)
    task = seqio.get_mixture_or_task("ledger_mlm")
    dataset = task.get_dataset(LENGTHS, split="train", shuffle=False, seed=0)
    examples = list(dataset.as_numpy_iterator())
    assert [e["passage_id"] for e in examples] == [b"txn-2023-03-14-1", b"bal-2023-03-15-1"]
    rows = list(seqio.EncDecFeatureConverter(pack=False)(dataset, LENGTHS).as_numpy_iterator())
    for row in rows:
        assert "<extra_id_0>" in vocabulary.decode(row["encoder_input_tokens"])
        assert vocabulary.decode(row["decoder_target_tokens"]).startswith("<extra_id_0>")


def test_missing_ledger_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="LEDGER_DIR.*atlas-jax data ledger"):
        ledger_tasks.register_ledger_tasks(str(tmp_path / "nowhere"))
    assert ledger_tasks.register_ledger_tasks(None) == []


def test_registration_from_gin_macros(tmp_path):
    make_vocabulary(tmp_path)
    write_ledger(tmp_path / "ledger")
    qa_file = tmp_path / "ledger" / "qa_train.jsonl"
    gin.clear_config()
    try:
        gin.parse_config("\n".join([
            "from __gin__ import dynamic_registration",
            "from atlas_jax_tasks import ledger_tasks",
            "from atlas_jax_tasks import registry",
            "from atlas_jax_tasks import vocab",
            f"READER_SPM = '{tmp_path / 'spiece.model'}'",
            f"LEDGER_DIR = '{tmp_path / 'ledger'}'",
            f"QA_TRAIN_FILE = '{qa_file}'",
            f"PASSAGES_FILE = '{tmp_path / 'ledger' / 'passages.jsonl'}'",
            "vocab.reader_vocabulary.spiece_model = %READER_SPM",
            "ledger_tasks.register_ledger_tasks.ledger_dir = %LEDGER_DIR",
            "registry.register_jsonl_tasks.qa_train_file = %QA_TRAIN_FILE",
            "registry.register_jsonl_tasks.passages_file = %PASSAGES_FILE",
        ]))
        names = atlas_jax_tasks.register_configured_tasks()
        assert names == ["natural_questions_open", "trivia_qa", "jsonl_qa", "passages_mlm",
                         "passages_prefix_lm", "ledger_qa", "ledger_mlm"]
        # The default vocabulary is the READER_SPM one, resolved when first used.
        task = seqio.get_mixture_or_task("jsonl_qa")
        [example] = list(task.get_dataset(LENGTHS, split="train", shuffle=False)
                         .as_numpy_iterator())
        vocabulary = task.output_features["inputs"].vocabulary
        assert vocabulary.decode(example["inputs"]) == (
            "question: How much was paid to Whole Foods on March 14, 2023? answer: <extra_id_0>")
        assert set(names) <= set(atlas_jax_tasks.registered_tasks())
    finally:
        gin.clear_config()
    assert set(atlas_jax_tasks.list_tasks()) == set(atlas_jax_tasks.describe_tasks()) >= {
        "natural_questions_open", "trivia_qa", "jsonl_qa", "passages_mlm",
        "passages_prefix_lm", "jsonl_multiple_choice", "ledger_qa", "ledger_mlm"}


def test_ledger_gin_file(tmp_path):
    from atlas_jax import gin_config
    make_vocabulary(tmp_path)
    write_ledger(tmp_path / "ledger")
    try:
        gin_config.parse(["tasks/ledger.gin"],
                         [f"--gin.LEDGER_DIR='{tmp_path / 'ledger'}'",
                          f"--gin.READER_SPM='{tmp_path / 'spiece.model'}'"])
        assert atlas_jax_tasks.register_configured_tasks()[-2:] == ["ledger_qa", "ledger_mlm"]
        task = seqio.get_mixture_or_task("ledger_qa")
        [example] = list(task.get_dataset(LENGTHS, split="new", shuffle=False)
                         .as_numpy_iterator())
        assert example["query"].decode() == "who was paid 45.60 USD on 2023-03-14?"
    finally:
        gin.clear_config()

"""Multiple choice: permutation counts (single 1, cyclic n, all n!), answer remapping,
features through the feature converter, plain vs debiased accuracy."""
from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import seqio
import tensorflow as tf

from atlas_jax_tasks import multiple_choice as mc
from tests.test_tasks_vocab import make_vocabulary

LENGTHS = {"inputs": 64, "targets": 6}
RECORDS = [
    {"id": "m1", "question": "what is red?",
     "options": {"A": "apple", "B": "sky", "C": "grass", "D": "snow"}, "answer": "A"},
    {"id": "m2", "question": "what is blue?",
     "options": {"A": "grass", "B": "apple", "C": "sky"}, "answer": "C"},
]


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    return make_vocabulary(tmp_path_factory.mktemp("vocab"))


@pytest.fixture
def files(tmp_path):
    paths = {}
    for split in ("train", "test"):
        paths[split] = tmp_path / f"mc_{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return {split: str(path) for split, path in paths.items()}


@pytest.mark.parametrize("num_options", [1, 2, 3, 4, 5])
def test_permutation_orders(num_options):
    for mode, index in (("single", 0), ("cyclic", 1), ("all", 2)):
        orders = mc.permutation_orders(tf.constant(num_options), tf.constant(index)).numpy()
        assert orders.shape == (mc.expected_orders(num_options, mode), num_options)
        assert orders[0].tolist() == list(range(num_options))  # identity first
        assert len({tuple(row) for row in orders.tolist()}) == len(orders)
        assert all(sorted(row) == list(range(num_options)) for row in orders.tolist())
    cyclic = mc.permutation_orders(tf.constant(num_options), tf.constant(1)).numpy()
    assert all(row.tolist() == [(i + s) % num_options for i in range(num_options)]
               for s, row in enumerate(cyclic))
    every = mc.permutation_orders(tf.constant(num_options), tf.constant(2)).numpy()
    assert sorted(map(tuple, every.tolist())) == list(itertools.permutations(
        range(num_options)))


@pytest.mark.parametrize("train_mode", ["single", "cyclic", "all"])
def test_counts_and_answer_remapping(files, vocabulary, train_mode):
    task = mc.register_multiple_choice_task("test_mc", files, vocabulary,
                                            train_permutations=train_mode)
    for split, mode in (("train", train_mode), ("test", "cyclic")):
        examples = list(task.get_dataset(LENGTHS, split=split, shuffle=False)
                        .as_numpy_iterator())
        for record in RECORDS:
            mine = [e for e in examples if e["example_id"] == record["id"].encode()]
            assert len(mine) == mc.expected_orders(len(record["options"]), mode)
            for example in mine:
                order = [letter.decode() for letter in example["options_order"]]
                letters = sorted(record["options"])
                inputs = example["inputs_pretokenized"].decode()
                shown = dict(re.findall(r"\(([A-Z])\) (\w+)", inputs))
                # Display letter X shows the original option order[X].
                assert shown == {letter: record["options"][original]
                                 for letter, original in zip(letters, order)}
                answer = example["answer"].decode()
                assert order[letters.index(answer)] == record["answer"]
                assert shown[answer] == record["options"][record["answer"]]
                assert example["targets_pretokenized"].decode() == f"<extra_id_0> {answer}"
                assert example["id"].decode() == f"{record['id']}/{''.join(order)}"
                assert example["query"].decode().startswith(record["question"])
    assert math.factorial(4) == mc.expected_orders(4, "all")


def test_features_through_feature_converter(files, vocabulary):
    task = mc.register_multiple_choice_task("test_mc_converter", files, vocabulary)
    dataset = task.get_dataset(LENGTHS, split="train", shuffle=False)
    rows = list(seqio.EncDecFeatureConverter(pack=False)(dataset, LENGTHS).as_numpy_iterator())
    assert len(rows) == 2
    assert vocabulary.decode(rows[0]["encoder_input_tokens"]) == (
        "question: what is red? options: (A) apple (B) sky (C) grass (D) snow "
        "answer: <extra_id_0>")
    assert vocabulary.decode(rows[1]["decoder_target_tokens"]) == "<extra_id_0> C"
    assert mc.multiple_choice_postprocessor(b"<extra_id_0> C") == "C"
    assert mc.multiple_choice_metrics(["A", "C"], ["A", "B"]) == {"accuracy": 50.0}


def test_bad_options_name_the_line(tmp_path, vocabulary):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**RECORDS[0], "answer": "E"}) + "\n")
    task = mc.register_multiple_choice_task("test_mc_bad", {"train": str(path)}, vocabulary)
    with pytest.raises(Exception, match=r"bad.jsonl:1: answer 'E' is not one of"):
        list(task.get_dataset(LENGTHS, split="train").as_numpy_iterator())
    with pytest.raises(ValueError, match="permutations must be one of"):
        mc.register_multiple_choice_task("test_mc_bad", {"train": str(path)}, vocabulary,
                                         train_permutations="some")


def test_debiased_accuracy_undoes_letter_bias():
    # Options A, B, C; the answer is B. The model prefers the letter "A" by +3 nats whatever
    # it shows, and the right content by +2: in the original order it says A (wrong); over the
    # three cyclic orders the letter bias averages out and B wins.
    def log_likelihoods(order):
        return {letter: (3.0 if letter == "A" else 0.0) + (2.0 if shown == "B" else 0.0)
                for letter, shown in zip("ABC", order)}

    records = [{"example_id": "e1", "options_order": order, "original_answer": "B",
                "letter_log_likelihoods": log_likelihoods(order)}
               for order in (list("ABC"), list("BCA"), list("CAB"))]
    # A second example the model gets right either way.
    records += [{"example_id": "e2", "options_order": list(order), "original_answer": "A",
                 "letter_log_likelihoods": {letter: 5.0 if shown == "A" else 0.0
                                            for letter, shown in zip("ABC", order)}}
                for order in ("ABC", "BCA", "CAB")]
    assert mc.multiple_choice_accuracy(records) == {"accuracy": 50.0,
                                                    "debiased_accuracy": 100.0,
                                                    "examples": 2.0}
    with pytest.raises(ValueError, match="identity order"):
        mc.multiple_choice_accuracy(records[1:3])

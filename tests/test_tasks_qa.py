"""QA task from jsonl: features through the EncDec feature converter, answer choice
determinism, EM/F1 metric fns, postprocessing, and file:line errors."""
from __future__ import annotations

import json

import pytest
import seqio
import tensorflow as tf

from atlas_jax_tasks import qa
from tests.test_tasks_vocab import make_vocabulary

LENGTHS = {"inputs": 48, "targets": 12}
RECORDS = [
    {"id": "q1", "question": "who wrote the book?", "answers": ["the author", "author"]},
    {"question": "what is the capital of France?", "answers": ["Paris"],
     "filters": ["date>=2023-03-01"]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    return make_vocabulary(tmp_path_factory.mktemp("vocab"))


def test_qa_task_features_after_feature_converter(tmp_path, vocabulary):
    train = write_jsonl(tmp_path / "qa_train.jsonl", RECORDS)
    task = qa.register_qa_task("test_qa_features", {"train": train}, vocabulary=vocabulary)
    examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    assert [e["id"] for e in examples] == [b"q1", b"qa_train-2"]  # default id: file-line
    assert [e["query"] for e in examples] == [b"who wrote the book?",
                                             b"what is the capital of France?"]
    assert examples[0]["answers"].tolist() == [b"the author", b"author"]
    assert examples[0]["filters"].tolist() == [] and examples[1]["filters"].tolist() == [
        b"date>=2023-03-01"]

    converted = seqio.EncDecFeatureConverter(pack=False)(
        task.get_dataset(LENGTHS, split="train", shuffle=False), LENGTHS)
    rows = list(converted.as_numpy_iterator())
    assert set(rows[0]) == {"encoder_input_tokens", "decoder_target_tokens",
                            "decoder_input_tokens", "decoder_loss_weights"}
    assert rows[0]["encoder_input_tokens"].shape == (48,)
    assert rows[0]["decoder_target_tokens"].shape == (12,)
    assert vocabulary.decode(rows[1]["encoder_input_tokens"]) == (
        "question: what is the capital of France? answer: <extra_id_0>")
    assert vocabulary.decode(rows[1]["decoder_target_tokens"]) == "<extra_id_0> Paris"
    target = vocabulary.decode(rows[0]["decoder_target_tokens"])
    assert target in ("<extra_id_0> the author", "<extra_id_0> author")
    # EOS ends inputs and targets; decoder inputs are the targets shifted right.
    inputs = rows[1]["encoder_input_tokens"].tolist()
    assert inputs[inputs.index(vocabulary.eos_id) - 1] == vocabulary.vocab_size - 1
    assert rows[1]["decoder_input_tokens"][1:].tolist() == rows[1][
        "decoder_target_tokens"][:-1].tolist()


def test_answer_choice_is_a_function_of_seed_and_id():
    answers = tf.constant([f"answer {i}" for i in range(8)])

    def choices(seed, ids):
        return [qa.choose_answer(answers, tf.constant(i), seed).numpy() for i in ids]

    ids = [f"q{i}" for i in range(40)]
    assert choices(3, ids) == choices(3, ids)
    assert choices(3, ids[::-1]) == choices(3, ids)[::-1]  # order-independent
    assert choices(3, ids) != choices(4, ids)
    assert len(set(choices(3, ids))) > 4  # spread over the answers
    assert qa.choose_answer(tf.constant([], tf.string), tf.constant("q"), 0).numpy() == b""


def test_answer_choice_is_deterministic_in_the_task(tmp_path, vocabulary):
    records = [{"id": f"q{i}", "question": "who wrote the book?",
                "answers": ["alpha", "beta", "gamma", "delta"]} for i in range(24)]
    train = write_jsonl(tmp_path / "train.jsonl", records)

    def targets(seed, shuffle):
        task = qa.register_qa_task("test_qa_seed", {"train": train}, vocabulary=vocabulary,
                                   answer_seed=seed)
        examples = task.get_dataset(LENGTHS, split="train", shuffle=shuffle, seed=7)
        return {e["id"]: e["targets_pretokenized"] for e in examples.as_numpy_iterator()}

    first = targets(0, shuffle=False)
    assert targets(0, shuffle=True) == first
    assert targets(1, shuffle=False) != first
    assert len(set(first.values())) > 1


def test_metric_fns_and_postprocessor():
    metrics = qa.qa_metrics([["the author", "author"], ["Paris"], ["blue sky"]],
                            ["The Author.", "paris", "sky"])
    assert metrics["em"] == pytest.approx(200 / 3)
    assert metrics["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)
    example = {"answers": [b"the author", b"author"]}
    assert qa.qa_postprocessor(b"<extra_id_0> the author", example, is_target=True) == [
        "the author", "author"]
    assert qa.qa_postprocessor("<extra_id_0> Paris <extra_id_1> x") == "Paris"
    assert qa.qa_postprocessor(b"Paris") == "Paris"


@pytest.mark.parametrize("line, message", [
    ('{"id": "q", "question": "x"}', "missing field 'answers'"),
    ('{"id": "q", "question": "x", "answers": []}', "'answers' is empty"),
    ('{"id": "q", "question": 3, "answers": [{"a": 1}]}', "must be a list of strings"),
    ("{not json", "invalid JSON"),
])
def test_bad_line_names_file_and_line(tmp_path, vocabulary, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + line + "\n")
    task = qa.register_qa_task("test_qa_bad", {"train": str(path)}, vocabulary=vocabulary)
    with pytest.raises(Exception, match=f"bad.jsonl:3: .*{message}"):
        list(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())


def test_missing_file_names_split_and_pattern(tmp_path, vocabulary):
    task = qa.register_qa_task("test_qa_missing", {"validation": str(tmp_path / "none.jsonl")},
                               vocabulary=vocabulary)
    with pytest.raises(FileNotFoundError, match="validation.*none.jsonl"):
        task.get_dataset(LENGTHS, split="validation")

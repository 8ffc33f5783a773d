"""TFDS QA tasks on tiny datasets prepared here: the real `natural_questions_open` and
`trivia_qa/unfiltered.nocontext` builders read data written with their own feature specs
(`tfds.dataset_builders.store_as_tfds_dataset`), so nothing is downloaded."""
from __future__ import annotations

import pytest
import seqio
import tensorflow_datasets as tfds

from atlas_jax_tasks import tfds_sources
from tests.test_tasks_vocab import make_vocabulary

LENGTHS = {"inputs": 48, "targets": 12}


def trivia_example(question_id, question, value, aliases):
    empty_pages = {"doc_source": [], "filename": [], "title": [], "wiki_context": []}
    empty_results = {"description": [], "filename": [], "rank": [], "search_context": [],
                     "title": [], "url": []}
    return {"question": question, "question_id": question_id, "question_source": "test",
            "answer": {"aliases": aliases, "normalized_aliases": [a.lower() for a in aliases],
                       "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                       "normalized_value": value.lower(), "type": "WikipediaEntity",
                       "value": value},
            "entity_pages": empty_pages, "search_results": empty_results}


def store(name, version, examples, data_dir, config=None):
    """Writes `examples` as both splits of `name` with the real builder's features."""
    full_name = f"{name}/{config}" if config else name
    features = tfds.builder(full_name, data_dir=data_dir).info.features
    pairs = list(enumerate(examples))
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=version, config=config, features=features, data_dir=data_dir,
        split_datasets={"train": pairs, "validation": pairs}, disable_shuffling=True)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    store("natural_questions_open", "1.0.0", [
        {"question": "who wrote the book", "answer": ["the author", "author"]},
        {"question": "what is the capital of France", "answer": ["Paris"]},
    ], data_dir)
    store("trivia_qa", "1.1.0", [
        trivia_example("tq1", "what is the capital of France?", "Paris",
                       ["Paris", "Paris France"]),
    ], data_dir, config="unfiltered.nocontext")
    return data_dir


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    return make_vocabulary(tmp_path_factory.mktemp("vocab"))


def test_tfds_tasks_read_local_data(tfds_dir, vocabulary):
    names = tfds_sources.register_tfds_qa_tasks(data_dir=tfds_dir, vocabulary=vocabulary)
    assert names == ["natural_questions_open", "trivia_qa"]
    try:
        nq = seqio.get_mixture_or_task("natural_questions_open")
        examples = list(nq.get_dataset(LENGTHS, split="validation", shuffle=False)
                        .as_numpy_iterator())
        assert [e["query"] for e in examples] == [b"who wrote the book",
                                                 b"what is the capital of France"]
        assert examples[0]["answers"].tolist() == [b"the author", b"author"]
        assert examples[0]["id"].startswith(b"nq-") and examples[0]["id"] != examples[1]["id"]
        rows = list(seqio.EncDecFeatureConverter(pack=False)(
            nq.get_dataset(LENGTHS, split="train", shuffle=False), LENGTHS).as_numpy_iterator())
        assert vocabulary.decode(rows[1]["encoder_input_tokens"]) == (
            "question: what is the capital of France answer: <extra_id_0>")
        assert vocabulary.decode(rows[1]["decoder_target_tokens"]) == "<extra_id_0> Paris"

        trivia = seqio.get_mixture_or_task("trivia_qa")
        [example] = list(trivia.get_dataset(LENGTHS, split="train", shuffle=False)
                         .as_numpy_iterator())
        assert example["id"] == b"tq1"
        assert example["answers"].tolist() == [b"Paris", b"Paris France"]  # value, aliases
        assert example["inputs_pretokenized"] == (
            b"question: what is the capital of France? answer: <extra_id_0>")
    finally:
        tfds_sources.register_tfds_qa_tasks()  # back to the default data directory


def test_missing_tfds_data_says_how_to_prepare(tmp_path, vocabulary):
    tfds_sources.register_tfds_qa_tasks(data_dir=str(tmp_path), vocabulary=vocabulary)
    try:
        task = seqio.get_mixture_or_task("natural_questions_open")
        with pytest.raises(FileNotFoundError, match="tfds build natural_questions_open"):
            task.get_dataset(LENGTHS, split="validation")
    finally:
        tfds_sources.register_tfds_qa_tasks()


def test_import_registers_the_tfds_tasks():
    import atlas_jax_tasks
    assert {"natural_questions_open", "trivia_qa"} <= set(seqio.TaskRegistry.names())
    assert {"natural_questions_open", "trivia_qa"} <= set(atlas_jax_tasks.registered_tasks())

"""Passage store: parsing, errors with file and line, dense ids, pre-tokenized gathers."""
import json

import numpy as np
import pytest

from atlas_jax.index import passages


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _passage(i, **extra):
    return json.dumps({"id": f"p{i}", "title": f"T{i}", "text": f"text {i}", **extra})


def test_reads_ids_titles_metadata(tmp_path):
    path = _write(tmp_path / "p.jsonl", [_passage(0, metadata={"date": "2023-01-02"}), "",
                                         json.dumps({"id": 7, "text": "no title"})])
    store = passages.PassageStore.from_jsonl(path)
    assert len(store) == 2 and store.ids == ["p0", "7"]
    assert store.metadata == [{"date": "2023-01-02"}, {}]
    np.testing.assert_array_equal(store.index_of(["7", "p0"]), [1, 0])
    assert store.retriever_texts() == ["T0 text 0", "no title"]
    assert store.reader_texts([0]) == ["title: T0 context: text 0"]
    with pytest.raises(KeyError, match="'nope'"):
        store.index_of(["nope"])


@pytest.mark.parametrize("bad_line, message", [
    ('{"id": "x", "text": ', "p.jsonl:3: malformed JSON"),
    ('{"title": "t", "text": "x"}', "p.jsonl:3: missing required field 'id'"),
    ('{"id": "y"}', "p.jsonl:3: missing required field 'text'"),
    ('{"id": "p0", "text": "again"}', "p.jsonl:3: duplicate passage id 'p0'"),
    ('{"id": "z", "text": "t", "metadata": [1]}', "p.jsonl:3: 'metadata' must be an object"),
    ('[1, 2]', "p.jsonl:3: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path / "p.jsonl", [_passage(0), _passage(1), bad_line])
    with pytest.raises(passages.PassageFileError, match=message.replace("[", r"\[")):
        passages.PassageStore.from_jsonl(path)


def test_extend_is_all_or_nothing(tmp_path):
    store = passages.PassageStore.from_records([{"id": "a", "text": "x"}])
    with pytest.raises(passages.PassageFileError, match="record 1: duplicate passage id 'a'"):
        store.extend([{"id": "b", "text": "y"}, {"id": "a", "text": "z"}])
    assert store.ids == ["a"]
    np.testing.assert_array_equal(store.extend([{"id": "b", "text": "y"}]), [1])
    store.write_jsonl(tmp_path / "out.jsonl")
    assert passages.PassageStore.from_jsonl(tmp_path / "out.jsonl").ids == ["a", "b"]


def test_token_array_memmap_gather(tmp_path):
    texts = ["a", "a b c", "a b c d e f g h i j"]
    encode = lambda batch: [[len(w) + 10 for w in t.split()] for t in batch]  # noqa: E731
    tokens = passages.TokenArray.build(texts, encode, max_length=6, path=tmp_path / "r",
                                       chunk=2)
    assert isinstance(tokens.token_ids, np.memmap)
    np.testing.assert_array_equal(tokens.lengths, [1, 3, 6])
    ids, mask = tokens.gather(np.array([[1, 0]]), pad_to_multiple=4)
    assert ids.shape == (1, 2, 4) and mask.shape == (1, 2, 4)
    np.testing.assert_array_equal(mask[0], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(ids[0, 0], [11, 11, 11, 0])
    again = passages.TokenArray.load(tmp_path / "r")
    np.testing.assert_array_equal(again.token_ids, tokens.token_ids)

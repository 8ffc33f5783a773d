"""`atlas-jax index import-atlas`: the reference's saved index (float16 [dim, n] shards and
pickled passages) becomes an atlas-jax index with the exact top-k; bad input writes nothing."""
import json
import os
import pickle

import numpy as np
import pytest

from atlas_jax import cli
from atlas_jax.index import passage_index
from tests.atlas_reference import (contriever_embed, make_contriever, write_atlas_checkpoint,
                                   write_atlas_saved_index, write_vocab)
from tests.hf_reference import make_hf_t5

WORDS = ["groceries", "rent", "coffee", "salary", "restaurant", "bank", "checking", "balance"]


def _records(n):
    rng = np.random.default_rng(0)
    return [{"id": f"p{i}", "title": WORDS[i % 8],
             "text": " ".join(rng.choice(WORDS, size=6)), "section": "2021" if i % 3 else ""}
            for i in range(n)]


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("backend", ["device", "scann"])
def test_imported_index_returns_the_exact_top_k(tmp_path, capsys, backend):
    records = _records(50)
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(50, 24)).astype(np.float32)
    saved = write_atlas_saved_index(tmp_path / "saved", records, embeddings, shards=3)
    code, out, err = _run(capsys, "index", "import-atlas", "--dir", str(saved), "--out",
                          str(tmp_path / "idx"), "--backend", backend)
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["passages"], stats["dim"], stats["shards"]) == (50, 24, 3)
    index = passage_index.PassageIndex.load(tmp_path / "idx")
    assert index.store.ids == [r["id"] for r in records]
    assert index.store.titles[1] == "rent: 2021" and index.store.titles[0] == "groceries"
    stored = embeddings.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(index.embeddings, stored)
    queries = rng.normal(size=(4, 24)).astype(np.float32)
    result = index.search(queries, 5)
    expected = np.argsort(-(queries @ stored.T), axis=1)[:, :5]
    if backend == "device":
        np.testing.assert_array_equal(result.ids, expected)
    else:   # ScaNN on 50 points: the exact top-5 almost everywhere
        assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(result.ids, expected)]) >= 0.9


def test_search_with_the_checkpoints_query_tower(tmp_path, capsys):
    """End to end: the Contriever of an Atlas checkpoint built the saved index; `index search
    --retriever model.pth.tar --tokenizer vocab.txt` ranks as the reference would."""
    from atlas_jax import weights
    contriever = make_contriever(seed=4, hidden=64, heads=1)
    checkpoint = write_atlas_checkpoint(tmp_path / "model.pth.tar",
                                        make_hf_t5(tmp_path / "hf", version="v1.1"), contriever)
    vocab = write_vocab(tmp_path / "vocab.txt")
    records = _records(30)
    retriever = weights.load_retriever(checkpoint, tokenizer=vocab)
    texts = [f"{r['title']}{': ' + r['section'] if r['section'] else ''} {r['text']}"
             for r in records]
    ids, mask = retriever.tokenize(texts, pad_to_multiple=1)
    reference = contriever_embed(contriever, ids, mask)          # what the reference indexed
    saved = write_atlas_saved_index(tmp_path / "saved", records, reference, shards=2)
    assert _run(capsys, "index", "import-atlas", "--dir", str(saved), "--out",
                str(tmp_path / "idx"), "--checkpoint", str(checkpoint))[0] == 0
    code, out, err = _run(capsys, "index", "search", "--index", str(tmp_path / "idx"),
                          "--query", "coffee bank", "--k", "3", "--tokenizer", str(vocab))
    assert code == 0, err
    hits = [json.loads(line)["id"] for line in out.splitlines()]
    q_ids, q_mask = retriever.tokenize(["coffee bank"], pad_to_multiple=1)
    query = contriever_embed(contriever, q_ids, q_mask)
    scores = query @ reference.astype(np.float16).astype(np.float32).T
    assert hits == [records[i]["id"] for i in np.argsort(-scores[0])[:3]]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_poisoned_passages_are_refused_and_nothing_is_written(tmp_path, capsys):
    saved = write_atlas_saved_index(tmp_path / "saved", _records(10),
                                    np.ones((10, 8), np.float32), shards=2)
    marker = tmp_path / "pwned"
    with open(saved / "passages.1.pt", "wb") as f:
        pickle.dump([{"id": "x", "text": "y"}, _Payload(marker)], f)
    code, _, err = _run(capsys, "index", "import-atlas", "--dir", str(saved), "--out",
                        str(tmp_path / "idx"))
    assert code == 2 and "passages.1.pt: refused" in err and "posix.system" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "idx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx")]


def test_mismatched_or_missing_shards_fail_in_one_line(tmp_path, capsys):
    saved = write_atlas_saved_index(tmp_path / "saved", _records(10),
                                    np.ones((10, 8), np.float32), shards=2)
    with open(saved / "passages.0.pt", "wb") as f:
        pickle.dump(_records(3), f)
    code, _, err = _run(capsys, "index", "import-atlas", "--dir", str(saved), "--out",
                        str(tmp_path / "idx"))
    assert code == 2 and "embeddings.0.pt: 5 embeddings" in err and "for 3 passages" in err
    (saved / "passages.1.pt").unlink()
    code, _, err = _run(capsys, "index", "import-atlas", "--dir", str(saved), "--out",
                        str(tmp_path / "idx"))
    assert code == 2 and "passages.1.pt: file not found" in err
    assert not (tmp_path / "idx").exists()
    code, _, err = _run(capsys, "index", "import-atlas", "--dir", str(tmp_path / "nothing"),
                        "--out", str(tmp_path / "idx"))
    assert code == 2 and "saved index folder not found" in err

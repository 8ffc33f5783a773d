"""The reader shipped in the package (`atlas_jax/readers/ledger_t5`, made by `make reader`):
its files load, its model card matches them, it reads entries it was never trained on, and
transformers reads the same weights."""
import dataclasses
import hashlib
import json
import random
from pathlib import Path

import gin
import numpy as np
import pytest

import atlas_jax
from atlas_jax import gin_config, weights
from atlas_jax.ledger import reader_export, reader_pretrain

FOLDER = Path(atlas_jax.__file__).parent / "readers" / "ledger_t5"
AMOUNT_ALONE = 0.5


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config(clear_constants=True)


@pytest.fixture(scope="module")
def shipped():
    return weights.load_reader("package:ledger_t5"), json.loads(
        (FOLDER / "model_card.json").read_text())


def test_files_and_card_match(shipped):
    reader, card = shipped
    assert reader.path == FOLDER and reader.spiece_model == FOLDER / "spiece.model"
    for name, digest in card["files"].items():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digest, name
    assert reader_export.parameter_shapes(reader) == card["parameter_shapes"]
    assert card["config"] == json.loads((FOLDER / "config.json").read_text())
    from atlas_jax_tasks import vocab
    vocabulary = vocab.reader_vocabulary(str(reader.spiece_model))
    assert vocabulary.vocab_size == card["vocabulary"]["size_with_sentinels"]
    assert reader.config.vocab_size == reader_pretrain.padded_vocab_size(vocabulary)
    # tens of MB at most
    assert sum(p.stat().st_size for p in FOLDER.iterdir()) < 40 * 2 ** 20
    assert card["training"]["steps"] > 0 and card["heldout_copy_accuracy"]
    assert "| field | among distractors | alone |" in (FOLDER / "README.md").read_text()


def test_gin_model_file_describes_it(shipped):
    reader, _ = shipped
    gin_config.parse(["models/ledger_reader.gin"],
                     ["weights.build_reader.checkpoint = 'package:ledger_t5'"])
    built = weights.build_reader()        # checks every shape binding against the folder
    assert dataclasses.replace(built.config, dropout_rate=0.1) == dataclasses.replace(
        reader.config, dropout_rate=0.1)


def test_it_reads_entries_of_a_ledger_it_never_saw(shipped, tmp_path):
    """Copy accuracy on a ledger of a seed and year no training run used: the entry alone,
    and among three distractors; with the entry replaced by its distractors it must fall."""
    from atlas_jax_tasks import reader_batches, reader_corpus, vocab
    reader, card = shipped
    # Seed 4343: not 4242, the ledger `bench.ask_unseen` evaluates `ask` on.
    [(_, path)] = reader_corpus.generate_ledgers(tmp_path, ((4343, "2024-01-01", "2024-06-30",
                                                            "1970-01-01"),))
    vocabulary = vocab.reader_vocabulary(str(reader.spiece_model))
    corpus = reader_batches.TokenizedCorpus.build([reader_corpus.read_passages(path)],
                                                  vocabulary)
    config = reader_pretrain.ReaderPretrainConfig(model_dir=str(tmp_path), eval_per_field=24)
    alone = reader_pretrain.copy_accuracy(reader, corpus, vocabulary, config,
                                          with_distractors=False)
    among = reader_pretrain.copy_accuracy(reader, corpus, vocabulary, config)
    for field in ("read/account", "read/payee"):
        assert alone[field] >= 0.6 and among[field] >= 0.4, (alone, among)
    # Amounts are copied from the entry (the copy head; the plain-T5 reader before it: 0.31,
    # constants only).
    assert alone["read/amount"] >= AMOUNT_ALONE, (alone, among)
    # Without the entry (its distractors only) the fields are not there to copy.
    for pool in corpus.pools.values():
        pool.source = np.asarray([corpus.distractors[0].sample(int(s), 1, random.Random(i))[0]
                                  for i, s in enumerate(pool.source)], np.int32)
    blind = reader_pretrain.copy_accuracy(reader, corpus, vocabulary, config,
                                          with_distractors=False)
    assert blind["read/payee"] < alone["read/payee"] - 0.3, (alone, blind)
    assert blind["read/account"] < alone["read/account"] - 0.2, (alone, blind)
    assert blind["read/amount"] < alone["read/amount"] - 0.3, (alone, blind)


def test_transformers_reads_the_same_t5_weights(shipped):
    """transformers loads the T5 part (and drops the copy head's tensors): its logits are the
    shipped reader's generator logits, i.e. the same reader with `copy_head` off."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reader, _ = shipped
    assert reader.config.copy_head
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(FOLDER))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 500, (2, 24))
    decoder = rng.integers(2, 500, (2, 6))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(decoder)
                       ).logits.numpy()
    params = dict(reader.params, decoder={k: v for k, v in reader.params["decoder"].items()
                                          if k != "copy_head"})
    generator = weights.Reader(dataclasses.replace(reader.config, copy_head=False), params)
    np.testing.assert_allclose(generator.logits(ids, decoder), theirs, atol=2e-4, rtol=1e-4)
    # ... and the copy head changes them: the shipped reader is not plain T5.
    theirs_log_probs = theirs - np.log(np.exp(theirs - theirs.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - theirs.max(-1, keepdims=True)
    assert np.abs(reader.logits(ids, decoder) - theirs_log_probs).max() > 1e-2


def test_unknown_package_reader_is_named():
    with pytest.raises(weights.CheckpointError, match="no_such_reader"):
        weights.load_reader("package:no_such_reader")
    with pytest.raises(weights.CheckpointError, match="not installed"):
        weights.load_reader("package:no_such.pkg.reader")

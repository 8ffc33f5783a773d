"""Reader vocabulary: T5 ids, sentinel ids, gin binding, lazy resolution, training from a
passages file. Also holds the tiny vocabulary the other task tests share."""
from __future__ import annotations

import json
import string
from pathlib import Path

import gin
import pytest
import seqio
import sentencepiece as spm

from atlas_jax.vocabulary import NUM_EXTRA_IDS, sentinel_id, train_sentencepiece
from atlas_jax_tasks import vocab

# Every string the task tests tokenize is built from these words and characters, so the
# tiny SentencePiece model decodes them back exactly.
CORPUS = [
    "question: who wrote the book? answer: the author",
    "question: what is the capital of France? answer: Paris",
    "options: (A) apple (B) sky (C) grass (D) snow answer: A B C D",
    "Whole Foods paid 45.60 USD on 2023-03-14 Expenses:Food:Groceries Assets:Bank:Checking",
    "balance of Assets:Bank:Checking on March 14, 2023 was 1200.00 USD",
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi",
    "rho sigma tau upsilon phi chi psi omega date>=2023-03-01 account=Expenses",
    string.ascii_letters + " " + string.digits + " " + string.punctuation,
] * 4


def make_vocabulary(folder: str | Path) -> seqio.SentencePieceVocabulary:
    """A small reader vocabulary trained on CORPUS (for the task tests)."""
    return vocab.train_reader_spiece(CORPUS, Path(folder) / "spiece.model", vocab_size=300)


@pytest.fixture
def spiece_path(tmp_path):
    make_vocabulary(tmp_path)
    return tmp_path / "spiece.model"


def test_sentinels_take_the_last_ids_and_t5_ids(spiece_path):
    vocabulary = vocab.reader_vocabulary(str(spiece_path))
    processor = spm.SentencePieceProcessor(model_file=str(spiece_path))
    assert vocabulary.vocab_size == processor.get_piece_size() + NUM_EXTRA_IDS
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    assert list(vocabulary.encode("<extra_id_0>")) == [sentinel_id(processor, 0)]
    assert list(vocabulary.encode("<extra_id_0>")) == [vocabulary.vocab_size - 1]
    assert list(vocabulary.encode("<extra_id_7>")) == [sentinel_id(processor, 7)]
    ids = vocabulary.encode("question: who wrote the book? answer: <extra_id_0>")
    assert ids[-1] == sentinel_id(processor, 0)
    assert vocabulary.decode(ids) == "question: who wrote the book? answer: <extra_id_0>"


def test_model_without_t5_ids_is_rejected(tmp_path):
    bos_model = tmp_path / "bos.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "bos"), vocab_size=100,
        hard_vocab_limit=False, minloglevel=2)  # sentencepiece defaults: unk 0, bos 1, eos 2
    with pytest.raises(ValueError, match="T5's"):
        vocab.reader_vocabulary(str(bos_model))
    with pytest.raises(FileNotFoundError, match="READER_SPM"):
        vocab.reader_vocabulary(str(tmp_path / "missing.model"))


def test_gin_macro_and_lazy_vocabulary(spiece_path, tmp_path):
    lazy = vocab.GinReaderVocabulary()  # built before gin knows the model
    gin.clear_config()
    try:
        with pytest.raises(ValueError, match="READER_SPM"):
            lazy.encode("answer")
        gin.parse_config([f"READER_SPM = '{spiece_path}'",
                          "reader_vocabulary.spiece_model = %READER_SPM"])
        plain = vocab.reader_vocabulary()
        assert lazy.sentencepiece_model_file == str(spiece_path)
        assert lazy == plain and lazy.vocab_size == plain.vocab_size
        assert list(lazy.encode("answer: <extra_id_0>")) == list(plain.encode(
            "answer: <extra_id_0>"))
        # A re-parsed config re-points the same object.
        other = tmp_path / "other"
        train_sentencepiece(CORPUS[:3], other / "spiece.model", vocab_size=60)
        gin.clear_config()
        gin.parse_config([f"reader_vocabulary.spiece_model = '{other / 'spiece.model'}'"])
        assert lazy.vocab_size == vocab.reader_vocabulary().vocab_size != plain.vocab_size
    finally:
        gin.clear_config()


def test_train_from_passages_file(tmp_path):
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps({"id": f"p{i}", "title": "T", "text": line}) + "\n"
                                for i, line in enumerate(CORPUS)))
    vocabulary = vocab.train_reader_spiece(passages, tmp_path / "out.model", vocab_size=200)
    assert vocabulary.decode(vocabulary.encode("alpha beta gamma")) == "alpha beta gamma"
    passages.write_text('{"id": "p0", "title": "T"}\n')
    with pytest.raises(ValueError, match="passages.jsonl:1"):
        vocab.train_reader_spiece(passages, tmp_path / "bad.model")


def test_split_digits_gives_one_piece_per_digit(tmp_path):
    ledger_lines = [f"  Expenses:Food:Groceries  {n}.{n % 97:02d} USD" for n in range(10, 400)]
    pieces = {}
    for split in (False, True):
        vocabulary = vocab.train_reader_spiece(ledger_lines, tmp_path / f"{split}.model",
                                               vocab_size=300, split_digits=split)
        processor = spm.SentencePieceProcessor(model_file=str(tmp_path / f"{split}.model"))
        pieces[split] = processor.encode_as_pieces("Expenses 118.79 USD")
        assert vocabulary.decode(vocabulary.encode("Expenses 118.79 USD")) == "Expenses 118.79 USD"
    digits = [p.lstrip("\u2581") for p in pieces[True] if any(c.isdigit() for c in p)]
    assert digits == list("11879") or digits == ["1", "1", "8", "7", "9"]
    assert all(len(d) == 1 for d in digits)
    # without it, a corpus of amounts learns multi-digit pieces
    assert any(sum(c.isdigit() for c in p) > 1 for p in pieces[False])


def test_number_pieces_segment_every_number_the_same_way(tmp_path):
    # The pieces SentencePiece learns by itself depend on the corpus (`▁25 .21` but
    # `▁ 24.32`); with number_pieces a number is groups of one or two digits then its cents,
    # in an entry, an answer or a question alike.
    ledger_lines = [f'2019-03-{n % 28 + 1:02d} * "Shop" Expenses:Food  {n}.{n % 97:02d} USD'
                    for n in range(10, 400)]
    path = tmp_path / "numbers.model"
    vocabulary = vocab.train_reader_spiece(ledger_lines, path, vocab_size=300,
                                           number_pieces=True)
    processor = spm.SentencePieceProcessor(model_file=str(path))

    def numbers(text):
        return [p.lstrip("\u2581") for p in processor.encode_as_pieces(text)
                if any(c.isdigit() for c in p)]
    odd = numbers("Expenses 118.79 USD")
    assert "".join(odd) == "118.79" and odd[-1] == ".79" and len(odd) == 3
    assert numbers("  -4394.20 USD") == ["43", "94", ".20"]
    assert numbers("2018-02-28 balance") == ["20", "18", "02", "28"]
    for text in ("Expenses 118.79 USD", "Shop 40.88 USD on 2018-02-28"):
        assert vocabulary.decode(vocabulary.encode(text)) == text
    # the same amount, in an entry and alone
    assert numbers("Liabilities:US:Chase:Slate  -25.21 USD") == numbers("25.21 USD")

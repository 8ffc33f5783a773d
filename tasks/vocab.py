"""The reader's SeqIO vocabulary: SentencePiece with T5's conventions plus 100 sentinels.

T5 conventions: pad 0, eos 1, unk 2, no bos; `seqio.SentencePieceVocabulary(extra_ids=100)`
appends `<extra_id_99>` ... `<extra_id_0>` after the model's pieces, so `<extra_id_0>` is the
last id (`atlas_jax.vocabulary.sentinel_id(processor, 0)`), as T5's span corruption expects.

The model file is either a user-supplied `spiece.model` (a T5 checkpoint's) or one trained
from a passages corpus (`train_reader_spiece`). In gin (t5x style):

    from atlas_jax_tasks import vocab
    READER_SPM = '/path/to/spiece.model'
    vocab.reader_vocabulary.spiece_model = %READER_SPM

Tasks registered before gin is parsed (the TFDS ones, on import) hold a
`GinReaderVocabulary`, which resolves that binding when it is first used.

The retriever keeps its checkpoint's own tokenizer (`atlas_jax.weights` loads it with the
retriever); nothing here applies to it.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable, Iterator

import gin
import seqio
import sentencepiece as spm

from atlas_jax.vocabulary import NUM_EXTRA_IDS, sentinel_id, train_sentencepiece

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


@functools.lru_cache(maxsize=None)
def check_spiece_model(spiece_model: str) -> None:
    """Checks that `spiece_model` follows T5's conventions (pad 0, eos 1, unk 2, no bos) and
    that seqio's `<extra_id_0>` encodes to the id `atlas_jax.vocabulary.sentinel_id` gives.

    Raises:
      FileNotFoundError: no such file. ValueError: a convention is broken (the message names
      the file and what differs).
    """
    if not Path(spiece_model).is_file():
        raise FileNotFoundError(f"{spiece_model}: SentencePiece model not found "
                                "(gin: reader_vocabulary.spiece_model / READER_SPM)")
    processor = spm.SentencePieceProcessor(model_file=spiece_model)
    found = (processor.pad_id(), processor.eos_id(), processor.unk_id(), processor.bos_id())
    if found != (PAD_ID, EOS_ID, UNK_ID, -1):
        raise ValueError(f"{spiece_model}: (pad, eos, unk, bos) ids are {found}; the reader "
                         f"needs T5's ({PAD_ID}, {EOS_ID}, {UNK_ID}, -1)")
    vocabulary = seqio.SentencePieceVocabulary(spiece_model, extra_ids=NUM_EXTRA_IDS)
    for n in (0, NUM_EXTRA_IDS - 1):
        encoded = vocabulary.encode(f"<extra_id_{n}>")
        if list(encoded) != [sentinel_id(processor, n)]:
            raise ValueError(f"{spiece_model}: '<extra_id_{n}>' encodes to {list(encoded)}, "
                             f"expected [{sentinel_id(processor, n)}]")


@gin.configurable
def reader_vocabulary(spiece_model: str = gin.REQUIRED, extra_ids: int = NUM_EXTRA_IDS
                      ) -> seqio.SentencePieceVocabulary:
    """The reader vocabulary over `spiece_model`, checked against T5's conventions.

    Args:
      spiece_model: path of a SentencePiece model (gin macro `READER_SPM` in run configs).
      extra_ids: sentinel count; T5 and Atlas use 100.

    Returns:
      seqio.SentencePieceVocabulary whose `vocab_size` counts the sentinels.
    """
    spiece_model = str(spiece_model)
    if extra_ids == NUM_EXTRA_IDS:
        check_spiece_model(spiece_model)
    return seqio.SentencePieceVocabulary(spiece_model, extra_ids=extra_ids)


class GinReaderVocabulary(seqio.SentencePieceVocabulary):
    """A `SentencePieceVocabulary` whose model file is gin's `reader_vocabulary` binding,
    looked up each time the model is needed (so a re-parsed config takes effect).

    Use it for tasks registered before gin is parsed. Equal to a plain
    `SentencePieceVocabulary` of the same file once resolved.
    """

    def __init__(self):
        super().__init__("", extra_ids=NUM_EXTRA_IDS)

    def _resolve(self) -> None:
        try:
            resolved = reader_vocabulary()
        except Exception as e:  # gin's missing-binding error, or check_spiece_model's
            raise ValueError(f"reader vocabulary: {e} (bind READER_SPM, e.g. "
                             "--gin.READER_SPM=\"'/path/spiece.model'\" with "
                             "vocab.reader_vocabulary.spiece_model = %READER_SPM)") from e
        if (resolved.sentencepiece_model_file, resolved.extra_ids) != (
                self._sentencepiece_model_file, self._extra_ids):
            self._sentencepiece_model_file = resolved.sentencepiece_model_file
            self._extra_ids = resolved.extra_ids
            self._model = None

    @property
    def sentencepiece_model_file(self) -> str:
        self._resolve()
        return self._sentencepiece_model_file

    @property
    def extra_ids(self) -> int:
        self._resolve()
        return self._extra_ids

    def _model_context(self):
        self._resolve()
        return super()._model_context()

    def __getstate__(self):
        try:  # compare / copy as the resolved file when gin names one
            self._resolve()
        except ValueError:
            pass
        return super().__getstate__()

    def __str__(self) -> str:
        return f"GinReaderVocabulary(file={self._sentencepiece_model_file or '<unresolved>'})"


def passage_texts(passages_file: str | Path) -> Iterator[str]:
    """Yields "{title} {text}" for each line of a passages jsonl (`{"id","title","text"}`)."""
    with open(passages_file, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                yield f"{record.get('title', '')} {record['text']}".strip()
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{passages_file}:{line_number}: not a passage record "
                                 f"({type(e).__name__}: {e})") from None


def train_reader_spiece(corpus: str | Path | Iterable[str], out_path: str | Path,
                        vocab_size: int = 32000, split_digits: bool = False,
                        number_pieces: bool = False) -> seqio.SentencePieceVocabulary:
    """Trains a reader SentencePiece model with T5's ids and returns its vocabulary.

    Args:
      corpus: a passages jsonl path, or an iterable of texts.
      out_path: where the `.model` file is written.
      vocab_size: piece count before the 100 sentinels (an upper bound on small corpora).
      split_digits: one piece per digit (numbers copied digit by digit).
      number_pieces: two-digit groups and cents as pieces (`vocabulary.NUMBER_PIECES`).

    Returns:
      `reader_vocabulary(out_path)`: sentinel ids checked.
    """
    texts = passage_texts(corpus) if isinstance(corpus, (str, Path)) else corpus
    path = train_sentencepiece(texts, out_path, vocab_size=vocab_size,
                               split_digits=split_digits, number_pieces=number_pieces)
    return reader_vocabulary(str(path))

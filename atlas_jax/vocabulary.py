"""Reader vocabulary: SentencePiece with T5's conventions (pad 0, eos 1, unk 2, no bos), the
100 `<extra_id_N>` sentinels taking the last ids (as seqio.SentencePieceVocabulary adds them)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from atlas_jax import fileio

SENTINEL_0 = "<extra_id_0>"          # T5's first sentinel: answers are generated after it
NUM_EXTRA_IDS = 100


# `number_pieces`: every two-digit group and every cents group its own piece, matched before
# the unigram model segments (SentencePiece's user-defined symbols), so `2018-02-28` is
# `20 18 - 02 - 28` and `4394.20` is `43 94 .20` wherever they appear.
NUMBER_PIECES = tuple(f"{i:02d}" for i in range(100)) + tuple(f".{i:02d}" for i in range(100))


def train_sentencepiece(texts: Iterable[str], out_path: str | Path, vocab_size: int = 1000,
                        split_digits: bool = False, number_pieces: bool = False) -> Path:
    """Trains a unigram SentencePiece model on `texts` with T5's special ids; writes
    `out_path` (a .model file) and returns it. `vocab_size` is an upper bound for small
    corpora (hard_vocab_limit off). `split_digits`: every digit its own piece (as PaLM and
    LLaMA do), so a reader copies any number with ten well-trained tokens instead of
    thousands of rare number pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, character_coverage=1.0, split_digits=split_digits,
        user_defined_symbols=list(NUMBER_PIECES) if number_pieces else [], minloglevel=2)
    out_path = Path(out_path)
    fileio.atomic_write_bytes(out_path, model.getvalue())
    return out_path


def reader_vocab_size(processor: spm.SentencePieceProcessor, multiple: int = 128) -> int:
    """Embedding rows for a reader using `processor` plus the sentinels, rounded up to
    `multiple` (t5x pads 32100 to 32128 so the vocab axis shards evenly)."""
    size = processor.get_piece_size() + NUM_EXTRA_IDS
    return -(-size // multiple) * multiple


def sentinel_id(processor: spm.SentencePieceProcessor, n: int) -> int:
    """Id of `<extra_id_n>`: the n-th id counted down from the top of the sentinel block."""
    return processor.get_piece_size() + NUM_EXTRA_IDS - 1 - n


def strip_sentinels(text: str) -> str:
    """Model output "<extra_id_0> Paris <extra_id_1>" -> "Paris" (text up to the next
    sentinel, as Atlas decodes answers)."""
    text = text.replace(SENTINEL_0, "", 1) if text.lstrip().startswith(SENTINEL_0) else text
    return text.split("<extra_id_")[0].strip()

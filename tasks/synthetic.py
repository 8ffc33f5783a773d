"""A synthetic joint-training task: each answer is stated in exactly one passage.

`generate_synthetic(DIR)` writes (deterministically from a seed) `passages.jsonl`, facts
"The {attribute} of {Entity} is {value}." with one passage per (entity, attribute) cell, and
`qa_{train,dev}.jsonl`, questions "What is the {attribute} of {Entity}?" -> "{value}" (two
words, unique to the passage) with `gold_ids`. Cells not asked about are the distractors:
each passage shares its attribute with many questions and its entity with a few, so only
both together find the gold passage. The reader vocabulary is trained on the folder
(`train_synthetic_spiece`); the retriever is a tiny random BERT dual encoder over a word-level
tokenizer (`synthetic_retriever`) that ranks gold passages near chance (`initial_recall`).
`register_synthetic_tasks` registers `synthetic_qa` (train, validation), generating the
folder if needed; in gin: `synthetic.register_synthetic_tasks.synthetic_dir = %SYNTHETIC_DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from atlas_jax import evaluation, fileio
from atlas_jax.index.passages import reader_text, retriever_text
from atlas_jax.models import retriever as retriever_lib, stacking
from atlas_jax_tasks.jsonl_source import STRING_LIST, JsonlField
from atlas_jax_tasks.qa import register_qa_task
from atlas_jax_tasks.vocab import reader_vocabulary, train_reader_spiece

PASSAGES_FILE, MANIFEST_FILE, SPIECE_FILE = "passages.jsonl", "synthetic.json", "spiece.model"
OUTPUT_KIND = "synthetic-data"     # the kind in the folder's .atlas-jax.json marker
QA_SPLIT_FILES = {"train": "qa_train.jsonl", "validation": "qa_dev.jsonl"}
SYNTHETIC_QA_FIELDS = (JsonlField("gold_ids", STRING_LIST, required=False),)
PASSAGE_TEMPLATES = ("The {attribute} of {entity} is {value}.",
                     "{entity} has a {attribute} of {value}.")
QUESTION_TEMPLATES = ("What is the {attribute} of {entity}?",
                      "Which {attribute} does {entity} have?")
VALUE_ADJECTIVES = ("amber", "azure", "crimson", "golden", "ivory", "jade", "olive", "scarlet",
                    "silver", "teal", "violet", "coral", "ochre", "slate", "copper", "indigo",
                    "lilac", "russet", "sable", "umber", "pearl", "rusty", "misty", "dusky")
VALUE_NOUNS = ("falcon", "lantern", "river", "anvil", "meadow", "harbor", "thistle", "beacon",
               "comet", "willow", "quarry", "saddle", "ember", "garnet", "kettle", "orchard",
               "pebble", "summit", "tundra", "walrus", "badger", "candle", "ferry", "glacier")
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
PAD_ID, UNKNOWN_ID, CLS_ID = 0, 1, 2


def _made_up_words(rng: random.Random, count: int, syllables: Sequence[int],
                   taken: set[str]) -> list[str]:
    """`count` distinct lowercase consonant-vowel words (not in `taken`, which grows)."""
    words = []
    while len(words) < count:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS)
                       for _ in range(rng.choice(syllables)))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    fileio.atomic_write_lines(path, (json.dumps(record) for record in records))


def read_synthetic(folder: str | Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """(passages, {split: question records}) of a folder written by `generate_synthetic`."""
    def read(name: str) -> list[dict]:
        lines = (Path(folder) / name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line]
    return read(PASSAGES_FILE), {split: read(name) for split, name in QA_SPLIT_FILES.items()}


def answer_passage_ids(passages: Sequence[dict], answer: str) -> list[str]:
    """Ids of the passages whose retriever text ("{title} {text}") contains `answer` as whole
    words (SQuAD-normalised: `evaluation.has_answer`)."""
    return [passage["id"] for passage in passages
            if evaluation.has_answer(retriever_text(passage["title"], passage["text"]), [answer])]


def generate_synthetic(out_dir: str | Path, seed: int = 0, num_facts: int = 200,
                       num_distractors: int = 200, num_attributes: int = 8, num_dev: int = 50
                       ) -> dict[str, Any]:
    """Writes the synthetic corpus and questions into `out_dir` (byte-identical per arguments).

    Args:
      out_dir: folder to write (created if missing).
      seed: generation seed.
      num_facts: passages asked about; one question each (train + dev).
      num_distractors: passages not asked about (same attributes, other entities).
      num_attributes: distinct attributes; entities = ceil(passages / num_attributes).
      num_dev: questions in `qa_dev.jsonl` (the rest go to `qa_train.jsonl`).

    Returns:
      the manifest written to `synthetic.json`: {"arguments", "passages", "train", "dev",
      "entities", "attributes", "vocabulary_size" (distinct lowercase words)}.

    Raises:
      ValueError: more passages than distinct values, or num_dev not below num_facts.
    """
    num_passages = num_facts + num_distractors
    if num_passages > len(VALUE_ADJECTIVES) * len(VALUE_NOUNS) or not 0 < num_dev < num_facts:
        raise ValueError(f"num_facts={num_facts}, num_distractors={num_distractors}, "
                         f"num_dev={num_dev}: need 0 < num_dev < num_facts and at most "
                         f"{len(VALUE_ADJECTIVES) * len(VALUE_NOUNS)} passages")
    rng = random.Random(seed)
    num_entities = -(-num_passages // num_attributes)
    taken = set(VALUE_ADJECTIVES + VALUE_NOUNS) | {
        word.lower() for template in PASSAGE_TEMPLATES + QUESTION_TEMPLATES
        for word in re.findall(r"\w+", template)}
    attributes = _made_up_words(rng, num_attributes, (2,), taken)
    entities = [word.capitalize() for word in _made_up_words(rng, num_entities, (2, 3), taken)]
    cells = [(entity, attribute) for entity in entities for attribute in attributes]
    cells = rng.sample(cells, num_passages)  # facts first, then distractors
    values = rng.sample([f"{adjective} {noun}" for adjective in VALUE_ADJECTIVES
                         for noun in VALUE_NOUNS], num_passages)
    order = rng.sample(range(num_passages), num_passages)  # passage row -> cell
    passages, questions = [None] * num_passages, []
    for row, cell_index in enumerate(order):
        (entity, attribute), value = cells[cell_index], values[cell_index]
        text = rng.choice(PASSAGE_TEMPLATES).format(attribute=attribute, entity=entity,
                                                    value=value)
        kind = "fact" if cell_index < num_facts else "distractor"
        passages[row] = {"id": f"p{row:04d}", "title": entity, "text": text,
                         "metadata": {"entity": entity, "attribute": attribute, "kind": kind}}
    for cell_index in range(num_facts):
        (entity, attribute), gold_row = cells[cell_index], order.index(cell_index)
        question = rng.choice(QUESTION_TEMPLATES).format(attribute=attribute, entity=entity)
        questions.append({"id": f"q{cell_index:04d}", "question": question,
                          "answers": [values[cell_index]],
                          "gold_ids": [passages[gold_row]["id"]]})
    for record in questions:
        found = answer_passage_ids(passages, record["answers"][0])
        if found != record["gold_ids"]:
            raise AssertionError(f"{record['id']}: answer {record['answers']} in {found}")
    tokenizer = WordTokenizer.from_texts([retriever_text(p["title"], p["text"]) for p in passages]
                                         + [q["question"] for q in questions])
    out_dir = fileio.prepare_output(out_dir, OUTPUT_KIND)
    _write_jsonl(out_dir / PASSAGES_FILE, passages)
    _write_jsonl(out_dir / QA_SPLIT_FILES["validation"], questions[:num_dev])
    _write_jsonl(out_dir / QA_SPLIT_FILES["train"], questions[num_dev:])
    manifest = {"arguments": {"seed": seed, "num_facts": num_facts,
                              "num_distractors": num_distractors,
                              "num_attributes": num_attributes, "num_dev": num_dev},
                "passages": num_passages, "train": num_facts - num_dev, "dev": num_dev,
                "entities": num_entities, "attributes": num_attributes,
                "vocabulary_size": len(tokenizer.words)}
    fileio.atomic_write_json(out_dir / MANIFEST_FILE, manifest)   # last: marks it complete
    return manifest


def train_synthetic_spiece(out_dir: str | Path, vocab_size: int = 256
                           ) -> seqio.SentencePieceVocabulary:
    """Trains the reader SentencePiece model on the folder's reader passages and questions
    (with the prompt words), written to `{out_dir}/spiece.model`. Every distinct word is also
    given as a text of its own, which makes each word one piece (on the sentences alone, the
    unigram trainer stops at ~190 pieces and splits "of" into "o" "f").

    Args:
      out_dir: a folder written by `generate_synthetic`.
      vocab_size: piece count before the 100 sentinels (an upper bound: ~170 are used).

    Returns:
      the reader vocabulary (T5 ids, sentinels checked).
    """
    passages, questions = read_synthetic(out_dir)
    texts = [reader_text(p["title"], p["text"]) for p in passages] + [
        f"question: {q['question']} answer: {q['answers'][0]}"
        for records in questions.values() for q in records]
    words = sorted({word for text in texts for word in re.findall(r"\w+", text)})
    return train_reader_spiece(texts + words, Path(out_dir) / SPIECE_FILE, vocab_size=vocab_size)


class WordEncoding(NamedTuple):  # like a `tokenizers.Encoding`
    ids: list[int]


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
    """Deterministic word-level tokenizer: lowercase, split on non-word characters; id 0 pad,
    1 unknown, 2 [CLS] (first of every text), the words from 3 on in `words` order."""
    words: tuple[str, ...]
    max_length: int = 32

    @classmethod
    def from_texts(cls, texts: Sequence[str], max_length: int = 32) -> WordTokenizer:
        """The tokenizer of every word in `texts` (sorted)."""
        return cls(tuple(sorted({w for text in texts for w in cls.split(text)})), max_length)

    @classmethod
    def from_synthetic_dir(cls, folder: str | Path, max_length: int = 32) -> WordTokenizer:
        """The tokenizer of a synthetic folder's passages (retriever text) and questions."""
        passages, questions = read_synthetic(folder)
        return cls.from_texts([retriever_text(p["title"], p["text"]) for p in passages] + [
            q["question"] for records in questions.values() for q in records], max_length)

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    def __len__(self) -> int:
        return len(self.words) + 3

    def __post_init__(self):
        object.__setattr__(self, "_ids", {word: i + 3 for i, word in enumerate(self.words)})

    def encode(self, text: str) -> list[int]:
        """[CLS] then word ids (unknown -> 1), truncated to `max_length`."""
        ids = [CLS_ID] + [self._ids.get(word, UNKNOWN_ID) for word in self.split(text)]
        return ids[:self.max_length]

    def encode_batch(self, texts: Sequence[str]) -> list[WordEncoding]:
        """`tokenizers`-style batch encoding (so `weights.Retriever(config, params, self)`
        tokenizes with it)."""
        return [WordEncoding(self.encode(text)) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> lowercase words joined by spaces (pad and [CLS] dropped, unknown "[UNK]")."""
        return " ".join("[UNK]" if i == UNKNOWN_ID else self.words[i - 3]
                        for i in map(int, ids) if i not in (PAD_ID, CLS_ID))

    def __call__(self, texts: Sequence[str], length: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (ids, mask) int32 (len(texts), length or max_length), padded with 0."""
        length = length or self.max_length
        ids = np.zeros((len(texts), length), np.int32)
        for row, text in enumerate(texts):
            encoded = self.encode(text)[:length]
            ids[row, :len(encoded)] = encoded
        return ids, (ids != PAD_ID).astype(np.int32)


def synthetic_retriever(tokenizer: WordTokenizer | str | Path, seed: int = 0, dim: int = 32,
                        layers: int = 1, heads: int = 2, shared_towers: bool = True,
                        architecture: str = "bert"
                        ) -> tuple[retriever_lib.RetrieverConfig, dict, WordTokenizer]:
    """A tiny dual encoder over `tokenizer`, randomly initialised from `seed` (its gold
    passages rank near chance: `initial_recall`): BERT towers, or with architecture 't5'
    T5-encoder towers (t5x_retrieval's GTR shape: mean pooling, projection to `dim`, no L2
    norm here so scores keep their scale).

    Args:
      tokenizer: a `WordTokenizer`, or a synthetic folder to build one from.
      seed: initialisation seed.
      dim, layers, heads: hidden size (mlp 4 x dim), layer count and attention heads.
      shared_towers: one encoder for queries and passages (else two, initialised apart).
      architecture: 'bert' or 't5'.

    Returns:
      (config, params, tokenizer); params is the unboxed DualEncoder tree ({"encoder": ...}),
      dropout is off, and `weights.Retriever(config, params, tokenizer)` wraps the three.
    """
    if not isinstance(tokenizer, WordTokenizer):
        tokenizer = WordTokenizer.from_synthetic_dir(tokenizer)
    config = retriever_lib.RetrieverConfig(
        vocab_size=len(tokenizer), hidden_size=dim, num_layers=layers, num_heads=heads,
        mlp_dim=4 * dim, max_position_embeddings=tokenizer.max_length, dropout_rate=0.0,
        shared_towers=shared_towers, max_length=tokenizer.max_length,
        architecture=architecture, head_dim=dim // heads, projection_dim=dim)
    ids = jnp.ones((1, 4), jnp.int32)
    params = stacking.init_params(retriever_lib.DualEncoder, config, jax.random.key(seed),
                                  ids, ids, ids, ids)
    return config, jax.tree.map(np.asarray, params), tokenizer


def initial_recall(config: retriever_lib.RetrieverConfig, params: dict,
                   tokenizer: WordTokenizer, synthetic_dir: str | Path, split: str = "validation",
                   k: int = 5) -> float:
    """Retrieval recall@k of a dual encoder on a synthetic split: exact inner-product search
    of each question's query embedding over every passage's passage-tower embedding.

    Args:
      config, params, tokenizer: as `synthetic_retriever` returns them.
      synthetic_dir: the generated folder.
      split: "train" or "validation".
      k: passages retrieved per question.

    Returns:
      the fraction of questions whose gold passage is in the top k (chance: k / passages).
    """
    passages, questions = read_synthetic(synthetic_dir)
    questions = questions[split]
    model = retriever_lib.DualEncoder(config)
    embed = jax.jit(model.apply, static_argnames="method")
    passage_embeddings = embed({"params": params}, *map(jnp.asarray, tokenizer(
        [retriever_text(p["title"], p["text"]) for p in passages])), method="embed_passages")
    query_embeddings = embed({"params": params}, *map(jnp.asarray, tokenizer(
        [q["question"] for q in questions])), method="embed_queries")
    scores = np.asarray(query_embeddings @ passage_embeddings.T)  # (questions, passages)
    top_rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    retrieved_ids = [[passages[row]["id"] for row in rows] for rows in top_rows]
    return evaluation.recall_at_k(retrieved_ids, [q["gold_ids"] for q in questions], k)


@gin.configurable
def build_synthetic_retriever(synthetic_dir: str = gin.REQUIRED, seed: int = 0, dim: int = 32,
                              layers: int = 1, heads: int = 2, shared_towers: bool = True,
                              architecture: str = "bert") -> Any:
    """`synthetic_retriever` over the folder's word tokenizer, as a `weights.Retriever` (the
    trainer's `TrainConfig.retriever_builder` in gin/runs/synthetic.gin)."""
    from atlas_jax import weights
    config, params, tokenizer = synthetic_retriever(synthetic_dir, seed=seed, dim=dim,
                                                    layers=layers, heads=heads,
                                                    shared_towers=shared_towers,
                                                    architecture=architecture)
    return weights.Retriever(config, jax.tree.map(jnp.asarray, params), tokenizer)


@gin.configurable
def register_synthetic_tasks(synthetic_dir: str | None = None, seed: int = 0,
                             generate: bool = True, num_facts: int = 200,
                             num_distractors: int = 200, num_dev: int = 50, spiece_vocab_size: int = 256,
                             vocabulary: seqio.Vocabulary | None = None,
                             task_name: str = "synthetic_qa") -> list[str]:
    """Registers `synthetic_qa` (splits train, validation; features also carry gold_ids)
    over `synthetic_dir`, first generating the folder (`generate_synthetic` with `seed` and
    default sizes) and its reader SentencePiece model when they are missing.

    Args:
      synthetic_dir: the folder (gin macro `SYNTHETIC_DIR`); None registers nothing.
      seed: generation seed; a folder generated with another seed (or sizes) is an error.
      num_facts, num_distractors, num_dev: sizes, as `generate_synthetic` takes them.
      generate: generate what is missing (else a missing folder is an error).
      spiece_vocab_size: reader SentencePiece size when it is trained here.
      vocabulary: reader vocabulary (default: the folder's `spiece.model`).
      task_name: the task name.

    Returns:
      the registered task names.

    Raises:
      FileNotFoundError: `generate` is off and the folder is missing.
      ValueError: the folder holds another seed or sizes (never overwritten: seqio caches a
      vocabulary by file path, so a rewritten `spiece.model` would go unnoticed).
    """
    if synthetic_dir is None:
        return []
    folder = Path(synthetic_dir)
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        found = json.loads(manifest.read_text())["arguments"]
        asked = {"seed": seed, "num_facts": num_facts, "num_distractors": num_distractors,
                 "num_dev": num_dev}
        if {key: found.get(key) for key in asked} != asked:
            raise ValueError(f"{manifest}: generated with "
                             f"{ {key: found.get(key) for key in asked} }, asked for {asked} "
                             "(gin: register_synthetic_tasks.*); use another SYNTHETIC_DIR")
    elif generate:
        generate_synthetic(folder, seed=seed, num_facts=num_facts,
                           num_distractors=num_distractors, num_dev=num_dev)
    else:
        raise FileNotFoundError(f"{manifest}: not found (gin: register_synthetic_tasks."
                                f"synthetic_dir = {str(synthetic_dir)!r}); set generate=True")
    if vocabulary is None:
        if not (folder / SPIECE_FILE).is_file():
            train_synthetic_spiece(folder, spiece_vocab_size)
        vocabulary = reader_vocabulary(str(folder / SPIECE_FILE))
    splits = {split: str(folder / name) for split, name in QA_SPLIT_FILES.items()}
    register_qa_task(task_name, splits, vocabulary=vocabulary, random_answer=False,
                     extra_fields=SYNTHETIC_QA_FIELDS)
    return [task_name]

"""Batches of the reader pre-training (`tasks/reader_corpus.py` says what the objectives are).

Every batch is a function of (seed, step) alone, so a resumed run reads what an
uninterrupted run would have read. Two arrays per step:

  reading   inputs (B, K, L): `"question: {q} answer: <extra_id_0>"` + each passage's
            `"title: {t} context: {p}"` + EOS, the source entry at a random position among
            K - 1 distractors; targets (B, T): `<extra_id_0> {answer}` + EOS
            (a `read` probe with probability `read_fraction`, else a `salient` masked entry)
  lm        inputs (B', 1, L'), targets (B', T'): span corruption, cued copy or prefix LM of
            an entry

    corpus = TokenizedCorpus.build([records, ...], vocabulary, seed)
    batch = corpus.batch(step, seed, sizes)
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import numpy as np

from atlas_jax_tasks import reader_corpus

EOS_ID = 1
SENTINEL = reader_corpus.SENTINEL


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    batch_size: int = 24          # reading examples per step
    n_passages: int = 4           # passages per reading example (the source among them)
    input_length: int = 128       # tokens per passage row (question + passage + EOS)
    target_length: int = 24
    lm_batch_size: int = 16       # span-corruption / prefix-LM examples per step
    lm_input_length: int = 96
    lm_target_length: int = 48
    read_fraction: float = 0.7    # reading rows that are probes (the rest salient)
    span_fraction: float = 0.5    # lm rows that are span corruption
    copy_fraction: float = 0.0    # lm rows that are cued copies (the rest prefix LM)
    # Curriculum: a FiD reader learns to copy from one passage in a few hundred steps, but
    # does not learn it at all when every example has distractors from the start (measured
    # on the synthetic task and on ledgers). Until `alone_steps` the source is alone (the
    # other rows empty); then the share of examples with all n_passages - 1 distractors
    # rises linearly to `full_fraction` over `ramp_steps`; the others draw 0..K-1.
    alone_steps: int = 0
    ramp_steps: int = 0
    full_fraction: float = 1.0
    # Easy distractors (another day and payee: `Distractors.sample(easy=True)`): every
    # example's until `easy_steps` (after `alone_steps`), then a share `easy_fraction`. The
    # synthetic reader learnt to select only through such a stage (docs/reader.md).
    easy_steps: int = 0
    easy_fraction: float = 0.0

    def distractors(self, step: int, rng: random.Random) -> int:
        """The number of distractors of one reading example at `step`."""
        if step < self.alone_steps:
            return 0
        progress = min(1.0, (step - self.alone_steps + 1) / max(self.ramp_steps, 1))
        if rng.random() < self.full_fraction * progress:
            return self.n_passages - 1
        return rng.randrange(self.n_passages)

    def easy(self, step: int, rng: random.Random) -> bool:
        """Whether one reading example at `step` draws easy distractors (no random draw
        when `easy_steps` and `easy_fraction` are 0: older runs read the same batches)."""
        if step < self.alone_steps:
            return False
        if step < self.alone_steps + self.easy_steps:
            return True
        return self.easy_fraction > 0 and rng.random() < self.easy_fraction


@dataclasses.dataclass
class Pool:
    """Examples of one kind over all ledgers: (ledger, source row), question and answer
    tokens, field name."""
    ledger: np.ndarray
    source: np.ndarray
    questions: list[np.ndarray]
    answers: list[np.ndarray]
    fields: list[str]

    def __len__(self) -> int:
        return len(self.fields)


def _encode(vocabulary, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(vocabulary.encode(t), np.int32) for t in texts]


class TokenizedCorpus:
    """Pre-tokenized passages, reading pools and distractor tables of several ledgers."""

    def __init__(self, passages: list[list[np.ndarray]], texts: list[list[np.ndarray]],
                 distractors: list[reader_corpus.Distractors], pools: dict[str, Pool],
                 vocabulary):
        self.passages, self.texts, self.distractors = passages, texts, distractors
        self.pools, self.vocabulary = pools, vocabulary
        self.redated: "TokenizedCorpus | None" = None   # the same ledger re-dated (held-out)
        self.prompt_tail = np.asarray(vocabulary.encode(f"answer: {SENTINEL}"), np.int32)
        self.question_head = np.asarray(vocabulary.encode("question:"), np.int32)
        self.target_head = np.asarray(vocabulary.encode(SENTINEL), np.int32)
        self.sentinels = [int(vocabulary.encode(f"<extra_id_{i}>")[-1]) for i in range(100)]
        self.copy_head = np.asarray(vocabulary.encode("copy after:"), np.int32)
        self.copy_tail = np.asarray(vocabulary.encode("text:"), np.int32)

    @classmethod
    def build(cls, ledgers: Sequence[Sequence[dict]], vocabulary, seed: int = 0,
              max_question_tokens: int = 72) -> "TokenizedCorpus":
        """Tokenizes every ledger's passages and examples; examples whose question is
        longer than `max_question_tokens` (long masked entries) are left out."""
        from atlas_jax.index.passages import reader_text
        rng = random.Random(seed)
        passages, texts, distractors = [], [], []
        pools = {kind: Pool(np.zeros(0, np.int32), np.zeros(0, np.int32), [], [], [])
                 for kind in ("read", "salient")}
        for number, records in enumerate(ledgers):
            passages.append(_encode(vocabulary, [reader_text(r["title"], r["text"])
                                                 for r in records]))
            texts.append(_encode(vocabulary, [r["text"] for r in records]))
            distractors.append(reader_corpus.Distractors(records))
            for kind, pool in pools.items():
                examples = reader_corpus.reading_examples(records, rng, kind)
                questions = _encode(vocabulary, [e.question for e in examples])
                kept = [i for i, q in enumerate(questions) if len(q) <= max_question_tokens]
                examples = [examples[i] for i in kept]
                pool.ledger = np.concatenate([pool.ledger, np.full(len(examples), number,
                                                                   np.int32)])
                pool.source = np.concatenate([pool.source, np.asarray(
                    [e.source for e in examples], np.int32)])
                pool.questions += [questions[i] for i in kept]
                pool.answers += _encode(vocabulary, [e.answer for e in examples])
                pool.fields += [e.field for e in examples]
        return cls(passages, texts, distractors, pools, vocabulary)

    # ------------------------------------------------------------------ reading rows

    def prompt(self, question: np.ndarray) -> np.ndarray:
        return np.concatenate([self.question_head, question, self.prompt_tail])

    def reading_row(self, pool: Pool, index: int, n_passages: int, length: int,
                    rng: random.Random, distractors: int | None = None, easy: bool = False
                    ) -> tuple[np.ndarray, int]:
        """(K, L) reader inputs of one example and the source's position: the source among
        `distractors` others (default n_passages - 1; hard ones, or `easy` ones); the rows
        past them stay empty."""
        ledger, source = int(pool.ledger[index]), int(pool.source[index])
        count = n_passages - 1 if distractors is None else distractors
        others = self.distractors[ledger].sample(source, count, rng, easy) if count else []
        position = rng.randrange(len(others) + 1)
        rows = others[:position] + [source] + others[position:]
        prompt = self.prompt(pool.questions[index])
        out = np.zeros((n_passages, length), np.int32)
        for k, row in enumerate(rows):
            tokens = np.concatenate([prompt, self.passages[ledger][row]])[:length - 1]
            out[k, :len(tokens)] = tokens
            out[k, len(tokens)] = EOS_ID
        return out, position

    def target(self, answer: np.ndarray, length: int) -> np.ndarray:
        tokens = np.concatenate([self.target_head, answer])[:length - 1]
        out = np.zeros(length, np.int32)
        out[:len(tokens)] = tokens
        out[len(tokens)] = EOS_ID
        return out

    # ------------------------------------------------------------------ lm rows

    def span_corruption(self, tokens: np.ndarray, input_length: int, target_length: int,
                        rng: np.random.Generator, density: float = 0.15,
                        mean_span: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
        """T5's span corruption of `tokens` (noise spans at random boundaries, each replaced
        by one sentinel in the inputs and listed after it in the targets)."""
        tokens = tokens[:input_length - 1]
        n = len(tokens)
        noise = max(1, min(n - 1, round(n * density)))
        spans = max(1, round(noise / mean_span))
        noise_lengths = _random_split(noise, spans, rng)
        keep_lengths = _random_split(n - noise, spans, rng)
        inputs, targets, position = [], [], 0
        for i, (keep, drop) in enumerate(zip(keep_lengths, noise_lengths)):
            inputs += list(tokens[position:position + keep]) + [self.sentinels[i]]
            position += keep
            targets += [self.sentinels[i]] + list(tokens[position:position + drop])
            position += drop
        return (_padded(inputs, input_length), _padded(targets, target_length))

    def prefix_lm(self, tokens: np.ndarray, input_length: int, target_length: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The entry's first tokens (a random split, at least one token each side, the rest
        fitting the targets) -> the rest."""
        tokens = tokens[:input_length + target_length - 2]
        split = max(int(rng.integers(1, max(2, len(tokens)))), len(tokens) - target_length + 1)
        return (_padded(list(tokens[:split]), input_length),
                _padded(list(tokens[split:]), target_length))

    def cued_copy(self, tokens: np.ndarray, input_length: int, target_length: int,
                  rng: np.random.Generator, cue: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """`copy after: {cue} text: {entry}` -> the entry's tokens that follow the cue.

        The cue is `cue` consecutive tokens at a random position of the entry (None: half
        the rows 4 tokens, half none, the copy then starting at the entry's first token);
        the target is what follows them, copied. Every target token is in the input, right
        after the one copied before it: the induction step that copying an amount needs,
        trained on every token of the target instead of on a few answer tokens."""
        if cue is None:
            cue = 4 if rng.random() < 0.5 else 0
        room = input_length - 1 - len(self.copy_head) - len(self.copy_tail) - cue
        tokens = tokens[:room]
        start = int(rng.integers(0, max(1, len(tokens) - cue - 1))) if cue else 0
        inputs = np.concatenate([self.copy_head, tokens[start:start + cue], self.copy_tail,
                                 tokens])
        return (_padded(list(inputs), input_length),
                _padded(list(tokens[start + cue:]), target_length))

    # ------------------------------------------------------------------ batches

    def batch(self, step: int, seed: int, sizes: BatchSizes) -> dict[str, np.ndarray]:
        """The batch of `step` (a function of (seed, step) alone)."""
        rng_np = np.random.default_rng([seed, step])
        rng = random.Random(int(rng_np.integers(2 ** 62)))
        inputs = np.zeros((sizes.batch_size, sizes.n_passages, sizes.input_length), np.int32)
        targets = np.zeros((sizes.batch_size, sizes.target_length), np.int32)
        for b in range(sizes.batch_size):
            pool = self.pools["read" if rng.random() < sizes.read_fraction else "salient"]
            index = rng.randrange(len(pool))
            count = sizes.distractors(step, rng)
            inputs[b], _ = self.reading_row(pool, index, sizes.n_passages,
                                            sizes.input_length, rng, count,
                                            bool(count) and sizes.easy(step, rng))
            targets[b] = self.target(pool.answers[index], sizes.target_length)
        lm_inputs = np.zeros((sizes.lm_batch_size, 1, sizes.lm_input_length), np.int32)
        lm_targets = np.zeros((sizes.lm_batch_size, sizes.lm_target_length), np.int32)
        for b in range(sizes.lm_batch_size):
            ledger = rng.randrange(len(self.texts))
            tokens = self.texts[ledger][rng.randrange(len(self.texts[ledger]))]
            draw = rng.random()
            make = (self.span_corruption if draw < sizes.span_fraction
                    else self.cued_copy if draw < sizes.span_fraction + sizes.copy_fraction
                    else self.prefix_lm)
            lm_inputs[b, 0], lm_targets[b] = make(tokens, sizes.lm_input_length,
                                                  sizes.lm_target_length, rng_np)
        return {"inputs": inputs, "targets": targets, "lm_inputs": lm_inputs,
                "lm_targets": lm_targets}


def _random_split(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """`total` split into `parts` positive lengths at random (zeros allowed if total < parts)."""
    if total < parts:
        return [1] * total + [0] * (parts - total)
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 \
        else np.zeros(0, int)
    edges = np.concatenate([[0], cuts, [total]])
    return list(np.diff(edges).astype(int))


def _padded(tokens: list[int], length: int) -> np.ndarray:
    tokens = list(tokens)[:length - 1] + [EOS_ID]
    out = np.zeros(length, np.int32)
    out[:len(tokens)] = tokens
    return out

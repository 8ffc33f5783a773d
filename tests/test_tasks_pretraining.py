"""Pretraining tasks: T5 span corruption keeps the sentinel structure and reconstructs the
passage, noise density 0.15; prefix LM splits at half; passage ids survive splitting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import seqio

from atlas_jax_tasks import preprocessors, pretraining
from tests.test_tasks_vocab import make_vocabulary

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()
LENGTHS = {"inputs": 96, "targets": 40}


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    return make_vocabulary(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def passages_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    passages = [{"id": f"p{i}", "title": f"T{i}", "text": " ".join(rng.choice(WORDS, 30))}
                for i in range(12)]
    passages.append({"id": "long", "title": "", "text": " ".join(rng.choice(WORDS, 150))})
    path = tmp_path_factory.mktemp("passages") / "passages.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in passages))
    return path, {p["id"]: f"{p['title']} {p['text']}".strip() for p in passages}


def strip_eos(ids, vocabulary):
    ids = ids.tolist()
    assert ids[-1] == vocabulary.eos_id
    return ids[:-1]


def split_at_sentinels(ids, first_sentinel):
    """[a, S0, b, S1] -> pieces between sentinels and the sentinels in order."""
    pieces, sentinels, current = [], [], []
    for token in ids:
        if token >= first_sentinel:
            pieces.append(current)
            sentinels.append(token)
            current = []
        else:
            current.append(token)
    pieces.append(current)
    return pieces, sentinels


def test_span_corruption_sentinel_structure_and_density(passages_file, vocabulary):
    path, texts = passages_file
    task = pretraining.register_span_corruption_task("test_span_corruption",
                                                     {"train": str(path)}, vocabulary)
    examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False, seed=3)
                    .as_numpy_iterator())
    extra_id_0 = vocabulary.vocab_size - 1
    first_sentinel = vocabulary.vocab_size - 100
    reconstructed: dict[str, list[int]] = {}
    noise_tokens = total_tokens = 0
    for example in examples:
        inputs = strip_eos(example["inputs"], vocabulary)
        targets = strip_eos(example["targets"], vocabulary)
        assert len(example["inputs"]) <= LENGTHS["inputs"]
        assert len(example["targets"]) <= LENGTHS["targets"]
        kept, input_sentinels = split_at_sentinels(inputs, first_sentinel)
        masked, target_sentinels = split_at_sentinels(targets, first_sentinel)
        spans = len(input_sentinels)
        # inputs: kept0 <extra_id_0> kept1 <extra_id_1> ...; targets: <extra_id_0> span0 ...
        assert input_sentinels == [extra_id_0 - k for k in range(spans)]
        assert target_sentinels == input_sentinels
        assert masked[0] == [] and kept[-1] == []
        assert all(kept[:-1]) and all(masked[1:])  # no empty span
        tokens = [t for k, m in zip(kept[:-1], masked[1:]) for t in k + m]
        # T5's counts: round(n * 0.15) noise tokens in round(noise / 3) spans.
        noise = sum(len(m) for m in masked)
        assert noise == max(1, round(len(tokens) * 0.15))
        assert spans == max(1, round(noise / 3))
        noise_tokens, total_tokens = noise_tokens + noise, total_tokens + len(tokens)
        reconstructed.setdefault(example["passage_id"].decode(), []).extend(tokens)
        assert "<extra_id_0>" in example["query"].decode()
    assert abs(noise_tokens / total_tokens - 0.15) < 0.01
    # Concatenating the segments of each passage gives back its tokens.
    assert set(reconstructed) == set(texts)
    for passage_id, tokens in reconstructed.items():
        assert tokens == list(vocabulary.encode(texts[passage_id])), passage_id
    assert sum(e["passage_id"] == b"long" for e in examples) > 1  # split into segments


def test_span_corruption_through_feature_converter_is_seeded(passages_file, vocabulary):
    path, _ = passages_file
    task = pretraining.register_span_corruption_task("test_span_corruption_seeded",
                                                     {"train": str(path)}, vocabulary)

    def converted(seed):
        dataset = task.get_dataset(LENGTHS, split="train", shuffle=False, seed=seed)
        return list(seqio.EncDecFeatureConverter(pack=False)(dataset, LENGTHS)
                    .as_numpy_iterator())

    first, again, other = converted(5), converted(5), converted(6)
    assert all((a["encoder_input_tokens"] == b["encoder_input_tokens"]).all()
               for a, b in zip(first, again))
    assert any((a["encoder_input_tokens"] != b["encoder_input_tokens"]).any()
               for a, b in zip(first, other))
    row = first[0]
    assert row["encoder_input_tokens"].shape == (96,)
    assert row["decoder_target_tokens"].shape == (40,)
    assert vocabulary.decode(row["decoder_target_tokens"]).startswith("<extra_id_0>")
    assert "<extra_id_0>" in vocabulary.decode(row["encoder_input_tokens"])


def test_prefix_lm_splits_passages_in_half(passages_file, vocabulary):
    path, texts = passages_file
    task = pretraining.register_prefix_lm_task("test_prefix_lm", {"train": str(path)},
                                               vocabulary)
    examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False)
                    .as_numpy_iterator())
    joined: dict[str, list[int]] = {}
    for example in examples:
        inputs = strip_eos(example["inputs"], vocabulary)
        targets = strip_eos(example["targets"], vocabulary)
        assert len(inputs) == round((len(inputs) + len(targets)) * 0.5)
        assert example["query"].decode() == vocabulary.decode(inputs).strip()
        joined.setdefault(example["passage_id"].decode(), []).extend(inputs + targets)
    assert set(joined) == set(texts)
    for passage_id, tokens in joined.items():
        assert tokens == list(vocabulary.encode(texts[passage_id]))
    assert sum(e["passage_id"] == b"long" for e in examples) > 1


def test_span_corruption_lengths_match_t5():
    # T5's random_spans_helper for inputs_length 512 (noise 0.15, mean span 3): 568 / 114.
    assert preprocessors.span_corruption_lengths(512) == (568, 114)
    tokens_length, targets_length = preprocessors.span_corruption_lengths(96, targets_length=12)
    assert targets_length <= 12 and tokens_length < 96

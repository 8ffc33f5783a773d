"""SeqIO preprocessors shared by the tasks: T5 span corruption, prefix LM, and helpers.

Span corruption follows T5 (`t5.data.preprocessors`, Raffel et al. 2020) step for step:
`random_spans_noise_mask` (noise and non-noise span lengths from random segmentations,
alternating non-noise first), `noise_span_to_unique_sentinel` for the inputs and
`nonnoise_span_to_unique_sentinel` for the targets, sentinels counted down from the last id
(`<extra_id_0>` = vocab_size - 1). Unlike T5's pretraining mixture, passages are never
concatenated: every example keeps its source `passage_id`, so retrieval can exclude it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import seqio
import tensorflow as tf

MAX_TOKENS = 65536  # segment length when no sequence length is given (T5's select_random_chunk)


def _to_int(x):
    return tf.cast(x, tf.int32)


def _to_float(x):
    return tf.cast(x, tf.float32)


def random_spans_noise_mask(length: tf.Tensor, noise_density: float, seeds: tf.Tensor,
                            mean_noise_span_length: float = 3.0) -> tf.Tensor:
    """T5's noise mask of random spans.

    num_noise_tokens = round(length * noise_density) (at least 1, at most length - 1);
    num_noise_spans = num_nonnoise_spans = max(1, round(num_noise_tokens / mean length)).
    Spans alternate non-noise, noise, ..., starting with non-noise; all such masks are
    equally likely.

    Args:
      length: int32 scalar, the token count.
      noise_density: fraction of tokens to mask.
      seeds: (2, 2) int32 stateless seeds.
      mean_noise_span_length: mean length of a masked span.

    Returns:
      (length,) bool, True on noise tokens.
    """
    if noise_density == 0.0:
        return tf.zeros([length], tf.bool)
    original_length = length
    length = tf.maximum(length, 2)  # avoid degenerate masks
    num_noise_tokens = _to_int(tf.round(_to_float(length) * noise_density))
    num_noise_tokens = tf.minimum(tf.maximum(num_noise_tokens, 1), length - 1)
    num_noise_spans = tf.maximum(
        _to_int(tf.round(_to_float(num_noise_tokens) / mean_noise_span_length)), 1)
    num_nonnoise_tokens = length - num_noise_tokens

    def random_segmentation(num_items, num_segments, seed):
        # (num_segments,) positive lengths summing to num_items: shuffle num_segments - 1
        # "segment starts here" flags among the num_items - 1 gaps.
        first_in_segment = tf.pad(
            seqio.stateless_shuffle(_to_int(tf.range(num_items - 1) < num_segments - 1),
                                    seed), [[1, 0]])
        segment_id = tf.cumsum(first_in_segment)
        return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)

    noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans, seeds[0])
    nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans, seeds[1])
    interleaved_span_lengths = tf.reshape(
        tf.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2])
    span_starts = tf.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = tf.math.unsorted_segment_sum(
        tf.ones_like(span_starts), span_starts, length)
    span_number = tf.cumsum(span_start_indicator)
    is_noise = tf.equal(span_number % 2, 1)
    return is_noise[:original_length]


def noise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                  vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """Replaces each run of noise tokens by one sentinel: `<extra_id_0>` (the last id) for
    the first run, `<extra_id_1>` for the second, ...

    Args:
      tokens: (length,) int token ids.
      noise_mask: (length,) bool.
      vocabulary: its `vocab_size - 1` is `<extra_id_0>`.

    Returns:
      (new_length,) ids, same dtype.
    """
    previous_token_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise_tokens = tf.logical_and(noise_mask, tf.logical_not(previous_token_is_noise))
    subsequent_noise_tokens = tf.logical_and(noise_mask, previous_token_is_noise)
    # The k-th run (k = 1, 2, ...) gets id vocab_size - k, i.e. <extra_id_{k-1}>.
    sentinel = vocabulary.vocab_size - tf.cumsum(tf.cast(first_noise_tokens, tokens.dtype))
    tokens = tf.where(first_noise_tokens, sentinel, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(subsequent_noise_tokens))


def nonnoise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                     vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """The targets of span corruption: noise spans kept, each run of non-noise tokens
    replaced by the next sentinel (`<extra_id_0> span0 <extra_id_1> span1 ...`)."""
    return noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask), vocabulary)


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0,
                            targets_length: int | None = None) -> tuple[int, int]:
    """T5's `random_spans_helper`: the longest token segment whose corrupted inputs (and,
    when `targets_length` is given, targets) fit, EOS included.

    Returns:
      (tokens_length, targets_length needed for that segment).
    """
    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        # inputs: non-noise tokens + one sentinel per span + EOS; targets: noise + same.
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    def fits(tokens_length):
        needed_inputs, needed_targets = lengths(tokens_length)
        return needed_inputs <= inputs_length and (
            targets_length is None or needed_targets <= targets_length)

    tokens_length = 1
    while fits(tokens_length + 1) and tokens_length < MAX_TOKENS:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                 feature_key: str = "targets", min_tokens_per_segment: int = 1
                 ) -> tf.data.Dataset:
    """Splits `feature_key` into consecutive segments of at most `max_tokens_per_segment`
    tokens, one example each; the other features are copied to every segment. Segments
    shorter than `min_tokens_per_segment` are dropped."""
    segment = max_tokens_per_segment

    def to_segments(features):
        tokens = features[feature_key]
        length = tf.size(tokens)
        num_segments = tf.maximum((length + segment - 1) // segment, 1)
        padded = tf.pad(tokens, [[0, num_segments * segment - length]])
        starts = tf.range(num_segments) * segment
        others = {key: tf.repeat(tf.expand_dims(value, 0), num_segments, axis=0)
                  for key, value in features.items() if key != feature_key}
        return tf.data.Dataset.from_tensor_slices({
            **others,
            feature_key: tf.reshape(padded, [num_segments, segment]),  # (segments, segment)
            "_segment_length": tf.minimum(starts + segment, length) - starts,  # (segments,)
        })

    def trim(features):
        features = dict(features)
        length = features.pop("_segment_length")
        features[feature_key] = features[feature_key][:length]
        return features

    def long_enough(features):
        return tf.size(features[feature_key]) >= min_tokens_per_segment

    return dataset.flat_map(to_segments).map(trim).filter(long_enough)


def _decode_query(features: dict, vocabulary: seqio.Vocabulary, query_key: str | None
                  ) -> dict:
    if query_key:
        features[query_key] = tf.strings.strip(vocabulary.decode_tf(features["inputs"]))
    return features


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                    output_features: Mapping[str, seqio.Feature], noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0,
                    passthrough_keys: Sequence[str] = ("passage_id",),
                    query_key: str | None = "query") -> tf.data.Dataset:
    """T5 span corruption of the tokenized `targets`, one passage per example.

    Long passages are split into segments whose corrupted inputs fit
    `sequence_length["inputs"]` (and whose targets fit `sequence_length["targets"]`).

    Args:
      dataset: examples with tokenized `targets` (the passage) and `passthrough_keys`.
      sequence_length: task feature lengths, or None (no splitting).
      output_features: the task's features (vocabulary of `targets`).
      noise_density, mean_noise_span_length: T5's 0.15 and 3.
      passthrough_keys: features copied to the output (the source `passage_id`).
      query_key: if set, the decoded inputs (with `<extra_id_N>` text) as the retriever query.

    Returns:
      examples {inputs, targets, *passthrough_keys, query_key}, without EOS.
    """
    vocabulary = output_features["targets"].vocabulary
    if sequence_length and sequence_length.get("inputs"):
        tokens_length, _ = span_corruption_lengths(
            sequence_length["inputs"], noise_density, mean_noise_span_length,
            sequence_length.get("targets"))
    else:
        tokens_length = MAX_TOKENS
    dataset = split_tokens(dataset, tokens_length, min_tokens_per_segment=2)

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(features, seed):
        seeds = tf.random.experimental.stateless_split(seed, 2)  # (2, 2)
        tokens = features["targets"]
        noise_mask = random_spans_noise_mask(tf.size(tokens), noise_density, seeds,
                                             mean_noise_span_length)
        corrupted = {
            "inputs": noise_span_to_unique_sentinel(tokens, noise_mask, vocabulary),
            "targets": nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocabulary),
            **{key: features[key] for key in passthrough_keys},
        }
        return _decode_query(corrupted, vocabulary, query_key)

    return corrupt(dataset)


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
              output_features: Mapping[str, seqio.Feature], split_ratio: float = 0.5,
              passthrough_keys: Sequence[str] = ("passage_id",),
              query_key: str | None = "query") -> tf.data.Dataset:
    """Prefix LM (Atlas's `lm` objective): the first `split_ratio` of a passage's tokens are
    the inputs, the rest the targets.

    Long passages are split into segments whose two parts fit the sequence lengths (EOS
    included). The split point is round(n * split_ratio), kept in [1, n - 1].

    Returns:
      examples {inputs, targets, *passthrough_keys, query_key (the decoded prefix)}.
    """
    if not 0.0 < split_ratio < 1.0:
        raise ValueError(f"prefix_lm split_ratio must be in (0, 1), got {split_ratio}")
    vocabulary = output_features["targets"].vocabulary
    tokens_length = MAX_TOKENS
    if sequence_length and sequence_length.get("inputs"):
        tokens_length = int((sequence_length["inputs"] - 1) / split_ratio)
        if sequence_length.get("targets"):
            tokens_length = min(tokens_length,
                                int((sequence_length["targets"] - 1) / (1.0 - split_ratio)))
    dataset = split_tokens(dataset, max(tokens_length, 2), min_tokens_per_segment=2)

    def split(features):
        tokens = features["targets"]
        length = tf.size(tokens)
        split_point = _to_int(tf.round(_to_float(length) * split_ratio))
        split_point = tf.clip_by_value(split_point, 1, length - 1)
        result = {"inputs": tokens[:split_point], "targets": tokens[split_point:],
                  **{key: features[key] for key in passthrough_keys}}
        return _decode_query(result, vocabulary, query_key)

    return dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE)


def rekey_passage(dataset: tf.data.Dataset, with_title: bool = True) -> tf.data.Dataset:
    """Passage records {id, title, text} -> {targets: "{title} {text}", passage_id: id}."""
    def rekey(features):
        text = features["text"]
        if with_title:
            text = tf.strings.strip(tf.strings.join([features["title"], text], separator=" "))
        return {"targets": text, "passage_id": features["id"]}
    return dataset.map(rekey, num_parallel_calls=tf.data.AUTOTUNE)

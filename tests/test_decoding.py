"""KV-cached decoding: cached steps equal teacher forcing; beam search finds the best."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from atlas_jax.models import decoding, fid, t5

CONFIG = t5.T5Config(vocab_size=5, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                     num_encoder_layers=1, num_decoder_layers=2, dropout_rate=0.0)


def _setup(seed=0):
    model = fid.FusionInDecoder(CONFIG)
    params = meta.unbox(model.init(jax.random.key(seed), jnp.ones((1, 2, 6), jnp.int32),
                                   jnp.ones((1, 3), jnp.int32))["params"])
    ids = np.array([[[2, 3, 4, 3, 0, 0], [4, 4, 2, 0, 0, 0]],
                    [[3, 2, 2, 4, 4, 3], [2, 0, 0, 0, 0, 0]]], np.int32)
    encoded, mask = model.apply({"params": params}, ids, method=model.encode_passages)
    return model, params, ids, encoded, mask


def _prefix_logprob(model, params, ids, prefix):
    """Teacher-forced log-probability of `prefix` (no start token) for both examples."""
    targets = jnp.asarray([prefix, prefix], jnp.int32)
    logits = model.apply({"params": params}, ids, t5.shift_right(targets))
    logp = jax.nn.log_softmax(logits)
    return np.asarray(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0].sum(-1))


def test_greedy_tokens_are_teacher_forced_argmax():
    model, params, ids, encoded, mask = _setup()
    tokens = np.asarray(decoding.generate(model, params, encoded, mask, max_length=6))
    logits = model.apply({"params": params}, ids, t5.shift_right(jnp.asarray(tokens)))
    for b in range(2):
        for i, token in enumerate(tokens[b]):
            if token == 0 and i and tokens[b, i - 1] in (0, 1):
                break  # after EOS
            assert token == int(jnp.argmax(logits[b, i]))


def test_beam_search_is_exhaustive_with_a_wide_beam():
    """With beam >= vocab^(max_length-1) nothing is pruned, so beam search (alpha 0) must
    return the most likely EOS-terminated sequence, which brute force finds."""
    model, params, ids, encoded, mask = _setup(seed=1)
    max_length = 3
    sequences, scores = decoding.generate(model, params, encoded, mask, max_length,
                                          beam_size=25, alpha=0.0)
    best = {b: (-np.inf, None) for b in range(2)}
    for length in range(1, max_length + 1):
        for prefix in itertools.product(range(CONFIG.vocab_size), repeat=length - 1):
            if CONFIG.eos_id in prefix:
                continue
            seq = list(prefix) + [CONFIG.eos_id] + [0] * (max_length - length)
            logp = _prefix_logprob(model, params, ids, seq[:length])
            for b in range(2):
                if logp[b] > best[b][0]:
                    best[b] = (logp[b], seq)
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(sequences[b, 0]), best[b][1])
        np.testing.assert_allclose(float(scores[b, 0]), best[b][0], atol=1e-4)
    # beams come sorted by score
    assert bool(jnp.all(scores[:, :-1] >= scores[:, 1:]))


def test_beam_scores_apply_the_length_penalty():
    model, params, ids, encoded, mask = _setup(seed=2)
    sequences, scores = decoding.generate(model, params, encoded, mask, 4, beam_size=4,
                                          alpha=0.6)
    for b in range(2):
        seq = np.asarray(sequences[b, 0])
        length = int(np.argmax(seq == 1)) + 1 if (seq == 1).any() else len(seq)
        logp = _prefix_logprob(model, params, ids, list(seq[:length]))[b]
        expected = logp / ((5.0 + length) / 6.0) ** 0.6
        np.testing.assert_allclose(float(scores[b, 0]), expected, atol=1e-4)

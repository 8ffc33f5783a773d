"""The pointer-generator copy head (`T5Config.copy_head`), checked against a numpy
re-computation of its formula, incremental decoding, and the save/load round trip."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import atlas_jax
from atlas_jax.ledger import reader_export
from atlas_jax import weights
from atlas_jax.models import decoding, fid
from tests import test_fid

CONFIG = dataclasses.replace(test_fid.CONFIG, copy_head=True)


@pytest.fixture(scope="module")
def model_and_params():
    return test_fid.init_fid(CONFIG)


def _passages(seed=0, batch=2, k=3, length=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 40, size=(batch, k, length)).astype(np.int32)  # ids >= 40 never occur
    ids[:, 1, 6:] = 0  # passage 1 padded
    ids[0, 2, 3] = ids[0, 0, 1]  # a token twice in the source: its pointer mass adds up
    return ids


def _numpy_mixture(model, params, ids, decoder_ids):
    """log p from the captured decoder state and plain logits, with the formula written out."""
    _, state = model.apply({"params": params}, ids, decoder_ids,
                           capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]["decoder"]
    hidden = np.asarray(inter["decoder_norm"]["__call__"][0], np.float64)
    logits = np.asarray(inter["logits_dense"]["__call__"][0], np.float64)
    head = params["decoder"]["copy_head"]
    encoded, mask = model.apply({"params": params}, ids, method=model.encode_passages)
    encoded, mask = np.asarray(encoded, np.float64), np.asarray(mask)
    q = hidden @ np.asarray(head["query"]["kernel"], np.float64)
    k = encoded @ np.asarray(head["key"]["kernel"], np.float64)
    gate = 1 / (1 + np.exp(-(hidden @ np.asarray(head["gate"]["kernel"], np.float64))))
    source = ids.reshape(ids.shape[0], -1)
    out = np.zeros(logits.shape)
    for b in range(logits.shape[0]):
        scores = np.where(mask[b][None], q[b] @ k[b].T, -np.inf)
        pointer = np.exp(scores - scores.max(-1, keepdims=True))
        pointer /= pointer.sum(-1, keepdims=True)
        vocab = np.exp(logits[b] - logits[b].max(-1, keepdims=True))
        vocab /= vocab.sum(-1, keepdims=True)
        copy = np.zeros_like(vocab)
        for s, token in enumerate(source[b]):
            copy[:, token] += pointer[:, s]
        out[b] = np.log(gate[b] * vocab + (1 - gate[b]) * copy)
    return out


def test_output_is_the_pointer_generator_mixture(model_and_params):
    model, params = model_and_params
    ids = _passages()
    decoder_ids = np.array([[0, 5, 9, 11], [0, 7, 7, 3]], np.int32)
    got = np.asarray(model.apply({"params": params}, ids, decoder_ids), np.float64)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)
    want = _numpy_mixture(model, params, ids, decoder_ids)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_evidence_only_pointer_never_copies_the_question(model_and_params):
    """`copy_skip_through_id`: each row's prefix through its first marker id is not copied
    (its tokens get no pointer mass); a row with nothing after the marker keeps it all."""
    model, params = model_and_params
    marker = 45                                    # ids of `_passages` are < 40
    ids = _passages(seed=5)
    ids[:, :, 3] = marker                          # question = positions 0..3 of each row
    ids[0, 0, 1] = marker                          # a mask inside a question: not the end
    ids[1, 2, 4:] = 0                              # a row that is all question
    config = dataclasses.replace(CONFIG, copy_skip_through_id=marker)
    source = np.asarray(fid.copy_source_ids(jnp.asarray(ids), config))
    rows = source.reshape(ids.shape)
    assert (rows[:, :2, :4] == 0).all() and (rows[0, 2, :4] == 0).all()
    np.testing.assert_array_equal(rows[:, :, 4:], ids[:, :, 4:])
    assert rows[0, 0, 2] == 0
    np.testing.assert_array_equal(rows[1, 2], ids[1, 2])          # no evidence: kept
    np.testing.assert_array_equal(np.asarray(fid.copy_source_ids(jnp.asarray(ids), CONFIG)),
                                  ids.reshape(2, -1))             # default: everything
    skipping = fid.FusionInDecoder(config)
    decoder_ids = np.array([[0, 5, 9, 11], [0, 7, 7, 3]], np.int32)
    _, state = skipping.apply({"params": params}, ids, decoder_ids, mutable=["intermediates"])
    [pointer] = [v for path, v in jax.tree_util.tree_leaves_with_path(state)
                 if "copy_pointer_scores" in jax.tree_util.keystr(path)]
    pointer = np.asarray(pointer).reshape(2, 4, *ids.shape[1:])
    assert pointer[:, :, :2, :4].max() == 0 and pointer[0, :, 2, :4].max() == 0
    assert pointer[1, :, 2, :4].sum() > 0 and pointer[:, :, 0, 4:].sum() > 0
    # and greedy decoding copies with the same source as teacher forcing
    greedy = decoding.generate_from_passages(skipping, params, jnp.asarray(ids), 4)
    assert greedy.shape == (2, 4)


def test_incremental_decoding_equals_teacher_forcing(model_and_params):
    model, params = model_and_params
    ids = _passages(seed=3)
    decoder_ids = np.array([[0, 5, 9, 11], [0, 7, 7, 3]], np.int32)
    forced = np.asarray(model.apply({"params": params}, ids, decoder_ids))
    encoded, mask = model.apply({"params": params}, ids, method=model.encode_passages)
    source = ids.reshape(2, -1)
    _, cache = model.apply({"params": params}, encoded, mask, jnp.zeros((2, 4), jnp.int32),
                           decode=True, max_decode_length=4, mutable=["cache"],
                           method=model.decode, encoder_ids=source)
    cache = cache["cache"]
    for t in range(4):
        step, new = model.apply({"params": params, "cache": cache}, None, mask,
                                decoder_ids[:, t:t + 1], decode=True, max_decode_length=4,
                                mutable=["cache"], method=model.decode, encoder_ids=source)
        cache = new["cache"]
        np.testing.assert_allclose(step[:, -1], forced[:, t], atol=1e-4)
    greedy = decoding.generate(model, params, encoded, mask, 4, encoder_ids=source)
    beams, _ = decoding.generate(model, params, encoded, mask, 4, beam_size=3,
                                 encoder_ids=source)
    assert greedy.shape == (2, 4) and beams.shape == (2, 3, 4)


def test_decoder_without_source_ids_is_refused(model_and_params):
    model, params = model_and_params
    encoded, mask = model.apply({"params": params}, _passages(), method=model.encode_passages)
    with pytest.raises(ValueError, match="copy_head.*encoder_ids"):
        model.apply({"params": params}, encoded, mask, np.zeros((2, 3), np.int32),
                    method=model.decode)


def test_save_and_load_keep_the_copy_head(model_and_params, tmp_path):
    model, params = model_and_params
    reader = weights.Reader(CONFIG, params)
    reader_export.save_reader(reader, tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["atlas_jax_copy_head"] is True
    loaded = atlas_jax.load_reader(tmp_path / "r")
    assert loaded.config.copy_head
    ids, decoder_ids = _passages(), np.array([[0, 5, 9], [0, 7, 7]], np.int32)
    np.testing.assert_allclose(loaded.logits(ids, decoder_ids), reader.logits(ids, decoder_ids),
                               atol=1e-6)
    np.testing.assert_array_equal(loaded.generate(ids, max_length=5),
                                  reader.generate(ids, max_length=5))
    # Without its copy tensors the folder is refused, naming the missing tensor.
    tensors = load_file(tmp_path / "r" / "model.safetensors")
    del tensors["atlas_jax.copy_head.gate.weight"]
    save_file(tensors, tmp_path / "r" / "model.safetensors")
    with pytest.raises(weights.CheckpointError, match="atlas_jax.copy_head.gate.weight"):
        atlas_jax.load_reader(tmp_path / "r")


def test_the_prompt_skip_travels_in_config_json(model_and_params, tmp_path):
    """`copy_skip_through_id` is saved as `atlas_jax_copy_skip_through_id`, loaded back, kept
    by `build_reader` (gin may override it), and a non-id value is refused by name."""
    import gin
    model, params = model_and_params
    reader = weights.Reader(dataclasses.replace(CONFIG, copy_skip_through_id=45), params)
    reader_export.save_reader(reader, tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["atlas_jax_copy_skip_through_id"] == 45
    assert atlas_jax.load_reader(tmp_path / "r").config.copy_skip_through_id == 45
    for k, v in {"vocab_size": CONFIG.vocab_size, "emb_dim": CONFIG.emb_dim,
                 "num_heads": CONFIG.num_heads, "head_dim": CONFIG.head_dim,
                 "mlp_dim": CONFIG.mlp_dim, "num_encoder_layers": CONFIG.num_encoder_layers,
                 "num_decoder_layers": CONFIG.num_decoder_layers}.items():
        gin.bind_parameter(f"atlas_jax.models.t5.T5Config.{k}", v)
    try:
        assert weights.build_reader(str(tmp_path / "r")).config.copy_skip_through_id == 45
        gin.bind_parameter("atlas_jax.models.t5.T5Config.copy_skip_through_id", 7)
        assert weights.build_reader(str(tmp_path / "r")).config.copy_skip_through_id == 7
    finally:
        gin.clear_config()
    config["atlas_jax_copy_skip_through_id"] = "764"
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="atlas_jax_copy_skip_through_id"):
        atlas_jax.load_reader(tmp_path / "r")

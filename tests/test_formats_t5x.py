"""t5x checkpoints (native msgpack + zarr, versions 2 and 3, bfloat16; orbax layout) load as
readers with the logits of transformers on the same weights; bad checkpoints fail in one line."""
import gzip
import shutil

import numpy as np
import pytest
import torch

import atlas_jax
from atlas_jax import weights
from tests.hf_reference import make_hf_t5, random_ids
from tests.t5x_reference import t5x_params_from_hf, write_t5x_native, write_t5x_orbax


def _hf_logits(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def _model_and_params(tmp_path, version, bfloat16=(), **kwargs):
    model = make_hf_t5(tmp_path / "hf", version=version, **kwargs)
    with torch.no_grad():   # the arrays stored as bfloat16: the reference holds them rounded
        for name, p in model.named_parameters():
            if any(name.startswith(b) for b in bfloat16):
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    params = t5x_params_from_hf(model.state_dict(), gated=version == "v1.1",
                                untied=version == "v1.1")
    return model, params


def _assert_parity(reader, model, vocab=96):
    rng = np.random.default_rng(1)
    enc, dec = random_ids(rng, 3, 40, vocab), random_ids(rng, 3, 12, vocab, pad_tail=False)
    ours, theirs = reader.logits(enc, dec), _hf_logits(model, enc, dec)
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert relative <= 1e-4, relative


@pytest.mark.parametrize("version,t5x_version", [("v1.1", 3), ("v1.0", 3), ("v1.1", 2)])
def test_native_checkpoint_matches_transformers(tmp_path, version, t5x_version):
    bf16 = ("decoder.block.1.layer.2.DenseReluDense.wo",) if version == "v1.1" else ()
    model, params = _model_and_params(tmp_path, version, bfloat16=bf16)
    folder = write_t5x_native(
        tmp_path / "checkpoint_100", params, version=t5x_version,
        bfloat16=("decoder/layers_1/mlp/wo/kernel",) if bf16 else (),
        inline=("encoder/encoder_norm/scale",), zstd=("encoder/layers_1/mlp/wo/kernel",))
    reader = atlas_jax.load_reader(folder)
    assert reader.config.logits_via_embedding == (version == "v1.0")
    assert reader.config.mlp_activations == (("gelu", "linear") if version == "v1.1"
                                             else ("relu",))
    _assert_parity(reader, model)
    # the msgpack file itself works as the path too
    np.testing.assert_array_equal(
        atlas_jax.load_reader(folder / "checkpoint").params["token_embedder"]["embedding"],
        reader.params["token_embedder"]["embedding"])


def test_bfloat16_array_is_read_exactly(tmp_path):
    model, params = _model_and_params(tmp_path, "v1.1",
                                      bfloat16=("decoder.block.1.layer.2.DenseReluDense.wo",))
    folder = write_t5x_native(tmp_path / "checkpoint_1", params,
                              bfloat16=("decoder/layers_1/mlp/wo/kernel",))
    reader = atlas_jax.load_reader(folder)
    ours = np.asarray(reader.params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"])
    expected = model.decoder.block[1].layer[2].DenseReluDense.wo.weight.detach().numpy().T
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("ocdbt", [False, True], ids=["per-array", "ocdbt"])
def test_orbax_layout_matches_transformers(tmp_path, ocdbt):
    model, params = _model_and_params(tmp_path, "v1.1", num_heads=2, d_kv=16, num_buckets=8,
                                      max_distance=16)
    folder = write_t5x_orbax(tmp_path / "checkpoint_7", params, ocdbt=ocdbt)
    reader = atlas_jax.load_reader(folder, relative_attention_max_distance=16)
    assert (reader.config.num_heads, reader.config.head_dim) == (2, 16)
    _assert_parity(reader, model)


def test_max_distance_defaults_to_128_and_can_be_overridden(tmp_path):
    model, params = _model_and_params(tmp_path, "v1.1", max_distance=24)
    folder = write_t5x_native(tmp_path / "checkpoint_1", params)
    assert atlas_jax.load_reader(folder).config.relative_attention_max_distance == 128
    reader = atlas_jax.load_reader(folder, relative_attention_max_distance=24)
    _assert_parity(reader, model)


def test_optimizer_state_is_never_read(tmp_path):
    _, params = _model_and_params(tmp_path, "v1.1")
    folder = write_t5x_native(tmp_path / "checkpoint_1", params)
    slots = sorted(folder.glob("state.param_states.*"))
    assert slots
    for slot in slots:   # unreadable optimizer slots do not matter
        shutil.rmtree(slot)
    atlas_jax.load_reader(folder)


def test_gin_build_reader_starts_from_a_t5x_checkpoint(tmp_path):
    import gin
    from atlas_jax.models import t5
    _, params = _model_and_params(tmp_path, "v1.1")
    folder = write_t5x_native(tmp_path / "checkpoint_1", params)
    gin.clear_config()
    try:
        gin.bind_parameter("T5Config.vocab_size", 96)
        for field, value in (("emb_dim", 32), ("num_heads", 4), ("head_dim", 8), ("mlp_dim", 48),
                             ("num_encoder_layers", 2), ("num_decoder_layers", 2)):
            gin.bind_parameter(f"T5Config.{field}", value)
        reader = weights.build_reader(checkpoint=str(folder))
        assert isinstance(reader.config, t5.T5Config) and reader.config.mlp_dim == 48
    finally:
        gin.clear_config()


def test_truncated_chunk_names_the_array(tmp_path):
    _, params = _model_and_params(tmp_path, "v1.1")
    folder = write_t5x_native(tmp_path / "checkpoint_1", params)
    chunk = folder / "target.encoder.layers_0.attention.query.kernel" / "0.0"
    data = chunk.read_bytes()
    assert gzip.decompress(data)   # a real gzip chunk, as t5x writes
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="encoder/layers_0/attention/query/kernel"):
        atlas_jax.load_reader(folder)


def test_missing_array_folder_names_the_array(tmp_path):
    _, params = _model_and_params(tmp_path, "v1.1")
    folder = write_t5x_native(tmp_path / "checkpoint_1", params)
    shutil.rmtree(folder / "target.decoder.logits_dense.kernel")
    with pytest.raises(weights.CheckpointError,
                       match=r"target\.decoder\.logits_dense\.kernel.*missing") as error:
        atlas_jax.load_reader(folder)
    assert "\n" not in str(error.value)


def test_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(weights.CheckpointError, match="not a checkpoint this project reads"):
        atlas_jax.load_reader(tmp_path / "notes.txt")
    (tmp_path / "checkpoint").write_bytes(b"\x81\xa1a\xc1")   # msgpack map, garbage value
    with pytest.raises(weights.CheckpointError, match="checkpoint"):
        atlas_jax.load_reader(tmp_path / "checkpoint")

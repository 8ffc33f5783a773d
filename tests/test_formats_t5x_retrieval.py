"""t5x_retrieval dual encoders (GTR / sentence-T5): a T5-encoder tower that embeds like the
reference computation (T5 encoder, mean over tokens > 0, projection, L2 norm), tokenized by a
SentencePiece model, usable as an index's retriever."""
import json

import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel

import atlas_jax
from atlas_jax import cli, gin_config, vocabulary, weights
from tests.hf_reference import random_ids
from tests.t5x_reference import write_t5x_retrieval

TEXTS = ["who was paid on the fifth of january", "groceries at the market", "the rent for march",
         "coffee with a friend", "salary from the employer", "a refund of the deposit"] * 4


def _dual_encoder(gated: bool, seed: int = 0, vocab: int = 96):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu" if gated else "relu")
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    projection = np.random.default_rng(seed).normal(size=(32, 24)).astype(np.float32) * 0.2
    return model, projection


def _reference(model, projection, ids):
    """flaxformer's DualEncoder.encode on transformers' T5 encoder."""
    mask = (ids > 0).astype(np.float32)
    with torch.no_grad():
        states = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
    states = states.numpy()
    pooled = (states * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-10)
    projected = pooled @ projection
    return projected / np.sqrt((projected ** 2).sum(-1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("gated", [False, True], ids=["gtr-relu", "st5-gated"])
def test_dual_encoder_embeddings_match_the_reference(tmp_path, gated):
    model, projection = _dual_encoder(gated)
    folder = write_t5x_retrieval(tmp_path / "checkpoint_1000", model, projection, gated)
    retriever = atlas_jax.load_retriever(folder)
    config = retriever.config
    assert (config.architecture, config.projection_dim, config.embedding_dim) == ("t5", 24, 24)
    assert config.mlp_activations == (("gelu", "linear") if gated else ("relu",))
    ids = random_ids(np.random.default_rng(3), 5, 40, 96)
    ours = retriever.embed_tokens(ids, (ids > 0).astype(np.int32))
    theirs = _reference(model, projection, ids)
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs,
                                                                                      axis=-1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    # a T5 dual encoder is not a reader
    with pytest.raises(weights.CheckpointError, match="dual encoder.*load_retriever"):
        atlas_jax.load_reader(folder)


def test_sentencepiece_tokenizer_and_index(tmp_path, capsys):
    from atlas_jax.index import passage_index
    spm_file = vocabulary.train_sentencepiece(TEXTS, tmp_path / "spiece.model", vocab_size=60)
    model, projection = _dual_encoder(gated=False)
    folder = write_t5x_retrieval(tmp_path / "checkpoint_1", model, projection, gated=False)
    retriever = atlas_jax.load_retriever(folder, tokenizer=spm_file)
    ids, mask = retriever.tokenize(TEXTS[:3], pad_to_multiple=1)
    import sentencepiece as spm
    pieces = spm.SentencePieceProcessor(model_file=str(spm_file)).encode(TEXTS[0])
    np.testing.assert_array_equal(ids[0, :len(pieces) + 1], pieces + [1])   # EOS appended
    np.testing.assert_allclose(retriever.embed(TEXTS[:3]), _reference(model, projection, ids),
                               atol=1e-5)
    records = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS[:6])]
    (tmp_path / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # the command line: build with the checkpoint + its SentencePiece model, then search
    for argv in (["index", "build", "--passages", str(tmp_path / "passages.jsonl"),
                  "--retriever", str(folder), "--out", str(tmp_path / "idx"), "--no-progress"],
                 ["index", "search", "--index", str(tmp_path / "idx"), "--query",
                  "the rent for march", "--k", "1"]):
        assert cli.main(argv + ["--tokenizer", str(spm_file)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["id"] == "2"
    index = passage_index.PassageIndex.load(tmp_path / "idx")
    np.testing.assert_allclose(index.embeddings, retriever.embed(TEXTS[:6], tower="passage"),
                               atol=2e-3)   # float16 storage
    assert cli.main(["index", "build", "--passages", str(tmp_path / "passages.jsonl"),
                     "--retriever", str(folder), "--out", str(tmp_path / "idx2")]) == 2
    assert "holds no tokenizer: pass --tokenizer" in capsys.readouterr().err


def test_gin_tower_builds_from_a_gtr_shaped_config(tmp_path):
    """gin/models/retriever/gtr_base.gin's RetrieverConfig with tiny sizes loads the
    checkpoint through build_retriever, checked against the bindings."""
    import gin
    model, projection = _dual_encoder(gated=False)
    folder = write_t5x_retrieval(tmp_path / "checkpoint_1", model, projection, gated=False)
    spm_file = vocabulary.train_sentencepiece(TEXTS, tmp_path / "spiece.model", vocab_size=60)
    try:
        gin_config.parse(["models/retriever/gtr_base.gin"], [
            f"RETRIEVER_CHECKPOINT = '{folder}'", f"RETRIEVER_TOKENIZER = '{spm_file}'",
            "retriever.RetrieverConfig.vocab_size = 96", "retriever.RetrieverConfig.hidden_size = 32",
            "retriever.RetrieverConfig.num_layers = 2", "retriever.RetrieverConfig.num_heads = 4",
            "retriever.RetrieverConfig.mlp_dim = 48"])
        retriever = weights.build_retriever()
        assert retriever.config.architecture == "t5" and retriever.tokenizer is not None
        gin.bind_parameter("retriever.RetrieverConfig.num_layers", 3)
        with pytest.raises(weights.CheckpointError, match="num_layers = 3 does not match"):
            weights.build_retriever()
    finally:
        gin.clear_config(clear_constants=True)


def test_t5_towers_train_query_side_on_the_mesh(tmp_path):
    """The synthetic joint run with T5-encoder towers, query-side, on mesh (4, 2) (index
    build, retrieval, the retriever loss): the query tower moves away from the passage tower
    it started equal to, and the losses are finite."""
    import gin
    import jax
    from tests.test_trainer import launch
    try:
        result = launch(tmp_path / "run", "TRAIN_STEPS = 3", "TrainConfig.query_side = True",
                        "synthetic.build_synthetic_retriever.architecture = 't5'")
    finally:
        gin.clear_config(clear_constants=True)
    params = result.params
    assert "projection_layer" in params["retriever"]["encoder"]
    initial = jax.tree.leaves(params["frozen_passage_tower"])
    trained = jax.tree.leaves(params["retriever"])
    assert any(not np.array_equal(a, b) for a, b in zip(initial, trained))
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert losses and np.isfinite(losses).all()

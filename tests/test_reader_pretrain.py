"""`atlas-jax reader pretrain` / `export` on a tiny model and one small ledger: the losses fall,
a relaunch resumes exactly, the export loads with `load_reader` and carries its card."""
import dataclasses
import json
import shutil

import gin
import jax
import numpy as np
import pytest

from atlas_jax import checkpoints, cli, gin_config, weights
from atlas_jax.ledger import reader_export, reader_pretrain

TINY = ["t5.T5Config.emb_dim = 32", "t5.T5Config.num_heads = 2", "t5.T5Config.head_dim = 16",
        "t5.T5Config.mlp_dim = 64", "t5.T5Config.num_encoder_layers = 1",
        "t5.T5Config.num_decoder_layers = 1",
        "ReaderPretrainConfig.ledgers = ((1201, '2010-01-01', '2010-04-30', '1980-01-01'),)",
        "ReaderPretrainConfig.heldout_ledger = (1202, '2011-01-01', '2011-03-31', '1980-01-01')",
        "ReaderPretrainConfig.spm_vocab_size = 300", "ReaderPretrainConfig.batch_size = 4",
        "ReaderPretrainConfig.lm_batch_size = 2", "ReaderPretrainConfig.warmup_steps = 2",
        "ReaderPretrainConfig.learning_rate = 3e-3", "ReaderPretrainConfig.log_every = 2",
        "ReaderPretrainConfig.checkpoint_every = 4", "ReaderPretrainConfig.max_to_keep = 5",
        "ReaderPretrainConfig.eval_every = 8", "ReaderPretrainConfig.eval_per_field = 2"]


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config(clear_constants=True)


def _config(model_dir, steps):
    gin_config.parse(["runs/reader_pretrain.gin"], TINY + [f"MODEL_DIR = '{model_dir}'",
                                                           f"TRAIN_STEPS = {steps}"])
    return reader_pretrain.ReaderPretrainConfig()


def _params(run_dir, step):
    manager = checkpoints.Checkpoints(run_dir / "checkpoints")
    state = manager.manager.restore(step)
    manager.close()
    return state["state"]["params"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reader") / "run"
    record = reader_pretrain.train(_config(run_dir, 8))
    gin.clear_config(clear_constants=True)
    return run_dir, record


def test_losses_fall_and_heldout_accuracy_is_logged(run):
    run_dir, record = run
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6, 8]
    assert losses[-1] < losses[0]
    heldout = [r for r in log if any(k.startswith("heldout/") for k in r)]
    assert heldout and {"heldout/read/amount", "heldout/read/payee"} <= set(heldout[-1])
    # amounts of the held-out ledger the training ledger never has: the copy accuracy proper
    assert "heldout_alone/read/amount:novel" in heldout[-1]


def test_novel_answers_are_those_training_never_answers(run):
    run_dir, _ = run
    config = _config(run_dir, 8)
    vocabulary, train, held, _ = reader_pretrain.prepare_corpus(config)
    known = reader_pretrain.known_answers(train, vocabulary)
    pool = train.pools["read"]
    assert vocabulary.decode([int(t) for t in pool.answers[0]]) in known[f"read/{pool.fields[0]}"]

    class Oracle:        # answers every probe right, by its question
        answer_of = {tuple(held.prompt(q)): held.target(a, 256)   # never cut
                     for p in held.pools.values() for q, a in zip(p.questions, p.answers)}

        def generate(self, inputs, max_length):
            out = []
            for row in inputs[:, 0]:
                [answer] = {tuple(a) for prompt, a in self.answer_of.items()
                            if tuple(row[:len(prompt)]) == prompt}
                out.append(answer)
            return np.asarray(out)
    small = dataclasses.replace(config, eval_per_field=3)
    scores = reader_pretrain.copy_accuracy(Oracle(), held, vocabulary, small, known=known)
    assert set(scores.values()) == {1.0}
    assert any(k.endswith(":novel") for k in scores)
    # answers the training corpus has are not novel
    own = reader_pretrain.known_answers(held, vocabulary)
    scores = reader_pretrain.copy_accuracy(Oracle(), held, vocabulary, small, known=own)
    assert scores and not any(k.endswith(":novel") for k in scores)


def test_relaunch_resumes_exactly(run, tmp_path):
    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "8")
    reader_pretrain.train(_config(copy, 8))
    for a, b in zip(jax.tree.leaves(_params(run_dir, 8)), jax.tree.leaves(_params(copy, 8))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").open()]
    assert steps.count(6) == 1 and steps.count(8) == 2     # a loss record and an eval record


def test_export_loads_with_its_card(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "tiny_reader"
    assert cli.main(["reader", "export", "--run", str(run_dir), "--out", str(out)]) == 0
    reader = weights.load_reader(out)
    card = json.loads((out / "model_card.json").read_text())
    assert card["format"] == reader_export.CARD_FORMAT and card["training"]["steps"] == 8
    assert reader_export.parameter_shapes(reader) == card["parameter_shapes"]
    assert card["data"]["ledgers"][0]["seed"] == 1201
    np.testing.assert_allclose(
        np.asarray(reader.params["decoder"]["logits_dense"]["kernel"]),
        np.asarray(_params(run_dir, 8)["decoder"]["logits_dense"]["kernel"]), atol=0)
    # again into the same folder: replaced (it is an export); a foreign folder is refused
    assert cli.main(["reader", "export", "--run", str(run_dir), "--out", str(out)]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["reader", "export", "--run", str(run_dir), "--out", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert cli.main(["reader", "export", "--run", str(tmp_path / "nothing"), "--out",
                     str(tmp_path / "x")]) == 2


def test_bad_binding_is_named(tmp_path, capsys):
    assert cli.main(["reader", "pretrain", "--gin_file=runs/reader_pretrain.gin",
                     f"--gin.MODEL_DIR='{tmp_path}'",
                     "--gin.ReaderPretrainConfig.no_such=1"]) == 2
    assert "no_such" in capsys.readouterr().err


def test_a_second_stage_starts_from_an_exported_reader(run, tmp_path):
    """`init_from` (runs/reader_read.gin): the stage-1 export's weights and vocabulary start
    the run; its card counts both stages; a reader of another shape is refused by name."""
    run_dir, _ = run
    first = tmp_path / "stage1_reader"
    assert cli.main(["reader", "export", "--run", str(run_dir), "--out", str(first)]) == 0
    stage2 = tmp_path / "stage2"
    gin_config.parse(["runs/reader_read.gin"], TINY + [
        f"MODEL_DIR = '{stage2}'", "TRAIN_STEPS = 4", f"INIT_READER = '{first}'",
        "ReaderPretrainConfig.easy_steps = 2", "ReaderPretrainConfig.warmup_steps = 1"])
    config = reader_pretrain.ReaderPretrainConfig()
    reader_pretrain.train(config)
    assert (stage2 / "corpus" / "spiece.model").read_bytes() == \
        (first / "spiece.model").read_bytes()
    from atlas_jax_tasks import vocab
    vocabulary = vocab.reader_vocabulary(str(first / "spiece.model"))
    _, model = reader_pretrain.make_model(vocabulary)
    start = reader_pretrain.initial_params(model, config)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(_params(run_dir, 8))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    gin.clear_config(clear_constants=True)
    out = tmp_path / "stage2_reader"
    assert cli.main(["reader", "export", "--run", str(stage2), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert [s["steps"] for s in card["training"]["stages"]] == [8, 4]
    assert card["training"]["steps"] == 12
    assert card["training"]["stages"][1]["curriculum"]["easy_steps"] == 2
    assert "stage 2: 4 steps" in (out / "README.md").read_text()
    # A reader of another width: one line naming the parameter, nothing trained.
    other = tmp_path / "stage2_wide"
    gin_config.parse(["runs/reader_read.gin"], TINY + [
        f"MODEL_DIR = '{other}'", "TRAIN_STEPS = 2", f"INIT_READER = '{first}'",
        "t5.T5Config.emb_dim = 48"])
    wrong = r"init_from=.*parameter .* is \(32, \d+\), the model needs \(48, \d+\)"
    with pytest.raises(ValueError, match=wrong):
        reader_pretrain.initial_params(reader_pretrain.make_model(vocabulary)[1],
                                       reader_pretrain.ReaderPretrainConfig())


def test_a_third_stage_copies_from_evidence_and_can_redate(run, tmp_path):
    """runs/reader_evidence.gin: the copy head skips each row's prompt (the export's
    config.json says so); with `redate_copies` each training ledger also appears re-dated
    (never a year ending in 19-25); the held-out ledger is also scored re-dated; the card
    says all three."""
    run_dir, _ = run
    first = tmp_path / "stage1_reader"
    assert cli.main(["reader", "export", "--run", str(run_dir), "--out", str(first)]) == 0
    stage = tmp_path / "evidence"
    gin_config.parse(["runs/reader_evidence.gin"], TINY + [
        f"MODEL_DIR = '{stage}'", "TRAIN_STEPS = 2", f"INIT_READER = '{first}'",
        "ReaderPretrainConfig.redate_copies = 2", "ReaderPretrainConfig.warmup_steps = 1",
        "ReaderPretrainConfig.eval_every = 2"])
    config = reader_pretrain.ReaderPretrainConfig()
    assert config.heldout_redate_years == 104 and config.copy_from_evidence
    reader_pretrain.train(config)
    vocabulary, corpus, held, summary = reader_pretrain.prepare_corpus(config)
    assert len(summary["redated"]) == 2 and len(corpus.passages) == 3
    years = {vocabulary.decode([int(t) for t in p]).strip()[:4] for ledger in corpus.texts[1:]
             for p in ledger}
    assert years and all(int(y) % 100 not in range(19, 26) and y != "2010" for y in years)
    assert held.redated is not None and len(held.redated.passages[0]) == len(held.passages[0])
    gin.clear_config(clear_constants=True)
    out = tmp_path / "evidence_reader"
    assert cli.main(["reader", "export", "--run", str(stage), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["heldout_redate_years"] == 104
    sentinel = int(vocabulary.encode("<extra_id_0>")[-1])
    assert json.loads((out / "config.json").read_text())[
        "atlas_jax_copy_skip_through_id"] == sentinel
    assert weights.load_reader(str(out)).config.copy_skip_through_id == sentinel
    assert "read/payee" in card["heldout_copy_accuracy_redated"]
    assert card["training"]["stages"][-1]["redate_copies"] == 2
    assert len(card["data"]["redated_copies"]) == 2
    readme = (out / "README.md").read_text()
    assert "re-dated +104 years" in readme and "Stage 2 also reads each ledger 2 more" in readme

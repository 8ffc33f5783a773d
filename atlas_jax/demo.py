"""End-to-end smoke run: real MiniLM retrieval over ledger entries, then the tiny FiD reader.

Until the ledger demo lands this embeds a handful of Beancount entries with the real
all-MiniLM-L6-v2 weights into a `PassageIndex` (exact search sharded over the devices),
retrieves the top-k for a few questions (and reports recall@k against the entry that answers
each one) and one query with metadata filters (account prefix, date range), then runs a tiny
randomly initialised FiD reader over the retrieved passages: teacher-forced logits and
KV-cached greedy decoding. The reader is untrained, so its answers are noise; the point is
that every stage runs end to end.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

PASSAGES = [
    ("2023-03-01 Landlord", '2023-03-01 * "Landlord" "March rent"\n'
     "  Expenses:Home:Rent  2400.00 USD\n  Assets:Bank:Checking"),
    ("2023-03-03 Verizon", '2023-03-03 * "Verizon Wireless" "Phone bill"\n'
     "  Expenses:Home:Phone  64.08 USD\n  Liabilities:CreditCard"),
    ("2023-03-07 Whole Foods", '2023-03-07 * "Whole Foods Market" "Groceries"\n'
     "  Expenses:Food:Groceries  87.32 USD\n  Liabilities:CreditCard"),
    ("2023-03-09 Uncle Boons", '2023-03-09 * "Uncle Boons" "Dinner with friends"\n'
     "  Expenses:Food:Restaurant  56.40 USD\n  Liabilities:CreditCard"),
    ("2023-03-14 Hooli payroll", '2023-03-14 * "Hooli" "Payroll"\n'
     "  Assets:Bank:Checking  4613.46 USD\n  Income:Salary  -6250.00 USD\n"
     "  Expenses:Taxes:Federal  1636.54 USD"),
    ("2023-03-15 Con Edison", '2023-03-15 * "Con Edison" "Electricity"\n'
     "  Expenses:Home:Electricity  71.19 USD\n  Assets:Bank:Checking"),
    ("2023-03-18 Metro", '2023-03-18 * "MetroCard" "Transit card refill"\n'
     "  Expenses:Transport:Tram  120.00 USD\n  Liabilities:CreditCard"),
    ("2023-03-21 Vanguard", '2023-03-21 * "Vanguard" "Buy index fund"\n'
     "  Assets:Investments:VBMPX  10 VBMPX {165.20 USD}\n  Assets:Bank:Checking"),
    ("2023-03-24 Cafe", '2023-03-24 * "Cafe Mogador" "Lunch"\n'
     "  Expenses:Food:Restaurant  23.75 USD\n  Liabilities:CreditCard"),
    ("2023-03-31 balance", "2023-03-31 balance Assets:Bank:Checking  3310.98 USD"),
]
ACCOUNT = re.compile(r"\b(?:Assets|Liabilities|Equity|Income|Expenses)(?::[\w-]+)+")
QUESTIONS = [  # (question, index of the passage holding the answer, answer)
    ("How much was the March rent paid to the landlord?", 0, "2400.00 USD"),
    ("What did I spend at Whole Foods on March 7, 2023?", 2, "87.32 USD"),
    ("Which account paid the electricity bill to Con Edison?", 5, "Assets:Bank:Checking"),
    ("What was the checking account balance on 2023-03-31?", 9, "3310.98 USD"),
    ("How much federal tax was withheld from the Hooli payroll?", 4, "1636.54 USD"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="extra gin files (after models/tiny.gin, models/retriever/minilm.gin)")
    parser.add_argument("--gin_search_paths", action="append", default=[])
    parser.add_argument("--k", type=int, default=3, help="passages per question")
    parser.add_argument("--max_length", type=int, default=8, help="tokens to generate")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import jax
    import sentencepiece as spm

    from atlas_jax import gin_config, vocabulary, weights
    from atlas_jax.index import passage_index
    from atlas_jax.index import passages as passages_lib

    gin_config.parse(["models/tiny.gin", "models/retriever/minilm.gin"] + args.gin_file,
                     search_paths=args.gin_search_paths)

    start = time.perf_counter()
    retriever = weights.build_retriever()
    texts = [f"{title} {text}" for title, text in PASSAGES]
    retriever.embed(texts, tower="passage")  # compile once, outside the timing
    t0 = time.perf_counter()
    passage_embeddings = retriever.embed(texts, tower="passage")
    embed_seconds = time.perf_counter() - t0
    store = passages_lib.PassageStore.from_records(
        {"id": f"entry-{i}", "title": title, "text": text,
         "metadata": {"date": title.split()[0], "accounts": ACCOUNT.findall(text)}}
        for i, (title, text) in enumerate(PASSAGES))
    ledger_index = passage_index.PassageIndex.from_embeddings(store, passage_embeddings)
    query_embeddings = retriever.embed([q for q, _, _ in QUESTIONS], tower="query")
    top = ledger_index.search(query_embeddings, args.k).ids  # (questions, k), exact, sharded
    hits = [gold in row for (_, gold, _), row in zip(QUESTIONS, top)]
    food = ledger_index.search(retriever.embed(["eating out"], tower="query"), 2,
                        where=["accounts^=Expenses:Food", "date>=2023-03-08"])
    print(f"retriever: {retriever.path} ({retriever.config.num_layers} layers, "
          f"dim {retriever.config.hidden_size}); {len(texts)} passages embedded at "
          f"{len(texts) / embed_seconds:.0f} passages/s")
    for (question, gold, _), row, hit in zip(QUESTIONS, top, hits):
        print(f"  {'HIT ' if hit else 'MISS'} {question}\n       top-{args.k}: "
              + " | ".join(PASSAGES[i][0] for i in row))
    print(f"retrieval recall@{args.k}: {np.mean(hits):.2f} (index: {ledger_index.backend.name}, "
          f"{ledger_index.backend.num_shards} shards)")
    print("  'eating out' where accounts^=Expenses:Food, date>=2023-03-08: "
          + " | ".join(hit["title"] for hit in ledger_index.hits(food)))

    with tempfile.TemporaryDirectory() as tmp:
        spiece = vocabulary.train_sentencepiece(texts + [q for q, _, _ in QUESTIONS],
                                                Path(tmp) / "spiece.model", vocab_size=300)
        processor = spm.SentencePieceProcessor(model_file=str(spiece))
    vocab_size = vocabulary.reader_vocab_size(processor)
    gin_config.parse(["models/tiny.gin"] + args.gin_file,
                     [f"t5.T5Config.vocab_size = {vocab_size}"],
                     args.gin_search_paths)
    reader = weights.build_reader()
    sentinel = vocabulary.sentinel_id(processor, 0)
    length = 96
    passage_ids = np.zeros((len(QUESTIONS), args.k, length), np.int32)
    for b, ((question, _, _), row) in enumerate(zip(QUESTIONS, top)):
        for j, index in enumerate(row):
            title, text = PASSAGES[index]
            ids = (processor.encode(f"question: {question} answer:") + [sentinel]
                   + processor.encode(f"title: {title} context: {text}"))[:length - 1] + [1]
            passage_ids[b, j, :len(ids)] = ids
    targets = np.zeros((len(QUESTIONS), 12), np.int32)
    for b, (_, _, answer) in enumerate(QUESTIONS):
        ids = ([sentinel] + processor.encode(answer))[:11] + [1]
        targets[b, :len(ids)] = ids
    decoder_inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    t0 = time.perf_counter()
    logits = reader.logits(passage_ids, decoder_inputs)
    logits_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    generated = reader.generate(passage_ids, max_length=args.max_length)
    generate_seconds = time.perf_counter() - t0
    print(f"reader: tiny FiD, random init (untrained), vocab {vocab_size}, "
          f"{sum(x.size for x in jax.tree.leaves(reader.params)):,} parameters; input "
          f"(batch {len(QUESTIONS)}, passages {args.k}, length {length})")
    print(f"  teacher-forced logits {logits.shape} in {logits_seconds:.2f}s (incl. compile); "
          f"greedy KV-cached decode {generated.shape} in {generate_seconds:.2f}s (incl. compile)")
    for (question, _, _), tokens in zip(QUESTIONS, generated):
        kept = [int(t) for t in tokens if 1 < t < processor.get_piece_size()]
        print(f"  {question} -> {processor.decode(kept)!r}")
    summary = {"passages": len(texts),
               "filtered_hits": [hit["id"] for hit in ledger_index.hits(food)],
               "passages_per_second": round(len(texts) / embed_seconds, 1),
               f"recall@{args.k}": float(np.mean(hits)), "reader_logits_shape": logits.shape,
               "generated_shape": generated.shape,
               "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(summary))
    return 0

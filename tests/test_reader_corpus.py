"""Reader pre-training data: generated ledgers, probes, distractors, span corruption, batches."""
import random

import numpy as np
import pytest

from atlas_jax_tasks import reader_batches, reader_corpus, vocab

LEDGER = (1201, "2010-01-01", "2010-06-30", "1980-01-01")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reader_corpus")
    [(name, path)] = reader_corpus.generate_ledgers(folder, (LEDGER,))
    records = reader_corpus.read_passages(path)
    rng = random.Random(0)
    texts = [f"{r['title']} {r['text']}" for r in records]
    texts += [e.question for e in reader_corpus.reading_examples(records, rng, "read")]
    vocabulary = vocab.train_reader_spiece(texts, folder / "spiece.model", vocab_size=400,
                                           split_digits=True)
    return records, vocabulary, reader_batches.TokenizedCorpus.build([records], vocabulary)


def test_evaluated_ledgers_are_never_pretrained_on():
    # The demo (seed 0), the README (seed 0) and the tests (seeds 0, 3) evaluate on other
    # ledgers; the held-out ledger of the card is not in the training set either.
    seeds = {s for s, *_ in reader_corpus.PRETRAIN_LEDGERS}
    assert not seeds & {0, 3, reader_corpus.HELDOUT_LEDGER[0]}
    for _, start, end, _ in reader_corpus.PRETRAIN_LEDGERS:
        assert end < "2019-01-01", (start, end)


def test_redating_moves_every_date_and_nothing_else(corpus):
    records = corpus[0]
    moved = reader_corpus.redate(records, 104)
    assert len(moved) == len(records)
    for before, after in zip(records, moved):
        assert after["metadata"]["date"] == f"{int(before['metadata']['date'][:4]) + 104}" \
            + before["metadata"]["date"][4:]
        assert before["metadata"]["date"] not in after["text"] + after["title"]
        assert after["metadata"]["date"] in after["title"]
        # amounts, accounts and payees are the same text
        assert after["text"].replace(after["metadata"]["date"], "D") == \
            before["text"].replace(before["metadata"]["date"], "D")
        assert after["id"] == before["id"]
    assert records[0]["metadata"]["date"].startswith("2010")   # the input is not changed
    leap = {"id": "x", "title": "2012-02-29 Pay", "text": '2012-02-29 * "Pay"\n  A:B 2012.00 USD',
            "metadata": {"date": "2012-02-29"}}
    [shifted] = reader_corpus.redate([leap], -96)
    assert shifted["text"] == '1916-02-29 * "Pay"\n  A:B 2012.00 USD'   # the amount stays
    with pytest.raises(ValueError, match="multiple of 4"):
        reader_corpus.redate([leap], 2)


def test_redated_years_never_end_like_an_evaluated_year():
    for seed, start, end, _ in reader_corpus.PRETRAIN_LEDGERS:
        three = reader_corpus.redate_offsets(start, end, 3, random.Random(seed))
        assert len(set(three)) == 3 and 0 not in three
        every = reader_corpus.redate_offsets(start, end, 10_000, random.Random(seed))
        assert len(every) > 20 and set(three) <= set(every)
        for k in every:
            assert k % 4 == 0
            for year in range(int(start[:4]) + k, int(end[:4]) + k + 1):
                assert 1904 <= year <= 2096
                assert year % 100 not in range(19, 26), (seed, k, year)


def test_probes_name_a_field_give_cues_and_never_the_answer(corpus):
    records, _, _ = corpus
    examples = reader_corpus.reading_examples(records, random.Random(1), "read")
    fields = {e.field for e in examples}
    assert {"payee", "amount", "account", "balance"} <= fields
    for e in examples:
        assert e.question.startswith(f"{e.field}? ")
        assert e.answer
        record = records[e.source]
        number = e.answer.split()[0]
        assert number in record["text"] or e.answer in record["text"], (e, record["text"])
        # only the asked field is named: the probes of two fields differ in their words
        assert not any(f"{name}?" in e.question.split("?", 1)[1] for name in
                       reader_corpus.FIELDS)
        if e.field == "amount":
            assert number not in e.question


def test_distractors_are_other_entries_and_hard(corpus):
    records, _, _ = corpus
    table = reader_corpus.Distractors(records)
    rng = random.Random(0)
    same_day = 0
    for row in range(0, len(records), 7):
        chosen = table.sample(row, 3, rng)
        assert len(chosen) == 3 and len(set(chosen)) == 3 and row not in chosen
        same_day += any(records[c]["metadata"]["date"] == records[row]["metadata"]["date"]
                        for c in chosen)
    assert same_day > 0


def test_easy_distractors_are_another_day_and_payee(corpus):
    records, _, _ = corpus
    table = reader_corpus.Distractors(records)
    rng = random.Random(0)
    day = lambda r: reader_corpus._date(records[r]).toordinal()  # noqa: E731
    for row in range(0, len(records), 7):
        chosen = table.sample(row, 3, rng, easy=True)
        assert len(chosen) == 3 and len(set(chosen)) == 3 and row not in chosen
        payee = records[row]["metadata"].get("payee")
        for c in chosen:
            assert abs(day(c) - day(row)) >= 7, (row, c)
            assert not payee or records[c]["metadata"].get("payee") != payee, (row, c)


def test_reading_rows_put_the_source_at_a_random_position(corpus):
    records, vocabulary, tokenized = corpus
    pool = tokenized.pools["read"]
    rng = random.Random(0)
    positions = []
    for index in range(0, len(pool), max(1, len(pool) // 80)):
        inputs, position = tokenized.reading_row(pool, index, 4, 160, rng)
        positions.append(position)
        source = records[int(pool.source[index])]
        text = vocabulary.decode([int(t) for t in inputs[position] if t > 1])
        assert text.startswith("question: ") and "answer: <extra_id_0>" in text
        assert source["title"] in text
    assert set(positions) == {0, 1, 2, 3}


def test_span_corruption_and_prefix_lm_rebuild_the_entry(corpus):
    _, _, tokenized = corpus
    rng = np.random.default_rng(0)
    sentinels = set(tokenized.sentinels)
    for tokens in tokenized.texts[0][:40]:
        tokens = tokens[:60]
        inputs, targets = tokenized.span_corruption(tokens, 96, 48, rng)
        ins = list(inputs[:list(inputs).index(1)])
        outs = list(targets[:list(targets).index(1)])
        spans, current = {}, None
        for t in outs:
            if t in sentinels:
                current = t
                spans[t] = []
            else:
                spans[current].append(t)
        rebuilt = [x for t in ins for x in (spans[t] if t in sentinels else [t])]
        assert rebuilt == list(tokens)
        assert 0 < sum(len(v) for v in spans.values()) < len(tokens)
        prefix, rest = tokenized.prefix_lm(tokens, 96, 48, rng)
        joined = list(prefix[:list(prefix).index(1)]) + list(rest[:list(rest).index(1)])
        assert joined == list(tokens)


def test_batches_are_a_function_of_seed_and_step(corpus):
    _, _, tokenized = corpus
    sizes = reader_batches.BatchSizes(batch_size=4, lm_batch_size=2)
    a, b = tokenized.batch(5, 0, sizes), tokenized.batch(5, 0, sizes)
    c = tokenized.batch(6, 0, sizes)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert a["inputs"].shape == (4, 4, 128) and a["lm_inputs"].shape == (2, 1, 96)
    # Every target starts with the sentinel and ends with EOS.
    assert (a["targets"][:, 0] == tokenized.sentinels[0]).all()
    assert ((a["targets"] == 1).sum(axis=1) == 1).all()


def test_curriculum_starts_alone_then_adds_distractors(corpus):
    _, _, tokenized = corpus
    sizes = reader_batches.BatchSizes(batch_size=8, lm_batch_size=1, alone_steps=10,
                                      ramp_steps=10, full_fraction=0.75)
    rng = random.Random(0)
    assert {sizes.distractors(step, rng) for step in range(10) for _ in range(20)} == {0}
    late = [sizes.distractors(50, rng) for _ in range(2000)]
    assert 0.75 < late.count(3) / len(late) < 0.85        # 0.75 full + 0.25 x 1/4
    middle = [sizes.distractors(14, rng) for _ in range(2000)]
    assert late.count(3) > middle.count(3) > 0
    # rows past the source and its distractors are empty
    early = tokenized.batch(0, 0, sizes)["inputs"]
    assert ((early != 0).any(axis=2).sum(axis=1) == 1).all()
    full = tokenized.batch(60, 0, sizes)["inputs"]
    assert ((full != 0).any(axis=2).sum(axis=1) > 1).any()


def test_easy_stage_then_a_share_of_easy_examples(corpus):
    records, _, tokenized = corpus
    sizes = reader_batches.BatchSizes(batch_size=8, lm_batch_size=1, alone_steps=5,
                                      easy_steps=10, easy_fraction=0.25)
    rng = random.Random(0)
    assert not any(sizes.easy(step, rng) for step in range(5))
    assert all(sizes.easy(step, rng) for step in range(5, 15) for _ in range(20))
    late = [sizes.easy(40, rng) for _ in range(4000)]
    assert 0.22 < sum(late) / len(late) < 0.28
    # Easy draws never share the source's day; hard ones do.
    sources = tokenized.pools["read"].source
    pool = tokenized.pools["read"]
    same_day = {True: 0, False: 0}
    for easy in (True, False):
        rng = random.Random(1)
        for index in range(0, len(pool), max(1, len(pool) // 200)):
            ledger_rows = tokenized.distractors[0].sample(int(sources[index]), 3, rng, easy)
            same_day[easy] += any(records[r]["metadata"]["date"] ==
                                  records[int(sources[index])]["metadata"]["date"]
                                  for r in ledger_rows)
    assert same_day[True] == 0 < same_day[False]
    # The batches use them: in the easy stage the rows of an example are seldom within a
    # week of each other (only distractor pairs can be); with hard distractors most are.
    import datetime
    import re

    def close_share(step, sizes):
        inputs = tokenized.batch(step, 0, sizes)["inputs"]
        hits = []
        for example in inputs:
            days = [datetime.date.fromisoformat(re.search(
                r"title: (\d{4}-\d\d-\d\d)", tokenized.vocabulary.decode(
                    [int(t) for t in row if t > 1])).group(1)).toordinal()
                    for row in example if row.any()]
            hits.append(any(abs(d - e) < 7 for i, d in enumerate(days) for e in days[i + 1:]))
        return float(np.mean(hits))
    staged = reader_batches.BatchSizes(batch_size=64, lm_batch_size=1, easy_steps=10)
    print("close share easy / hard", close_share(3, staged), close_share(30, staged))
    assert close_share(3, staged) < 0.4 < 0.8 < close_share(30, staged)
    # Without an easy stage or share, the rng stream (and so every batch) is unchanged.
    plain = reader_batches.BatchSizes(batch_size=8, lm_batch_size=1, alone_steps=5)
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert not any(plain.easy(s, rng_a) for s in range(50))
    assert rng_a.random() == rng_b.random()


def test_cued_copy_targets_what_follows_the_cue_in_the_input(corpus):
    _, _, tokenized = corpus
    rng = np.random.default_rng(0)
    head, tail = list(tokenized.copy_head), list(tokenized.copy_tail)
    for tokens in tokenized.texts[0][:40]:
        inputs, targets = tokenized.cued_copy(tokens, 96, 48, rng, cue=4)
        ins = list(inputs[:list(inputs).index(1)])
        outs = list(targets[:list(targets).index(1)])
        assert ins[:len(head)] == head
        cue = ins[len(head):len(head) + 4]
        assert ins[len(head) + 4:len(head) + 4 + len(tail)] == tail
        entry = ins[len(head) + 4 + len(tail):]
        assert entry == list(tokens[:len(entry)]) and len(outs) > 0
        # the target is the entry's continuation of the cue, every token of it in the input
        starts = [i for i in range(len(entry) - 3) if entry[i:i + 4] == cue]
        assert any(entry[i + 4:i + 4 + len(outs)] == outs for i in starts)


def test_copy_fraction_mixes_cued_copies_into_the_lm_rows(corpus):
    _, _, tokenized = corpus
    head = list(tokenized.copy_head)
    def copies(fraction):
        sizes = reader_batches.BatchSizes(batch_size=1, lm_batch_size=16,
                                          copy_fraction=fraction, span_fraction=0.3)
        rows = np.concatenate([tokenized.batch(s, 0, sizes)["lm_inputs"][:, 0]
                               for s in range(10)])
        return sum(list(r[:len(head)]) == head for r in rows) / len(rows)
    assert copies(0.0) == 0.0
    assert 0.3 < copies(0.4) < 0.5

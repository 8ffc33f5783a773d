"""`atlas-jax data list|ledger` through the CLI entry point."""
import json

from atlas_jax import cli


def test_data_list_names_every_task(capsys):
    assert cli.main(["data", "list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"ledger_qa", "ledger_mlm", "jsonl_qa", "natural_questions_open", "trivia_qa",
            "passages_mlm", "passages_prefix_lm", "jsonl_multiple_choice"} <= set(names)


def test_data_ledger_writes_the_folder(tmp_path, capsys):
    out = tmp_path / "ledger"
    assert cli.main(["data", "ledger", "--seed", "3", "--start", "2022-01-01", "--end",
                     "2022-04-30", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "2022-01-01" < summary["args"]["cutoff"] <= "2022-04-30"
    for name in ("ledger.beancount", "passages.jsonl", "qa_train.jsonl", "qa_dev.jsonl",
                 "qa_test.jsonl", "qa_new.jsonl", "qa_train_64.jsonl", "summary.json"):
        assert (out / name).exists(), name


def test_data_ledger_bad_dates_exit_2(tmp_path, capsys):
    assert cli.main(["data", "ledger", "--start", "2022-13-01", "--out",
                     str(tmp_path / "x")]) == 2
    assert "2022-13-01" in capsys.readouterr().err


def test_data_ledger_never_writes_into_a_users_folder(tmp_path, capsys):
    books = tmp_path / "books"
    books.mkdir()
    (books / "ledger.beancount").write_text("2020-01-01 open Assets:Cash\n")
    assert cli.main(["data", "ledger", "--start", "2022-01-01", "--end", "2022-04-30",
                     "--out", str(books)]) == 2
    assert "not an atlas-jax ledger-qa folder" in capsys.readouterr().err
    assert (books / "ledger.beancount").read_text() == "2020-01-01 open Assets:Cash\n"

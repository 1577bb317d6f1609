"""The results writer (`pyggml_resnet.results`): batches of rows -> Parquet, CSV or JSON lines, by suffix.

Rows are built here by hand, as a `Predictor` returns them (good rows and error rows, classify's lists and
float32 vectors), and each file is read back with the format's own reader.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pyggml_resnet import results
from pyggml_resnet.errors import InputError


def objects(items) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def classify_batch(paths, errors):
    """A classify batch: top-2 lists for good rows, empty lists for error rows (as Predictor fills them)."""
    good = [e is None for e in errors]
    return {"path": objects(paths),
            "labels": objects([["cat", "dog"] if g else [] for g in good]),
            "indices": objects([[3, 7] if g else [] for g in good]),
            "probs": objects([[0.75, 0.125] if g else [] for g in good]),
            "error": objects(errors)}


VECTORS = np.array([[1 / 3, -2.5e-8, 3.4028235e38], [np.nan] * 3], np.float32)  # the second row is an error row


def features_batch():
    return {"path": objects(["a.jpg", "bad.jpg"]), "features": VECTORS.copy(),
            "error": objects([None, "bad.jpg: cannot identify image file"])}


@pytest.mark.parametrize("name", ["r.txt", "r", "r.json"])
def test_suffix_picks_the_format(tmp_path, name):
    assert results.format_of("R.CSV") == "csv" and results.format_of("x/r.parquet") == "parquet"
    with pytest.raises(InputError, match="the output's suffix must be one of .parquet, .csv, .jsonl"):
        results.write([classify_batch(["a"], [None])], tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_csv(tmp_path):
    calls = []
    batches = [classify_batch(["a.jpg", "b.png"], [None, None]), {},  # Ray may hand over an empty block
               classify_batch(["c.gif"], ["c.gif: truncated"])]
    assert results.write(batches, tmp_path / "r.csv", progress=calls.append) == (3, 1)
    assert calls == [2, 1]
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [["path", "labels", "indices", "probs", "error"],
                    ["a.jpg", "cat|dog", "3|7", "0.75|0.125", ""], ["b.png", "cat|dog", "3|7", "0.75|0.125", ""],
                    ["c.gif", "", "", "", "c.gif: truncated"]]


def test_csv_vectors_restore_the_float32_exactly(tmp_path):
    results.write([features_batch()], tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    restored = np.array([float(v) for v in rows[0]["features"].split("|")], np.float32)
    assert np.array_equal(restored, VECTORS[0])  # 9 significant digits round-trip any float32
    assert rows[1]["features"] == "" and rows[1]["error"] == "bad.jpg: cannot identify image file"


def test_jsonl(tmp_path):
    # A block without errors may come back from Arrow with its all-null error column as NaN floats.
    batch = {**classify_batch(["a.jpg", "b.png"], [None, None]), "error": np.array([np.nan, np.nan])}
    results.write([batch, classify_batch(["c.gif"], ["c.gif: truncated"])], tmp_path / "r.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"path": "a.jpg", "labels": ["cat", "dog"], "indices": [3, 7], "probs": [0.75, 0.125],
                     "error": None},
                    {"path": "b.png", "labels": ["cat", "dog"], "indices": [3, 7], "probs": [0.75, 0.125],
                     "error": None},
                    {"path": "c.gif", "labels": None, "indices": None, "probs": None, "error": "c.gif: truncated"}]


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    results.write([features_batch()], tmp_path / "f.parquet")
    table = pq.read_table(tmp_path / "f.parquet")
    kind = table.schema.field("features").type
    assert kind.list_size == 3 and str(kind.value_type) == "float"  # fixed-size float32 lists
    rows = table.to_pylist()
    assert np.array_equal(np.array(rows[0]["features"], np.float32), VECTORS[0]) and rows[0]["error"] is None
    assert rows[1]["features"] is None and rows[1]["error"] == "bad.jpg: cannot identify image file"
    results.write([classify_batch(["a.jpg", "c.gif"], [None, "c.gif: truncated"])], tmp_path / "c.parquet")
    rows = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert rows[0] == {"path": "a.jpg", "labels": ["cat", "dog"], "indices": [3, 7], "probs": [0.75, 0.125],
                       "error": None}
    assert rows[1]["labels"] is None and rows[1]["error"] == "c.gif: truncated"


def test_failure_midway_keeps_the_old_file(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("yesterday's results\n")

    def batches():
        yield classify_batch(["a.jpg"], [None])
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError):
        results.write(batches(), out)
    assert out.read_text() == "yesterday's results\n" and [p.name for p in tmp_path.iterdir()] == ["r.csv"]


@pytest.mark.parametrize("errors, code", [([None, "b: bad"], 0), (["a: bad", "b: bad"], 1)])
def test_write_results_reports_and_returns_the_exit_code(tmp_path, capsys, errors, code):
    out = tmp_path / "r.jsonl"
    assert results.write_results(iter([classify_batch(["a", "b"], errors)]), str(out), 2) == code
    err = capsys.readouterr().err
    assert f"wrote 2 rows to {out}" in err
    assert ("error: none of the 2 image file(s) could be read" in err) == (code == 1)
    assert len(out.read_text().splitlines()) == 2

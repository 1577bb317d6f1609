"""Result rows (batches of columns, as `pyggml_resnet.ray.Predictor` returns them) -> a Parquet, CSV or JSON
lines file chosen by the output path's suffix, written through `atomic.replacing`, so a failed or interrupted
run (SIGTERM included) never leaves a half-written file or a temporary one.

Columns: path, then labels/indices/probs (classify), logits or features, then error (null for good rows).
Parquet keeps lists as lists and vectors as fixed-size float32 lists (null for error rows); CSV joins a
list's items with "|" as the CLI's classify output does (vectors written with 9 significant digits, enough
to restore the float32 exactly); JSON lines write lists as arrays and null for an error row's results.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from . import atomic
from .errors import InputError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}
LIST_COLUMNS = ("labels", "indices", "probs")
VECTOR_COLUMNS = ("logits", "features")


def format_of(path: str | os.PathLike) -> str:
    """"parquet", "csv" or "jsonl" from the suffix; InputError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: the output's suffix must be one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def write(batches: Iterable[dict[str, np.ndarray]], out: str | os.PathLike, progress=None) -> tuple[int, int]:
    """Writes every batch's rows to `out`; returns (rows, error rows). `progress(n)` is called per batch."""
    out = Path(out)
    fmt = format_of(out)
    rows = errors = 0
    text = {} if fmt == "parquet" else {"newline": "", "encoding": "utf-8"}
    with atomic.replacing(out) as tmp, open(tmp, "wb" if fmt == "parquet" else "w", **text) as f:
        writer = None
        for batch in batches:
            n = len(batch.get("path", ()))
            if n == 0:  # Ray may hand over an empty block, without columns
                continue
            # A block without errors may come back from Arrow with its all-null error column as NaN floats.
            batch = {**batch, "error": np.array([e if isinstance(e, str) else None for e in batch["error"]],
                                                dtype=object)}
            if fmt == "parquet":
                table = _arrow_table(batch)
                if writer is None:
                    import pyarrow.parquet as pq

                    writer = pq.ParquetWriter(f, table.schema)
                writer.write_table(table)
            else:
                for row in _rows(batch):
                    if fmt == "jsonl":
                        f.write(json.dumps(row) + "\n")
                    else:
                        if writer is None:
                            writer = csv.writer(f)
                            writer.writerow(list(row))
                        writer.writerow([_csv_cell(v) for v in row.values()])
            rows += n
            errors += sum(e is not None for e in batch["error"])
            if progress:
                progress(n)
        if fmt == "parquet" and writer is not None:
            writer.close()
    return rows, errors


def write_results(batches, out: str, total: int) -> int:
    """`classify --out` (in this process or on Ray): the rows go through `write`, so the file appears whole or
    not at all, with a progress bar and a summary on stderr; returns the exit code (1 if no image was read)."""
    from tqdm import tqdm

    # Redrawn at every batch (one image by default): a forward pass takes longer than tqdm's default interval.
    with tqdm(total=total, unit="img", file=sys.stderr, mininterval=0) as bar:
        written, errors = write(batches, out, progress=bar.update)
    print(f"wrote {written} rows to {out}"
          + (f"; {errors} unreadable file(s), see the error column" if errors else ""), file=sys.stderr)
    if errors == written:
        print(f"error: none of the {written} image file(s) could be read", file=sys.stderr)
        return 1
    return 0


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict]:
    """One dict per row, in the batch's column order, with plain Python values (None for missing results)."""
    for i, error in enumerate(batch["error"]):
        row = {}
        for name, column in batch.items():
            value = column[i]
            if name in VECTOR_COLUMNS:
                value = None if error is not None else [float(v) for v in value]
            elif name in LIST_COLUMNS:
                value = None if error is not None else list(value)
            row[name] = value
        yield row


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "|".join(f"{v:.9g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _arrow_table(batch: dict[str, np.ndarray]):
    import pyarrow as pa

    errors = np.array([e is not None for e in batch["error"]])
    columns = {}
    for name, column in batch.items():
        if name in VECTOR_COLUMNS:
            vectors = np.asarray(column, np.float32)
            flat = pa.array(vectors.reshape(-1), pa.float32())
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1], mask=pa.array(errors))
        elif name in LIST_COLUMNS:
            item = {"labels": pa.string(), "indices": pa.int64(), "probs": pa.float64()}[name]
            columns[name] = pa.array([None if bad else list(v) for v, bad in zip(column, errors)],
                                     pa.list_(item))
        else:
            columns[name] = pa.array(list(column), pa.string())
    return pa.table(columns)

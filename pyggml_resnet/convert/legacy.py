"""The design document's legacy headerless ``.bin`` (the C++ ResNet-101 example this project started from):
one record per state_dict entry, in order, each an int32 n_dims, n_dims int32 dims in ggml (reversed) order
and raw float32 data, every tensor ``.squeeze()``d. It has no names, so the architecture is recognised from
the record count and shapes (or given by ``arch``)."""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import numpy as np

from ..arch import CONFIGS, ResNetConfig, expected_tensors
from ..errors import ModelFormatError

LEGACY_MAGIC = 0x67676D6C  # "ggml" as a little-endian int32: the first 4 bytes of a legacy .bin
NUM_BATCHES_TRACKED = "num_batches_tracked"


def is_legacy_bin(head: bytes) -> bool:
    return len(head) >= 4 and struct.unpack("<i", head[:4])[0] == LEGACY_MAGIC


@dataclasses.dataclass(frozen=True)
class _Record:
    shape: tuple[int, ...]  # squeezed, PyTorch order
    offset: int  # of the data
    end: int  # of the data


@dataclasses.dataclass(frozen=True)
class _Expected:
    cfg: ResNetConfig
    name: str
    shape: tuple[int, ...]  # squeezed, as the legacy converter wrote it

    def __str__(self):
        return f"{self.name} {self.shape}"


def load_legacy_bin(path: Path, cfg: ResNetConfig | None) -> dict[str, np.ndarray]:
    buf = path.read_bytes()
    records, bad_header = _read_legacy_records(buf)
    layout = _match_legacy_layout(path, buf, records, bad_header, [cfg] if cfg else list(CONFIGS.values()))
    state = {}
    for (name, shape), rec in zip(layout.items(), records):
        if name.endswith(NUM_BATCHES_TRACKED):
            continue
        # The legacy converter squeezed every tensor; the element order is unchanged, so reshape restores it.
        data = np.frombuffer(buf, dtype="<f4", count=(rec.end - rec.offset) // 4, offset=rec.offset)
        state[name] = data.astype(np.float32).reshape(shape)
    return state


def _read_legacy_records(buf: bytes) -> tuple[list[_Record], str | None]:
    """Every well-formed record header from after the magic to EOF, and why parsing stopped early (or None).

    Each header is checked before its data is touched, so a corrupt file cannot make us read past its end.
    The record at index len(records) is the one `bad_header` describes."""
    records: list[_Record] = []
    off, size = 4, len(buf)
    while off < size:
        if size - off < 4:
            return records, f"{size - off} stray bytes where a record header should start"
        (n_dims,) = struct.unpack_from("<i", buf, off)
        if not 0 <= n_dims <= 4:
            return records, f"header says n_dims = {n_dims}, expected 0..4"
        if size - off - 4 < 4 * n_dims:
            return records, "the file ends inside the record header"
        dims = struct.unpack_from(f"<{n_dims}i", buf, off + 4)
        if any(d < 1 for d in dims):
            return records, f"header has dims {list(dims)}, every dimension must be positive"
        start = off + 4 + 4 * n_dims
        nbytes = 4 * math.prod(dims)  # Python ints: no overflow however large the dims claim to be
        if nbytes > size - start:
            return records, (f"header has dims {list(dims)} ({nbytes} bytes of data) but only "
                             f"{size - start} bytes are left in the file (truncated?)")
        records.append(_Record(tuple(reversed(dims)), start, start + nbytes))
        off = start + nbytes
    return records, None


def _legacy_layout(cfg: ResNetConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The torchvision state_dict of `cfg` in order, num_batches_tracked included (the legacy format has a
    record for each), with full PyTorch shapes."""
    layout = {}
    for name, shape in expected_tensors(cfg, num_classes).items():
        layout[name] = shape
        if name.endswith(".running_var"):  # BatchNorm's last tensor, followed by its counter
            layout[name[: -len("running_var")] + NUM_BATCHES_TRACKED] = ()
    return layout


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _legacy_num_classes(cfg: ResNetConfig, records: list[_Record], fc_index: int) -> int:
    """num_classes as read off the fc.weight record (squeezed (num_classes, features) or (features,))."""
    if fc_index < len(records):
        n = math.prod(records[fc_index].shape)
        if n % cfg.feature_dim == 0:
            return n // cfg.feature_dim
    return 1000  # only used to word an error message: the file has no usable fc.weight


def _match_legacy_layout(path, buf, records, bad_header, cfgs) -> dict[str, tuple[int, ...]]:
    """The layout (name -> full shape) of the one candidate config the records match exactly.

    Otherwise report where the file stops matching: at the record where the best candidate(s) fail, naming
    the tensor they expect there."""
    failures = []  # (index of the first record that does not match, expected there, why)
    for cfg in cfgs:
        n_records = len(_legacy_layout(cfg, 1))
        layout = _legacy_layout(cfg, _legacy_num_classes(cfg, records, n_records - 2))
        expected = [_Expected(cfg, name, _squeezed(shape)) for name, shape in layout.items()]
        k = 0
        while k < min(len(records), len(expected)) and records[k].shape == expected[k].shape:
            k += 1
        if k == len(expected):
            trailing = len(buf) - records[k - 1].end
            if trailing:
                raise ModelFormatError(f"{path}: {trailing} bytes of trailing data after record {k - 1} "
                                       f"({expected[k - 1].name}), the last tensor of {cfg.name}")
            return layout
        if k < len(records):
            why = f"shape {records[k].shape} does not match"
        elif bad_header is not None:
            why = f"{bad_header}; expected"
        else:
            why = f"the file ends after {k} records; expected next"
        failures.append((k, expected[k], why))
    k = max(f[0] for f in failures)
    best = [f for f in failures if f[0] == k]
    # The candidates that got furthest may disagree on what comes next; name each expectation once.
    alternatives: dict[str, list[str]] = {}
    for _, exp, _ in best:
        alternatives.setdefault(str(exp), []).append(exp.cfg.name)
    expected_text = " or ".join(f"{e} ({'/'.join(names)})" for e, names in alternatives.items())
    why = best[0][2]  # the same for all of them: it depends only on the records
    raise ModelFormatError(f"{path}: legacy .bin record {k}: {why} {expected_text}")

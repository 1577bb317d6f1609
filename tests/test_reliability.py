"""Issue 5, "never crash, never lose data": every kind of bad input, and what happens to it.

ggml reports misuse by calling abort(), which would take the interpreter (and this test run) down with it,
so each test here feeds the package something broken and checks that it raises the documented exception
while the process carries on. docs/reliability.md lists every case and its outcome.

* model files: a corpus of malformed GGUF files (truncations, every header field, metadata keys of the wrong
  type or value, hostile lengths and counts, bad tensor entries, NaN/Inf weights) -> ModelFormatError;
* images through Model.classify: garbage, truncated, empty and decompression-bomb files -> InputError;
  unusual modes classify normally;
* arrays through logits/features/stages: wrong rank, channels, dtype, size, NaN -> InputError; empty
  batches, tiny images, non-contiguous and non-float32 arrays work;
* threads, native memory and close(); and a converter killed with SIGKILL mid-write.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import io
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from PIL import Image

import pyggml_resnet
from pyggml_resnet import InputError, ModelFormatError, arch, convert, loader
from pyggml_resnet.arch import Key

T = gguf.GGUFValueType
FMT = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i", T.FLOAT32: "f",
       T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}
F16, BF16, Q4_0, Q8_0 = 1, 30, 2, 8
U64 = 2**64 - 1
SMALL_PRE = arch.Preprocessing(resize=36, crop=32)  # classify at 32x32: fast


# ----------------------------------------------------------------------------------------------------------
# A GGUF writer that writes whatever it is told, wrong or not


@dataclass(frozen=True)
class Raw:
    """Bytes written as they are, in place of an encoded value (hostile lengths, unknown types)."""

    data: bytes


@dataclass
class KV:
    key: str | bytes | Raw
    vtype: int
    value: object
    sub: int | None = None  # item type of an ARRAY


@dataclass
class TI:
    name: str | bytes | Raw
    ne: tuple[int, ...]  # ggml order
    ttype: int
    offset: int  # relative to the data section
    n_dims: int | None = None  # default len(ne)


def _string(s) -> bytes:
    if isinstance(s, Raw):
        return s.data
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype, value, sub=None) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if vtype == T.STRING:
        return _string(value)
    if vtype == T.ARRAY:
        return struct.pack("<IQ", sub, len(value)) + b"".join(_value(sub, v) for v in value)
    return struct.pack("<" + FMT[vtype], value)


@dataclass
class Gguf:
    """A GGUF file as parts: edit them, then `bytes()`. Counts default to the real ones."""

    kv: list[KV]
    ti: list[TI]
    data: bytes  # the data section, from its (aligned) start
    magic: bytes = b"GGUF"
    version: int = 3
    n_ti: int | None = None
    n_kv: int | None = None
    alignment: int = 32
    meta_len: int = field(default=0, init=False)

    def meta(self) -> bytes:
        head = self.magic + struct.pack("<IQQ", self.version, len(self.ti) if self.n_ti is None else self.n_ti,
                                        len(self.kv) if self.n_kv is None else self.n_kv)
        kv = b"".join(_string(e.key) + struct.pack("<I", e.vtype) + _value(e.vtype, e.value, e.sub) for e in self.kv)
        ti = b"".join(_string(t.name) + struct.pack("<I", len(t.ne) if t.n_dims is None else t.n_dims)
                      + struct.pack(f"<{len(t.ne)}Q", *t.ne) + struct.pack("<IQ", t.ttype, t.offset) for t in self.ti)
        return head + kv + ti

    def bytes(self) -> bytes:
        meta = self.meta()
        return meta + b"\0" * (-len(meta) % self.alignment) + self.data

    # editing helpers
    def get(self, key) -> KV:
        return next(e for e in self.kv if e.key == key)

    def set(self, key, vtype, value, sub=None):
        for e in self.kv:
            if e.key == key:
                e.vtype, e.value, e.sub = vtype, value, sub
                return
        self.kv.append(KV(key, vtype, value, sub))

    def drop(self, key):
        self.kv = [e for e in self.kv if e.key != key]

    def tensor(self, name) -> TI:
        return next(t for t in self.ti if t.name == name)

    def drop_tensor(self, name):
        self.ti = [t for t in self.ti if t.name != name]

    def poke(self, name, index, packed: bytes):
        """Overwrite bytes of tensor `name`'s data, `index` bytes into it."""
        at = self.tensor(name).offset + index
        self.data = self.data[:at] + packed + self.data[at + len(packed):]


def parse_with_gguf(path: Path) -> Gguf:
    """A real file as a Gguf, read with gguf's own reader (fine on a trusted file); checked to re-encode to
    the same bytes, so edits change only what they say."""
    r = gguf.GGUFReader(path)
    kv = [KV(f.name, f.types[0], f.contents(), f.types[1] if f.types[0] == T.ARRAY else None)
          for f in r.fields.values() if not f.name.startswith("GGUF.")]
    ti = [TI(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset) - r.data_offset)
          for t in r.tensors]
    raw = path.read_bytes()
    g = Gguf(kv, ti, raw[r.data_offset:])
    assert g.bytes() == raw, "the test's GGUF writer does not reproduce the file"
    return g


@pytest.fixture(autouse=True)
def _drop_big_files(tmp_path):
    """Tests here write model files of 22 to 180 MB, and pytest keeps the last three runs' temporary
    directories: delete what takes real disk space once each test is done (sparse files take none)."""
    yield
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.stat().st_blocks * 512 > 1 << 20:
            p.unlink()


@pytest.fixture(scope="module")
def r18(model_files):
    """(reference torch model, .pth, .gguf) of the seeded resnet18 with 10 classes, f32."""
    return model_files(18, 10)


@pytest.fixture(scope="module")
def corpus(model_files):
    """dtype -> the resnet18 (10 classes) file of that dtype as a Gguf."""
    cache = {}

    def get(dtype="f32") -> Gguf:
        if dtype not in cache:
            cache[dtype] = parse_with_gguf(model_files(18, 10, dtype)[2])
        return copy.deepcopy(cache[dtype])
    return get


def write(tmp_path, data: bytes | Gguf, name="bad.gguf", *, sparse=False, size=None) -> Path:
    """Writes bytes, or a Gguf. `sparse`: the data section as a hole of zeros, for files refused before any
    weight is read (the same size and layout, without writing 45 MB per case); `size`: cut the file there."""
    path = tmp_path / name
    if isinstance(data, Gguf):
        meta = data.meta()
        head = meta + b"\0" * (-len(meta) % data.alignment)
        total = len(head) + len(data.data) if size is None else size
        with open(path, "wb") as f:
            f.write(head[:total])
            if sparse:
                f.truncate(total)
            else:
                f.write(data.data[:max(total - len(head), 0)])
    else:
        path.write_bytes(data)
    return path


def refused(path, match=None) -> str:
    """load(path) must raise ModelFormatError (matching `match`); returns the message."""
    with pytest.raises(ModelFormatError) as e:
        pyggml_resnet.load(path, threads=1)
    if match:
        assert re.search(match, str(e.value)), str(e.value)
    return str(e.value)


def test_corpus_writer_round_trips_and_the_file_loads(corpus, tmp_path):
    for dtype in ("f32", "f16"):
        with pyggml_resnet.load(write(tmp_path, corpus(dtype).bytes()), threads=1) as m:
            assert m.logits(np.zeros((1, 3, 8, 8), np.float32)).shape == (1, 10)


# ----------------------------------------------------------------------------------------------------------
# Model files: truncation


def test_truncated_anywhere(corpus, tmp_path):
    """Every byte of the first 64 and 44 cuts spread over the header, metadata, tensor table and data."""
    g = corpus()
    good_size = len(g.meta()) + -len(g.meta()) % 32 + len(g.data)
    kv_start = 24
    ti_start = len(g.meta()) - len(Gguf([], g.ti, b"").meta()) + 24
    meta_end = len(g.meta())
    data_start = good_size - len(g.data)
    last_end = data_start + max(t.offset + int(np.prod(t.ne)) * 4 for t in g.ti)
    assert good_size - 32 < last_end < good_size  # the writer pads the last tensor too; those bytes are spare
    cuts = set(range(64))
    for lo, hi, n in ((kv_start, ti_start, 12), (ti_start, meta_end, 12), (data_start, last_end, 16)):
        cuts |= {int(c) for c in np.linspace(lo, hi, n, endpoint=False)}
    cuts |= {ti_start - 1, meta_end - 1, meta_end, data_start - 1, data_start, data_start + 1, last_end - 1}
    assert len(cuts) >= 64 + 40
    for cut in sorted(cuts):
        refused(write(tmp_path, g, "cut.gguf", sparse=True, size=cut), r"truncated|ends inside")


# ----------------------------------------------------------------------------------------------------------
# Model files: the header


def _header(g, **changes):
    for k, v in changes.items():
        setattr(g, k, v)


@pytest.mark.parametrize("changes, match", [
    (dict(magic=b"GGUG"), r"not a GGUF file \(it starts with b'GGUG'"),
    (dict(magic=b"FUGG"), "not a GGUF file"),
    (dict(magic=b"\0\0\0\0"), "not a GGUF file"),
    (dict(version=1), "GGUF version 1 is not supported"),
    (dict(version=4), "GGUF version 4 is not supported"),
    (dict(version=0), "GGUF version 0 is not supported"),
    (dict(version=2**32 - 1), "GGUF version 4294967295 is not supported"),
    (dict(version=3 << 24), "big-endian GGUF file"),
    (dict(n_ti=U64), "claims 18446744073709551615 tensors"),
    (dict(n_ti=2**63), "claims 9223372036854775808 tensors"),
    (dict(n_ti=4097), "claims 4097 tensors, more than the 4096"),
    (dict(n_kv=U64), "claims 18446744073709551615 metadata keys"),
    (dict(n_kv=2**40), "metadata keys"),
    (dict(n_ti=0), r"missing \['conv1.weight', .*\] and 97 more$"),
    (dict(n_ti=101), r"tensors do not match resnet18 with 10 classes: missing \['fc.bias'\]$"),
    (dict(n_ti=103), r": unexpected \[''\]$"),  # the padding read as a tensor with an empty name
    (dict(n_kv=0), "tensor 'general.architecture' claims 8 dimensions"),  # the metadata read as tensors
    (dict(n_kv=15), r"tensor|claims|ends inside|type"),
    (dict(n_kv=17), r"metadata key|claims|ends inside|type"),
], ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else None)
def test_bad_header(corpus, tmp_path, changes, match):
    g = corpus()
    assert len(g.kv) == 16 and len(g.ti) == 102
    _header(g, **changes)
    refused(write(tmp_path, g, sparse=True), match)


def test_version_2_is_the_same_layout_and_loads(corpus, tmp_path):
    g = corpus()
    g.version = 2
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with pyggml_resnet.load(write(tmp_path, g.bytes(), "v2.gguf"), threads=1) as a, \
            pyggml_resnet.load(write(tmp_path, corpus().bytes(), "v3.gguf"), threads=1) as b:
        assert np.array_equal(a.logits(x), b.logits(x))


# ----------------------------------------------------------------------------------------------------------
# Model files: the metadata section (hostile lengths and types)


def _kv0(g) -> KV:
    return g.kv[0]


HOSTILE_KV = {
    "key-length-2^63": (lambda g: setattr(_kv0(g), "key", Raw(struct.pack("<Q", 2**63))),
                        r"the name of metadata key 0 claims 9223372036854775808 bytes"),
    "key-length-max": (lambda g: setattr(_kv0(g), "key", Raw(struct.pack("<Q", U64))), r"claims 18446744073709551615"),
    "key-length-1025": (lambda g: setattr(_kv0(g), "key", "k" * 1025), r"claims 1025 bytes, more than the 1024"),
    "key-not-utf8": (lambda g: setattr(_kv0(g), "key", b"\xff\xfe"), "not valid UTF-8"),
    "value-type-13": (lambda g: g.set(Key.ARCH, 13, Raw(b"resnet")), "'general.architecture' has unknown value type 13"),
    "value-type-max": (lambda g: g.set(Key.ARCH, 2**32 - 1, Raw(b"")), "unknown value type 4294967295"),
    "string-length-2^63": (lambda g: g.set(Key.BLOCK, T.STRING, Raw(struct.pack("<Q", 2**63))),
                           r"'resnet.block' claims 9223372036854775808 bytes"),
    "string-length-2MiB": (lambda g: g.set(Key.WEIGHTS, T.STRING, Raw(struct.pack("<Q", 2 << 20))),
                           r"claims 2097152 bytes, more than the 1048576"),
    "string-not-utf8": (lambda g: g.set(Key.BLOCK, T.STRING, b"basic\xff"), "not valid UTF-8"),
    "array-2^40-uint8": (lambda g: g.set("general.junk", T.ARRAY, Raw(struct.pack("<IQ", T.UINT8, 2**40))),
                         r"'general.junk' claims 1099511627776 items"),
    "array-max-strings": (lambda g: g.set(Key.LABELS, T.ARRAY, Raw(struct.pack("<IQ", T.STRING, U64))),
                          r"claims 18446744073709551615 items"),
    "array-2^20+1": (lambda g: g.set("general.junk", T.ARRAY, Raw(struct.pack("<IQ", T.UINT8, 2**20 + 1))),
                     r"claims 1048577 items, more than the 1048576"),
    "array-of-arrays": (lambda g: g.set("general.junk", T.ARRAY, Raw(struct.pack("<IQ", T.ARRAY, 1)
                                                                        + struct.pack("<IQ", T.UINT8, 0))),
                        "array of arrays"),
    "deeply-nested-arrays": (lambda g: g.set(Key.LAYERS, T.ARRAY, Raw(struct.pack("<IQ", T.ARRAY, 1) * 50_000)),
                             "array of arrays"),
    "array-item-type-99": (lambda g: g.set(Key.MEAN, T.ARRAY, Raw(struct.pack("<IQ", 99, 3))),
                           "array of unknown value type 99"),
    "duplicate-key": (lambda g: g.kv.append(KV("general.architecture", T.STRING, "resnet")),
                      "'general.architecture' appears twice"),
    "string-item-length-2^62": (lambda g: g.set(Key.LABELS, T.ARRAY, Raw(struct.pack("<IQQ", T.STRING, 10, 2**62))),
                                r"item 0 of metadata key 'resnet.class_labels' claims 4611686018427387904"),
}


def test_more_strings_than_the_file_can_hold(corpus, tmp_path):
    g = corpus()
    g.set(Key.LABELS, T.ARRAY, Raw(struct.pack("<IQ", T.STRING, 2**20)))
    g.data = b""  # a small file: a million 8-byte lengths cannot fit
    refused(write(tmp_path, g.bytes()), "claims 1048576 strings, more than the rest of the file can hold")


def test_metadata_section_limit(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "_MAX_META_BYTES", 4096)
    refused(write(tmp_path, corpus(), sparse=True), "larger than 4096 bytes")


def test_unknown_keys_are_skipped_even_large_ones(corpus, tmp_path):
    g = corpus()
    g.set("general.license", T.STRING, "x" * (1 << 20))
    g.set("general.blob", T.ARRAY, b"\1" * (1 << 20), sub=T.UINT8)
    g.set("general.words", T.ARRAY, ["w"] * 50_000, sub=T.STRING)
    g.set("general.flag", T.BOOL, True)
    with pyggml_resnet.load(write(tmp_path, g.bytes()), threads=1) as m:
        assert m.num_classes == 10


# ----------------------------------------------------------------------------------------------------------
# Model files: metadata values

REQUIRED = [Key.ARCH, Key.BLOCK, Key.LAYERS, Key.DEPTH, Key.NUM_CLASSES, Key.LABELS, Key.BN_EPS, Key.MEAN,
            Key.STD, Key.INTERPOLATION, Key.RESIZE, Key.CROP]


@pytest.mark.parametrize("key", REQUIRED)
def test_missing_required_key(corpus, tmp_path, key):
    g = corpus()
    g.drop(key)
    refused(write(tmp_path, g, sparse=True), f"missing metadata key '{re.escape(key)}'")


def test_optional_keys_may_be_absent(corpus, tmp_path):
    g = corpus()
    for key in (Key.NAME, Key.WIDTH, Key.GROUPS, Key.WEIGHTS):  # files from before groups had no such key
        g.drop(key)
    with pyggml_resnet.load(write(tmp_path, g.bytes()), threads=1) as m:
        assert m.weights_name == "custom"
        assert (m.config.groups, m.config.width_per_group) == (1, 64)


A = T.ARRAY
BAD_VALUES = [
    # general.architecture
    (Key.ARCH, T.STRING, "llama", None, "general.architecture is 'llama', expected 'resnet'"),
    (Key.ARCH, T.STRING, "", None, "general.architecture is ''"),
    (Key.ARCH, T.UINT32, 7, None, "'general.architecture' must be a STRING, got UINT32"),
    (Key.ARCH, A, ["resnet"], T.STRING, r"must be a STRING, got ARRAY\[STRING\]"),
    # wrong value types
    (Key.DEPTH, T.STRING, "18", None, "'resnet.depth' must be an integer, got STRING"),
    (Key.DEPTH, T.FLOAT32, 18.0, None, "must be an integer, got FLOAT32"),
    (Key.NUM_CLASSES, T.BOOL, True, None, "must be an integer, got BOOL"),
    (Key.LAYERS, T.UINT32, 2, None, "'resnet.layers' must be an ARRAY of integers, got UINT32"),
    (Key.LAYERS, A, ["2", "2", "2", "2"], T.STRING, r"ARRAY of integers, got ARRAY\[STRING\]"),
    (Key.LAYERS, A, [2.0] * 4, T.FLOAT32, r"got ARRAY\[FLOAT32\]"),
    (Key.LABELS, A, list(range(10)), T.UINT8, r"'resnet.class_labels' must be an ARRAY of strings, got ARRAY\[UINT8\]"),
    (Key.LABELS, T.STRING, "class_0", None, "ARRAY of strings, got STRING"),
    (Key.BN_EPS, T.STRING, "1e-5", None, "'resnet.batchnorm_eps' must be a FLOAT32 or FLOAT64, got STRING"),
    (Key.BN_EPS, T.UINT32, 0, None, "got UINT32"),
    (Key.MEAN, A, [0, 0, 0], T.UINT8, r"ARRAY of floats, got ARRAY\[UINT8\]"),
    (Key.STD, T.FLOAT32, 0.2, None, "ARRAY of floats, got FLOAT32"),
    (Key.BLOCK, T.UINT32, 1, None, "'resnet.block' must be a STRING, got UINT32"),
    (Key.INTERPOLATION, A, ["bilinear"], T.STRING, "must be a STRING"),
    (Key.RESIZE, T.STRING, "256", None, "must be an integer, got STRING"),
    (Key.CROP, T.FLOAT64, 224.0, None, "must be an integer, got FLOAT64"),
    # the layers list, block and depth
    (Key.LAYERS, A, [2, 2, 2], T.UINT32, r"must list 4 stages, got \[2, 2, 2\]"),
    (Key.LAYERS, A, [2, 2, 2, 2, 2], T.UINT32, "must list 4 stages"),
    (Key.LAYERS, A, [], T.UINT32, r"must list 4 stages, got \[\]"),
    (Key.LAYERS, A, [1] * 2**20, T.UINT8, r"must list 4 stages, got .* \(1048576 items\)"),
    (Key.LAYERS, A, [2, 2, 2, 3], T.UINT32, r"no torchvision ResNet has basic blocks \[2, 2, 2, 3\]"),
    (Key.LAYERS, A, [3, 4, 6, 3], T.UINT32, r"resnet.depth is 18 but the blocks describe resnet34"),
    (Key.LAYERS, A, [-2, 2, 2, 2], T.INT32, r"no torchvision ResNet has basic blocks \[-2, 2, 2, 2\]"),
    (Key.LAYERS, A, [U64] * 4, T.UINT64, "no torchvision ResNet"),
    (Key.BLOCK, T.STRING, "bottleneck", None, r"no torchvision ResNet has bottleneck blocks \[2, 2, 2, 2\]"),
    (Key.BLOCK, T.STRING, "", None, "resnet.block is '', expected 'basic' or 'bottleneck'"),
    (Key.BLOCK, T.STRING, "x" * 100_000, None, "resnet.block is 'xxxxxxxxxx.*', expected"),
    (Key.ARCH, T.STRING, "y" * 100_000, None, r"general.architecture is 'y{100}', expected 'resnet'$"),
    (Key.DEPTH, T.UINT32, 34, None, "resnet.depth is 34 but the blocks describe resnet18"),
    (Key.DEPTH, T.INT32, -18, None, "resnet.depth is -18"),
    (Key.DEPTH, T.UINT64, U64, None, "resnet.depth is 18446744073709551615"),
    # groups and width (a basic-block file: neither may differ from 1 and 64)
    (Key.GROUPS, T.STRING, "1", None, "'resnet.groups' must be an integer, got STRING"),
    (Key.GROUPS, T.UINT32, 0, None, r"'resnet.groups' must be an integer in 1..1024, got 0"),
    (Key.GROUPS, T.UINT64, U64, None, r"'resnet.groups' must be an integer in 1..1024, got 18446744073709551615"),
    (Key.WIDTH, T.INT32, -64, None, r"'resnet.width_per_group' must be an integer in 1..1024, got -64"),
    (Key.GROUPS, T.UINT32, 32, None, "basic blocks .* have groups 1 and width_per_group 64, got groups 32"),
    (Key.WIDTH, T.UINT32, 128, None, "basic blocks .* got groups 1 and width_per_group 128"),
    # num_classes and labels
    (Key.NUM_CLASSES, T.UINT32, 11, None, "resnet.class_labels must hold 11 strings, got 10"),
    (Key.NUM_CLASSES, T.UINT32, 9, None, "must hold 9 strings, got 10"),
    (Key.NUM_CLASSES, T.UINT32, 0, None, r"'resnet.num_classes' must be an integer in 1..1000000, got 0"),
    (Key.NUM_CLASSES, T.INT32, -1, None, "got -1"),
    (Key.NUM_CLASSES, T.UINT64, 2**40, None, "got 1099511627776"),
    (Key.NUM_CLASSES, T.UINT32, 2**32 - 1, None, "got 4294967295"),
    (Key.LABELS, A, [f"c{i}" for i in range(11)], T.STRING, "must hold 10 strings, got 11"),
    # batchnorm eps and preprocessing
    (Key.BN_EPS, T.FLOAT32, 0.0, None, r"resnet.batchnorm_eps must be in \(0, 1\), got 0.0"),
    (Key.BN_EPS, T.FLOAT32, -1e-5, None, r"must be in \(0, 1\)"),
    (Key.BN_EPS, T.FLOAT32, float("nan"), None, r"must be in \(0, 1\), got nan"),
    (Key.BN_EPS, T.FLOAT64, float("inf"), None, r"got inf"),
    (Key.BN_EPS, T.FLOAT32, 1.0, None, r"got 1.0"),
    (Key.MEAN, A, [float("nan"), 0.5, 0.5], T.FLOAT32, "mean/std must be 3 finite numbers"),
    (Key.MEAN, A, [0.5, 0.5], T.FLOAT32, "mean/std must be 3 finite numbers"),
    (Key.STD, A, [0.2, 0.0, 0.2], T.FLOAT32, r"\(std > 0\)"),
    (Key.STD, A, [0.2, -0.2, 0.2], T.FLOAT64, r"\(std > 0\)"),
    (Key.STD, A, [0.2, float("inf"), 0.2], T.FLOAT32, "finite"),
    (Key.INTERPOLATION, T.STRING, "cubic", None, "unknown interpolation 'cubic'"),  # lanczos is Pillow's
    (Key.RESIZE, T.UINT32, 0, None, r"'resnet.preprocess.resize' must be an integer in 1..8192, got 0"),
    (Key.CROP, T.UINT32, 8193, None, "got 8193"),
    (Key.RESIZE, T.UINT64, 2**40, None, "got 1099511627776"),
    # an exact size, no resize or crop, antialias (issue 24): the same ranges, and shapes of arrays checked
    (Key.RESIZE, A, [224, 0], T.UINT32, r"'resnet.preprocess.resize' must be two integers \(height, width\) in "
                                        r"1..8192, got \(224, 0\)"),
    (Key.CROP, A, [224, 8193], T.INT64, "got \\(224, 8193\\)"),
    (Key.RESIZE, A, [224, 224, 224], T.UINT32, r"'resnet.preprocess.resize' must be an integer, an ARRAY of 2 "
                                              r"\(height, width\) or \"none\", got 3 items"),
    (Key.CROP, A, [1.5, 2.5], T.FLOAT32, r"'resnet.preprocess.crop' must be an ARRAY of integers, got "
                                        r"ARRAY\[FLOAT32\]"),
    (Key.CROP, T.STRING, "none", None, "without a crop the resize must be an exact \\(height, width\\)"),
    (Key.CROP, T.STRING, "all", None, "'resnet.preprocess.crop' must be an integer, got STRING 'all' \\(or an ARRAY "
                                      "of 2, \\(height, width\\), or \"none\"\\)"),
    (Key.ANTIALIAS, T.UINT8, 0, None, "'resnet.preprocess.antialias' must be a BOOL, got UINT8"),
    (Key.ANTIALIAS, T.STRING, "false", None, "'resnet.preprocess.antialias' must be a BOOL, got STRING"),
    # general.alignment
    ("general.alignment", T.UINT32, 3, None, "general.alignment must be a UINT32 power of two, got 3"),
    ("general.alignment", T.UINT32, 0, None, "power of two, got 0"),
    ("general.alignment", T.UINT64, 32, None, "power of two, got UINT64"),
    ("general.alignment", A, [1] * 2**20, T.UINT8, r"power of two, got ARRAY\[UINT8\]$"),
    ("general.alignment", T.UINT32, 4096, None, "'bn1.weight' has offset 37632, not a multiple of the alignment 4096"),
    ("general.alignment", T.UINT32, 2**31, None, "extends past the end of the file"),
]


@pytest.mark.parametrize("key, vtype, value, sub, match", BAD_VALUES,
                         ids=[f"{k.split('.')[-1]}-{str(v)[:12]}" for k, _, v, _, _ in BAD_VALUES])
def test_bad_metadata_value(corpus, tmp_path, key, vtype, value, sub, match):
    g = corpus()
    g.set(key, vtype, value, sub)
    refused(write(tmp_path, g, sparse=True), match)


def test_num_classes_disagrees_with_fc(corpus, tmp_path):
    g = corpus()
    g.set(Key.NUM_CLASSES, T.UINT32, 1000)
    g.set(Key.LABELS, T.ARRAY, [f"c{i}" for i in range(1000)], T.STRING)
    refused(write(tmp_path, g, sparse=True), r"tensor 'fc.weight' has shape \(10, 512\), expected \(1000, 512\)")


# ----------------------------------------------------------------------------------------------------------
# Model files: the tensor table


def _t(g, name="conv1.weight") -> TI:
    return g.tensor(name)


HOSTILE_TI = {
    "name-length-2^63": (lambda g: setattr(_t(g), "name", Raw(struct.pack("<Q", 2**63))),
                         r"the name of tensor 0 claims 9223372036854775808 bytes"),
    "name-64-bytes": (lambda g: setattr(_t(g), "name", "w" * 64), "claims 64 bytes, more than the 63 allowed"),
    "name-not-utf8": (lambda g: setattr(_t(g), "name", b"conv1.weight\xff"), "not valid UTF-8"),
    "n_dims-5": (lambda g: setattr(_t(g), "n_dims", 5), "tensor 'conv1.weight' claims 5 dimensions, more than ggml's 4"),
    "n_dims-max": (lambda g: setattr(_t(g), "n_dims", 2**32 - 1), "claims 4294967295 dimensions"),
    "n_dims-0": (lambda g: setattr(_t(g), "n_dims", 0), r"tensor|shape|claims|type"),
    "dim-max": (lambda g: setattr(_t(g), "ne", (7, 7, 3, U64)),
                r"tensor 'conv1.weight' has shape \(18446744073709551615, 3, 7, 7\), expected \(64, 3, 7, 7\)"),
    "dim-2^63": (lambda g: setattr(_t(g), "ne", (7, 7, 3, 2**63)), r"has shape \(9223372036854775808, 3, 7, 7\)"),
    "dim-zero": (lambda g: setattr(_t(g), "ne", (7, 7, 0, 64)), r"has shape \(64, 0, 7, 7\)"),
    "dims-transposed": (lambda g: setattr(_t(g), "ne", (64, 3, 7, 7)), r"has shape \(7, 7, 3, 64\)"),
    "one-dim-missing": (lambda g: setattr(_t(g), "ne", (49, 3, 64)), r"has shape \(64, 3, 49\)"),
    "fc-rows": (lambda g: setattr(_t(g, "fc.weight"), "ne", (512, 11)), r"'fc.weight' has shape \(11, 512\)"),
    "bn-f16": (lambda g: setattr(_t(g, "bn1.weight"), "ttype", F16), "tensor 'bn1.weight' must be f32, got f16"),
    "bias-q8_0": (lambda g: setattr(_t(g, "fc.bias"), "ttype", Q8_0), "'fc.bias' must be f32, got q8_0"),
    "type-q4_0": (lambda g: setattr(_t(g), "ttype", Q4_0), "tensor 'conv1.weight' has unsupported type code 2"),
    "type-99": (lambda g: setattr(_t(g), "ttype", 99), "unsupported type code 99"),
    "type-max": (lambda g: setattr(_t(g), "ttype", 2**32 - 1), "unsupported type code 4294967295"),
    "stem-q8_0-flat": (lambda g: (setattr(_t(g), "ttype", Q8_0), setattr(_t(g), "ne", (147, 64))),
                       "rows of 147 do not fill q8_0 blocks of 32"),
    "offset-misaligned": (lambda g: setattr(_t(g), "offset", _t(g).offset + 4),
                          "has offset 4, not a multiple of the alignment 32"),
    "offset-huge": (lambda g: setattr(_t(g, "fc.weight"), "offset", 2**64 - 32),
                    "'fc.weight' extends past the end of the file"),
    "overlap": (lambda g: setattr(_t(g, "layer1.0.conv1.weight"), "offset", 0),
                "the data of tensors 'conv1.weight' and 'layer1.0.conv1.weight' overlap"),
    "missing": (lambda g: g.drop_tensor("fc.bias"), r"missing \['fc.bias'\]$"),
    "extra": (lambda g: g.ti.append(replace(_t(g), name="layer5.0.conv1.weight")),
              r"unexpected \['layer5.0.conv1.weight'\]"),
    "duplicate": (lambda g: g.ti.append(replace(_t(g))), r"resnet18 with 10 classes: listed twice \['conv1.weight'\]$"),
    "renamed": (lambda g: setattr(_t(g, "layer1.0.bn1.weight"), "name", "layer1.0.bn1.gamma"),
                r"missing \['layer1.0.bn1.weight'\]; unexpected \['layer1.0.bn1.gamma'\]$"),
    "mixed-f16-bf16": (lambda g: (setattr(_t(g, "layer1.0.conv1.weight"), "ttype", F16),
                                  setattr(_t(g, "layer1.0.conv2.weight"), "ttype", BF16)),
                       r"weights mix types \['bf16', 'f16', 'f32'\]"),
}


HOSTILE_HEADER = {**HOSTILE_KV, **HOSTILE_TI}
assert len(HOSTILE_HEADER) == len(HOSTILE_KV) + len(HOSTILE_TI)  # no case shadows another


@pytest.mark.parametrize("case", list(HOSTILE_HEADER))
def test_hostile_header_entry(corpus, tmp_path, case):
    """Each edit of the metadata (HOSTILE_KV) or of the tensor table (HOSTILE_TI) is refused, with its message."""
    edit, match = HOSTILE_HEADER[case]
    g = corpus()
    edit(g)
    refused(write(tmp_path, g, sparse=True), match)


# ----------------------------------------------------------------------------------------------------------
# Model files: tensor data

NAN32, INF32 = struct.pack("<f", float("nan")), struct.pack("<f", float("-inf"))
NAN16, INF16 = struct.pack("<e", float("nan")), struct.pack("<e", float("inf"))
NAN_BF16 = struct.pack("<H", 0x7FC0)


def recode(g: Gguf, name: str, kind: str) -> np.ndarray:
    """Stores f32 tensor `name` of `g` as bf16 or q8_0 (flattened to 2-D) in its own slot; returns the values
    the loader should read back. (Faster than converting a whole file to that type.)"""
    t = g.tensor(name)
    n = int(np.prod(t.ne))
    values = np.frombuffer(g.data, "<f4", n, t.offset).reshape(t.ne[-1], -1)  # PyTorch's (out, rest)
    if kind == "bf16":
        stored = (values.view(np.uint32) >> 16).astype("<u2")
        back = (stored.astype(np.uint32) << 16).view(np.float32)
        t.ttype = BF16
    else:
        blocks = values.reshape(-1, 32)
        d = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16)
        q = np.round(blocks / np.maximum(d.astype(np.float32), 1e-30)).astype(np.int8)
        stored = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1)
        back = (q.astype(np.float32) * d.astype(np.float32)).reshape(values.shape)
        t.ttype, t.ne = Q8_0, (values.shape[1], values.shape[0])
    g.poke(name, 0, stored.tobytes())
    return back.reshape(values.shape)


@pytest.mark.parametrize("dtype, name, index, packed, match", [
    ("f32", "layer2.0.conv1.weight", 4 * 1000, NAN32, "'layer2.0.conv1.weight' contains NaN or infinite values"),
    ("f32", "layer3.1.bn2.bias", 4 * 7, INF32, "'layer3.1.bn2.bias' contains NaN"),
    ("f32", "fc.bias", 4 * 9, NAN32, "'fc.bias' contains NaN"),
    ("f32", "fc.weight", 0, INF32, "'fc.weight' contains NaN"),
    ("f32", "bn1.running_var", 0, struct.pack("<f", -1.0), "'bn1.running_var' holds negative variances"),
    ("f16", "layer1.1.conv2.weight", 2 * 77, NAN16, "'layer1.1.conv2.weight' contains NaN"),
    ("f16", "fc.weight", 2 * 5, INF16, "'fc.weight' contains NaN or infinite"),
    ("f16", "bn1.running_mean", 0, NAN32, "'bn1.running_mean' contains NaN"),  # f32 beside the f16 weights
    ("bf16", "layer4.0.conv1.weight", 2 * 3, NAN_BF16, "'layer4.0.conv1.weight' contains NaN"),
    ("q8_0", "layer2.1.conv1.weight", 34 * 5, NAN16, "'layer2.1.conv1.weight' contains NaN"),  # a block's scale
    ("q8_0", "fc.weight", 0, INF16, "'fc.weight' contains NaN"),
])
def test_non_finite_weights_refused(corpus, tmp_path, dtype, name, index, packed, match):
    g = corpus("f16" if dtype == "f16" else "f32")
    if dtype in ("bf16", "q8_0"):
        back = recode(g, name, dtype)
        got = loader.read(write(tmp_path, g.bytes(), "ok.gguf")).tensor(name)
        assert np.array_equal(got.reshape(back.shape), back)  # readable before it is poisoned
    g.poke(name, index, packed)
    refused(write(tmp_path, g.bytes()), match)


@pytest.mark.parametrize("gemm", [None, "ggml"])  # weights packed into ggml's memory as they are folded, or not
def test_batchnorm_that_overflows_when_folded_refused(corpus, tmp_path, gemm):
    """Finite values whose folded product is not: a huge gain over a zero variance (scale 3e38 / sqrt(eps))."""
    g = corpus()
    g.poke("layer2.0.bn1.weight", 4 * 3, struct.pack("<f", 3e38))
    g.poke("layer2.0.bn1.running_var", 4 * 3, struct.pack("<f", 0.0))
    path = write(tmp_path, g.bytes())
    with pytest.raises(ModelFormatError, match="folding layer2.0.bn1 into layer2.0.conv1.weight overflows float32"):
        pyggml_resnet.load(path, threads=1, gemm=gemm)
    with pyggml_resnet.load(path, threads=1, gemm=gemm, batchnorm="explicit"):  # nothing folded: loads
        pass


def test_file_changed_after_checking(corpus, tmp_path):
    path = write(tmp_path, corpus().bytes())
    mf = loader.read(path)
    os.utime(path, ns=(0, 12345))  # as if rewritten in place, same size
    with pytest.raises(ModelFormatError, match="changed after it was checked"):
        mf.tensor("conv1.weight")
    mf = loader.read(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(ModelFormatError, match="changed after it was checked"):
        mf.tensor("fc.bias")


# ----------------------------------------------------------------------------------------------------------
# Model files: paths that are not GGUF files


def test_paths_that_are_not_model_files(r18, tmp_path):
    with pytest.raises(FileNotFoundError):
        pyggml_resnet.load(tmp_path / "missing.gguf")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        pyggml_resnet.load(tmp_path)
    refused(write(tmp_path, b"", "empty.gguf"), "the file ends inside the magic number")
    refused(write(tmp_path, b"GGU", "three.gguf"), "the file ends inside the magic number")
    refused(write(tmp_path, b"GGUF\3\0\0\0", "eight.gguf"), "ends inside the tensor count")
    refused(write(tmp_path, b"hello, world\n" * 10, "text.gguf"), r"not a GGUF file \(it starts with b'hell'")
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    refused(write(tmp_path, png.getvalue(), "image.gguf"), "not a GGUF file")
    refused(r18[1], r"not a GGUF file \(it starts with b'PK")  # the .pth checkpoint itself
    refused(Path("/dev/null"), "is not a regular file")
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    refused(fifo, "is not a regular file")  # refused without opening it, which would block


# ----------------------------------------------------------------------------------------------------------
# Images through Model.classify


@pytest.fixture(scope="module")
def small(r18, tmp_path_factory):
    """The resnet18 (10 classes) converted to classify at 32x32, loaded."""
    path = tmp_path_factory.mktemp("small") / "r18-32.gguf"
    convert.convert(r18[1], path, preprocessing=SMALL_PRE, progress=False)
    with pyggml_resnet.load(path, threads=1) as m:
        yield m
    path.unlink()


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels with almost no data: what a decompression bomb looks like
    when opened (Pillow checks the size before decoding anything)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _photo(size=48) -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("data, match", [
    (b"", "empty file"),
    (b"this is not an image", "not an image format Pillow can read"),
    (bytes(range(256)) * 8, "not an image format"),
    (_encoded(_photo(), "JPEG")[:700], "cannot read image"),
    (_encoded(_photo(), "PNG")[:2000], "cannot read image"),
    (_encoded(_photo(), "PNG")[:60], "cannot read image|not an image"),
    (_png_header_only(20000, 20000), "decompression bomb"),
    (_png_header_only(10000, 10000), "decompression bomb"),  # between MAX_IMAGE_PIXELS and twice that
    (_png_header_only(0, 0), "cannot read image|not an image"),
], ids=["empty", "text", "binary", "truncated-jpeg", "truncated-png", "png-header", "bomb", "bomb-warning",
        "zero-size-png"])
def test_bad_image_files(small, tmp_path, data, match):
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape either
        with pytest.raises(InputError, match=match):
            small.classify(path)
        with pytest.raises(InputError, match=match):
            small.classify([_photo(), path])  # one bad image fails the batch, cleanly


def test_other_bad_images(small, tmp_path, r18):
    with pytest.raises(InputError, match="no such file"):
        small.classify(tmp_path / "missing.jpg")
    with pytest.raises(InputError):
        small.classify(tmp_path)  # a directory
    with pytest.raises(InputError, match="not an image"):
        small.classify(r18[2])  # the model file
    with pytest.raises(InputError, match="expected a path, PIL image or numpy array"):
        small.classify(42)
    with pytest.raises(InputError, match="dtype must be uint8"):
        small.classify(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="no pixels"):
        small.classify(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(InputError, match="top_k"):
        small.classify(_photo(), top_k=11)


def _same(a, b):
    return [(p.index, p.prob) for p in a] == [(p.index, p.prob) for p in b]


def test_unusual_images_classify(small, tmp_path):
    """Each classifies like the RGB image it should be converted to, through a file and in memory."""
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (40, 30), dtype=np.uint16)
    rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    pal = Image.fromarray(rgba[..., :3]).quantize(16)
    pal.info["transparency"] = 3
    cmyk = Image.fromarray(rgba, "CMYK")
    la = Image.fromarray(rgba[..., :2], "LA")
    cases = {
        "1x1": (Image.new("RGB", (1, 1), (200, 30, 90)), np.full((1, 1, 3), (200, 30, 90), np.uint8), "PNG"),
        "I;16": (Image.fromarray(grey16), np.stack([(grey16 >> 8).astype(np.uint8)] * 3, axis=-1), "PNG"),
        "CMYK": (cmyk, np.asarray(cmyk.convert("RGB")), "JPEG"),
        "LA": (la, np.stack([rgba[..., 0]] * 3, axis=-1), "PNG"),
        "P+transparency": (pal, np.asarray(pal.convert("RGBA"))[..., :3], "PNG"),
        "1x300 strip": (Image.fromarray(rgba[:1, :, :3].repeat(10, axis=1)), rgba[:1, :, :3].repeat(10, axis=1), "PNG"),
    }
    for name, (im, rgb, fmt) in cases.items():
        want = small.classify(np.ascontiguousarray(rgb), top_k=3)
        assert len(want) == 3 and all(0 <= p.prob <= 1 for p in want), name
        assert _same(small.classify(im, top_k=3), want), name
        if fmt == "PNG":  # lossless: the file classifies the same
            path = tmp_path / f"{name.replace(' ', '_')}.png"
            im.save(path)
            assert Image.open(path).mode == im.mode, name
            assert _same(small.classify(path, top_k=3), want), name
        else:
            path = tmp_path / "cmyk.jpg"
            im.save(path, quality=95)
            assert Image.open(path).mode == "CMYK"
            assert len(small.classify(path, top_k=3)) == 3


# ----------------------------------------------------------------------------------------------------------
# Arrays through logits / features / stages


def _x(n=1, h=16, w=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


@pytest.mark.parametrize("x, match", [
    (np.zeros((3, 16, 16), np.float32), r"shape \(N, 3, H, W\), got \(3, 16, 16\)"),
    (np.zeros((1, 1, 3, 16, 16), np.float32), r"got \(1, 1, 3, 16, 16\)"),
    (np.float32(1.0), r"got \(\)"),
    (np.zeros((1, 1, 16, 16), np.float32), r"got \(1, 1, 16, 16\)"),
    (np.zeros((1, 4, 16, 16), np.float32), r"got \(1, 4, 16, 16\)"),
    (np.zeros((1, 16, 16, 3), np.float32), r"got \(1, 16, 16, 3\)"),  # NHWC
    (np.zeros((1, 3, 0, 16), np.float32), "height and width must be 1..4096, got 0x16"),
    (np.zeros((1, 3, 16, 0), np.float32), "got 16x0"),
    (np.broadcast_to(np.float32(0), (1, 3, 4097, 16)), "got 4097x16"),
    (np.broadcast_to(np.float32(0), (1, 3, 10**6, 10**6)), "got 1000000x1000000"),
    (np.zeros((1, 3, 8, 8), object), "real-valued numeric array, got dtype object"),
    (np.full((1, 3, 8, 8), "1.0"), "got dtype <U3"),
    (np.full((1, 3, 8, 8), b"1"), r"got dtype \|S1"),
    (np.zeros((1, 3, 8, 8), np.complex64), "got dtype complex64"),
    (np.zeros((1, 3, 8, 8), bool), "got dtype bool"),
    # raw pixels, as np.asarray(Image.open(...)) gives them: not what the network was trained on
    (np.zeros((1, 3, 8, 8), np.uint8), r"^images are uint8 pixels, .* use np.stack\(\[model.preprocess\(img\)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "images are uint8 pixels"),
    (np.zeros((1, 3, 8, 8), "datetime64[s]"), "got dtype datetime64"),
    ([[[[1.0]]], [[[1.0, 2.0]]]], "cannot use list as an image batch"),  # ragged
    ("images", "got dtype <U6"),
    (None, "got dtype object"),
], ids=["rank3", "rank5", "scalar", "1-channel", "4-channels", "nhwc", "zero-height", "zero-width", "4097",
        "giant", "object", "str", "bytes", "complex", "bool", "uint8", "uint8-nhwc", "datetime", "ragged", "string", "none"])
def test_bad_arrays(small, x, match):
    for method in (small.logits, small.features, small.probabilities, small.stages):
        with pytest.raises(InputError, match=match):
            method(x)


def test_non_finite_inputs_refused(small):
    x = _x(3)
    for value in (np.nan, np.inf, -np.inf):
        bad = x.copy()
        bad[2, 1, 5, 5] = value
        for method in (small.logits, small.features, small.stages):
            with pytest.raises(InputError, match="image 2 of the batch contains NaN or infinite values"):
                method(bad)
    with pytest.raises(InputError, match="image 0 .* NaN or infinite"):
        small.logits(np.full((1, 3, 4, 4), 1e39))  # finite in float64, infinite in float32


def test_tiny_images_match_pytorch(small, r18):
    """The network runs on any size from 1x1 up, as PyTorch's does (every stage then stays 1x1)."""
    ref = r18[0]
    for h, w in [(1, 1), (1, 2), (2, 1), (3, 3), (5, 2), (7, 7)]:
        x = _x(2, h, w, seed=h * 10 + w)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy()
        got = small.logits(x)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), (h, w)


def test_empty_batch(small):
    x = np.zeros((0, 3, 20, 30), np.float32)
    assert small.logits(x).shape == (0, 10) and small.logits(x).dtype == np.float32
    assert small.features(x).shape == (0, 512)
    assert small.probabilities(x).shape == (0, 10)
    assert small.classify([]) == []
    empty, one = small.stages(x), small.stages(np.zeros((1, 3, 20, 30), np.float32))
    assert list(empty) == list(one)
    for name in one:
        assert empty[name].shape == (0,) + one[name].shape[1:], name


def test_any_layout_and_real_dtype_works(small):
    x = _x(2, 24, 20)
    want = small.logits(x)
    views = {
        "fortran": np.asfortranarray(x),
        "strided": np.ascontiguousarray(np.repeat(x, 2, axis=3))[..., ::2],
        "nhwc-transposed": np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
        "reversed-twice": x[::-1][::-1],
        "float64": x.astype(np.float64),
        "float16-exact": x.astype(np.float16),
        "list": x.tolist(),
    }
    for name, v in views.items():
        expect = small.logits(np.asarray(v, np.float32)) if name == "float16-exact" else want
        assert np.array_equal(small.logits(v), expect), name
    ints = np.random.default_rng(2).integers(-3, 4, (2, 3, 20, 20))
    for dtype in (np.int8, np.int32, np.int64, np.uint16):  # uint8 is refused: raw pixels (test_bad_arrays)
        v = np.abs(ints).astype(dtype) if np.dtype(dtype).kind == "u" else ints.astype(dtype)
        assert np.array_equal(small.logits(v), small.logits(v.astype(np.float32))), dtype
    assert np.array_equal(small.features(x[:, :, ::2, ::2]), small.features(x[:, :, ::2, ::2].copy()))


def test_big_batches_run_in_chunks(small):
    """A batch runs as chunks of up to 16 images (fewer for big images): each chunk exactly as on its own."""
    x = _x(37, 8, 8)
    got = small.logits(x)
    for start, stop in ((0, 16), (16, 32), (32, 37)):
        assert np.array_equal(got[start:stop], small.logits(x[start:stop])), start
    big = np.broadcast_to(_x(1, 300, 300), (3, 3, 300, 300))  # 90,000 pixels each: chunks of 8
    assert np.array_equal(small.features(big), np.repeat(small.features(big[:1]), 3, axis=0))


# ----------------------------------------------------------------------------------------------------------
# Threads


def test_eight_threads_get_exactly_the_sequential_results(small):
    rng = np.random.default_rng(3)
    jobs = []
    for i in range(24):
        kind = ("logits", "classify", "features")[i % 3]
        n = 1 + i % 2
        if kind == "classify":
            imgs = [rng.integers(0, 256, (40, 33, 3), dtype=np.uint8) for _ in range(n)]
            jobs.append((kind, imgs if n > 1 else imgs[0]))
        else:
            jobs.append((kind, rng.standard_normal((n, 3, 32, 32)).astype(np.float32)))

    def run(job):
        kind, arg = job
        if kind == "classify":
            return small.classify(arg, top_k=3)
        return getattr(small, kind)(arg)

    want = [run(j) for j in jobs]
    results: dict[tuple[int, int], object] = {}
    errors = []
    barrier = threading.Barrier(8)

    def worker(t):
        try:
            barrier.wait()
            for k in range(len(jobs)):
                j = (k + 3 * t) % len(jobs)  # each thread its own order: the calls overlap in every mix
                results[t, j] = run(jobs[j])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert len(results) == 8 * len(jobs)
    for (t, j), got in results.items():
        if jobs[j][0] == "classify":
            assert got == want[j], (t, j)
        else:
            assert np.array_equal(got, want[j]), (t, j)


def test_close_while_other_threads_compute(r18):
    """Every call either completes correctly or raises InputError("closed"): never anything else."""
    model = pyggml_resnet.load(r18[2], threads=1)
    x = _x(2, 16, 16)
    want = model.logits(x)
    outcomes, errors = [], []
    started = threading.Barrier(5)

    def worker():
        started.wait()
        for _ in range(40):
            try:
                got = model.logits(x)
            except InputError as e:
                assert "closed" in str(e)
                outcomes.append("closed")
                return
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            outcomes.append("ok" if np.array_equal(got, want) else "WRONG")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    started.wait()
    time.sleep(0.05)
    model.close()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert "WRONG" not in outcomes and outcomes.count("closed") == 4


# ----------------------------------------------------------------------------------------------------------
# Native memory and close()


def _rss() -> int:
    """Resident bytes after collecting garbage and handing freed heap back to the system: otherwise memory
    that earlier tests freed can be returned in the middle of a measurement and hide what a load added."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # glibc
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _finalizers(model) -> list:
    """The weakref finalizers that free each native object the model holds: backend, weights, graphs."""
    return [model._backend._finalizer, model._weights._finalizer] + [g._finalizer for g, _ in model._graphs.values()]


def test_300_calls_do_not_grow_memory(small):
    x1, x2 = _x(1, 32, 32), _x(2, 24, 24)
    img = np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)

    calls_ = (lambda: small.logits(x1), lambda: small.features(x2), lambda: small.classify(img, top_k=2))

    def calls(n):
        for i in range(n):
            calls_[i % 3]()

    calls(30)  # warm-up: graphs built and cached
    before = _rss()
    calls(300)
    grown = _rss() - before
    assert grown < 5 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 300 calls"


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A resnet50 (1000 classes, random weights: only its size matters here), ~100 MB of f32 weights."""
    rng = np.random.default_rng(0)
    state = {name: (np.ones(shape, np.float32) if name.endswith("running_var")
                    else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
             for name, shape in arch.expected_tensors(arch.CONFIGS[50], 1000).items()}
    path = convert.write_gguf(convert.Checkpoint.of(state), tmp_path_factory.mktemp("r50") / "r50.gguf",
                              progress=False)
    del state
    yield path
    path.unlink()


def test_close_frees_the_native_memory(resnet50_file):
    base = _rss()
    with pyggml_resnet.load(resnet50_file, threads=1) as model:
        model.logits(_x(1, 64, 64))
        weights = model.weights_bytes
        assert weights > 90 << 20
        loaded = _rss()
        finalizers = _finalizers(model)
        assert len(finalizers) == 3 and all(f.alive for f in finalizers)
    assert not any(f.alive for f in finalizers)
    closed = _rss()
    assert loaded - base > 0.9 * weights
    assert loaded - closed > 0.9 * weights, (base, loaded, closed, weights)


def test_garbage_collected_model_frees_its_memory(r18):
    model = pyggml_resnet.load(r18[2], threads=1)
    model.logits(_x(1, 8, 8))
    finalizers = _finalizers(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert not any(f.alive for f in finalizers)


def test_every_method_after_close_raises_input_error(r18):
    model = pyggml_resnet.load(r18[2], threads=1)
    x = _x(1, 8, 8)
    model.logits(x)
    model.close()
    model.close()  # twice is fine
    assert model.closed and "closed" in repr(model)
    calls = {
        "logits": lambda: model.logits(x), "features": lambda: model.features(x),
        "probabilities": lambda: model.probabilities(x), "stages": lambda: model.stages(x),
        "classify": lambda: model.classify(np.zeros((8, 8, 3), np.uint8)),
        "classify-list": lambda: model.classify([]), "classify-bad-path": lambda: model.classify("/nonexistent"),
        "empty-batch": lambda: model.logits(x[:0]), "threads": lambda: model.threads,
        "set-threads": lambda: setattr(model, "threads", 2),
    }
    for name, call in calls.items():
        with pytest.raises(InputError, match="this model has been closed"):
            call()
    with model:  # entering a closed model is harmless; leaving closes it again
        pass
    assert model.num_classes == 10 and model.feature_dim == 512  # plain attributes stay readable


# ----------------------------------------------------------------------------------------------------------
# Checkpoints that would make the converter allocate far more than the file holds
# (the other converter refusals, the weights-only pickle and the legacy .bin cases are in test_convert.py)


def test_expanded_tensor_checkpoint_refused_before_copying(tmp_path):
    """torch.save writes a stride-0 view as its one stored value: 40 KB on disk, 8 GB once copied out."""
    path = tmp_path / "expanded.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1).expand(2**22, 512)}, path)
    assert path.stat().st_size < 64 << 10
    with pytest.raises(ModelFormatError, match=r"fc.weight has shape \(4194304, 512\) but its storage holds only 1"):
        convert.read_checkpoint(path)


def test_shared_storage_checkpoint_refused_before_copying(tmp_path):
    """200 entries naming one 4 MB tensor: 4 MB on disk, 800 MB of copies."""
    big = torch.zeros(2**20)
    path = tmp_path / "shared.pth"
    torch.save({f"layer{i}.weight": big for i in range(200)}, path)
    with pytest.raises(ModelFormatError, match="far more values than the file's size allows"):
        convert.read_checkpoint(path)


def test_zip_bomb_checkpoint_refused_before_loading(tmp_path):
    """torch.load inflates deflated zip records too, allocating what the zip claims: refused before it."""
    import zipfile

    good = tmp_path / "small.pth"
    torch.save({"a": torch.zeros(4)}, good)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(bomb, "w") as out:
        for info in z.infolist():
            if info.filename.endswith("data/0"):  # 256 MB of zeros, in ~250 KB
                out.writestr(info.filename, bytes(256 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info, z.read(info))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ModelFormatError, match=r"zip records expand to \d+ bytes from a \d+-byte file \(a zip bomb\?\)"):
        convert.read_checkpoint(bomb)


# ----------------------------------------------------------------------------------------------------------
# Writes: a converter killed with SIGKILL while writing


def test_sigkill_midway_leaves_no_output(tmp_path, r18):
    rng = np.random.default_rng(0)
    state = {name: torch.from_numpy(np.ones(shape, np.float32) if name.endswith("running_var")
                                    else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
             for name, shape in arch.expected_tensors(arch.CONFIGS[101], 1000).items()}
    ckpt = tmp_path / "resnet101.pth"
    torch.save(state, ckpt)
    del state
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.gguf"
    for attempt in range(3):  # the converter finishing before the kill lands would only be a retry
        proc = subprocess.Popen([sys.executable, "-m", "pyggml_resnet.convert", str(ckpt), str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            parts = list(out_dir.glob("*.part"))
            if parts and parts[0].stat().st_size > 1 << 20:  # past the header: tensor data going in
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(60)
        if proc.returncode == -signal.SIGKILL:
            break
        out.unlink(missing_ok=True)
        for p in out_dir.glob("*.part"):
            p.unlink()
    assert proc.returncode == -signal.SIGKILL, "the converter was never caught mid-write"
    assert not out.exists()
    leftovers = sorted(p.name for p in out_dir.iterdir())
    assert len(leftovers) == 1 and re.fullmatch(r"\.model\.gguf\.\w+\.part", leftovers[0]), leftovers
    assert (out_dir / leftovers[0]).stat().st_size < 179_000_000  # a partial file, under a temporary name
    # A later conversion to the same output is unaffected, and leaves the other leftover alone.
    convert.convert(r18[1], out, progress=False)
    with pyggml_resnet.load(out, threads=1) as m:
        assert m.num_classes == 10
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(leftovers + ["model.gguf"])

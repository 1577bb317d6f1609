"""The loader (`gguf_container` and `loader`): a corpus of malformed GGUF model files, each refused with
ModelFormatError while the process carries on (ggml would abort() on what reached it unchecked).

Truncations, every header field, metadata keys of the wrong type or value, hostile lengths and counts, bad
tensor entries, NaN/Inf weights, and paths that are not model files. docs/reliability.md lists every case
and its outcome; tests/test_fuzz.py fuzzes the same reader.
"""

from __future__ import annotations

import copy
import io
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from PIL import Image

import pyggml_resnet
from pyggml_resnet import ModelFormatError, gguf_container, loader
from pyggml_resnet.arch import Key

T = gguf.GGUFValueType
FMT = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i", T.FLOAT32: "f",
       T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}
F16, BF16, Q4_0, Q8_0 = 1, 30, 2, 8
U64 = 2**64 - 1
pytestmark = pytest.mark.usefixtures("drop_big_files")


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
    monkeypatch.setattr(gguf_container, "_MAX_META_BYTES", 4096)
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


# -- int8 files (docs/gguf.md): the activation ranges' keys and the s8 tensors ------------------------------------
I8 = 24
N_INT8_CONVS = 20  # resnet18's convolutions: the stem, 16 in blocks, 3 downsamples


def test_int8_file_reads_with_its_activation_ranges(corpus, tmp_path):
    mf = loader.read(write(tmp_path, corpus("int8"), "ok.gguf"))
    assert mf.dtype == "int8" and len(mf.input_quants) == N_INT8_CONVS
    stem = mf.input_quants["conv1.weight"]
    assert 0 < stem.zero < 255 and stem.scale > 0  # the normalised image is signed
    assert all(q.zero == 0 for name, q in mf.input_quants.items() if name != "conv1.weight")  # after ReLUs
    q = mf.tensor("layer1.0.conv1.weight")
    assert q.dtype == np.int8 and q.shape == (64, 64, 3, 3) and np.abs(q).max() == 127
    # Each downsample's output (no ReLU after it: signed), as u8 for its block's last conv to add.
    assert list(mf.shortcut_quants) == [f"layer{s}.0.downsample.0.weight" for s in (2, 3, 4)]
    assert all(0 < q.zero < 255 and q.scale > 0 for q in mf.shortcut_quants.values())


def test_int8_file_without_shortcut_ranges_reads_with_f32_shortcuts(corpus, tmp_path):
    """Files converted before shortcuts were quantized hold no shortcut keys: they load, shortcuts f32."""
    g = corpus("int8")
    g.drop(Key.SHORTCUT_SCALE)
    g.drop(Key.SHORTCUT_ZERO)
    mf = loader.read(write(tmp_path, g, sparse=True))
    assert mf.dtype == "int8" and mf.shortcut_quants is None and len(mf.input_quants) == N_INT8_CONVS


@pytest.mark.parametrize("change, match", [
    (lambda g: g.drop(Key.INPUT_ZERO), "needs resnet.int8.input_zero_point with 20 values .* got none"),
    (lambda g: g.set(Key.INPUT_SCALE, A, [0.1] * 19, T.FLOAT32), "input_scale with 20 values .* got 19"),
    (lambda g: g.set(Key.INPUT_SCALE, A, [0.1] * 19 + [float("nan")], T.FLOAT32), "finite positive scales"),
    (lambda g: g.set(Key.INPUT_SCALE, A, [0.1] * 19 + [float("inf")], T.FLOAT32), "finite positive scales"),
    (lambda g: g.set(Key.INPUT_SCALE, A, [0.0] + [0.1] * 19, T.FLOAT32), "finite positive scales"),
    (lambda g: g.set(Key.INPUT_SCALE, A, [-0.1] * 20, T.FLOAT64), "finite positive scales"),
    (lambda g: g.set(Key.INPUT_SCALE, A, ["a"] * 20, T.STRING), "must be an ARRAY of floats"),
    (lambda g: g.set(Key.INPUT_ZERO, A, [256] * 20, T.UINT32), "zero points in 0..255"),
    (lambda g: g.set(Key.INPUT_ZERO, A, [-1] * 20, T.INT32), "zero points in 0..255"),
    (lambda g: g.set(Key.INPUT_ZERO, A, [0.5] * 20, T.FLOAT32), "must be an ARRAY of integers"),
    (lambda g: (g.drop(Key.INPUT_ZERO), g.drop(Key.INPUT_SCALE)), "int8 weights but not their activation ranges"),
    (lambda g: g.drop(Key.SHORTCUT_SCALE), "needs resnet.int8.shortcut_scale with 3 values .* got none"),
    (lambda g: g.set(Key.SHORTCUT_ZERO, A, [128] * 4, T.UINT8), "shortcut_zero_point with 3 values .* got 4"),
    (lambda g: g.set(Key.SHORTCUT_SCALE, A, [0.1, float("nan"), 0.1], T.FLOAT32), "shortcut_scale must hold finite positive"),
    (lambda g: g.set(Key.SHORTCUT_ZERO, A, [0, 300, 0], T.UINT32), "shortcut_zero_point must hold zero points in 0..255"),
    (lambda g: setattr(g.tensor("layer1.0.conv1.weight"), "ttype", 0), "'layer1.0.conv1.weight' of an int8 file must be int8"),
    (lambda g: setattr(g.tensor("fc.bias"), "ttype", I8), "'fc.bias' of an int8 file must be f32, got int8"),
    (lambda g: g.drop_tensor("layer1.0.conv1.weight_scale"), "missing .*layer1.0.conv1.weight_scale"),
    (lambda g: setattr(g.tensor("conv1.bias"), "ne", (63,)), r"'conv1.bias' has shape \(63,\)"),
])
def test_hostile_int8_fields_refused(corpus, tmp_path, change, match):
    g = corpus("int8")
    change(g)
    refused(write(tmp_path, g, sparse=True), match)


def test_shortcut_ranges_in_a_float_file_refused(corpus, tmp_path):
    g = corpus()
    g.set(Key.SHORTCUT_SCALE, A, [0.1] * 3, T.FLOAT32)
    g.set(Key.SHORTCUT_ZERO, A, [128] * 3, T.UINT8)
    refused(write(tmp_path, g, sparse=True), "shortcut_scale and .* belong to int8 files")


def test_int8_tensor_in_a_float_file_refused(corpus, tmp_path):
    g = corpus()
    g.tensor("layer1.0.conv1.weight").ttype = I8
    refused(write(tmp_path, g, sparse=True), "int8 weights but not their activation ranges.*--dtype int8 --calibration")


@pytest.mark.parametrize("name, index, packed, match", [
    ("layer2.0.conv1.weight", 5, struct.pack("<b", -128), "'layer2.0.conv1.weight' holds -128"),
    ("layer2.0.conv1.weight_scale", 4 * 3, struct.pack("<f", -0.5), "negative scales"),
    ("layer2.0.conv1.weight_scale", 4 * 3, NAN32, "contains NaN"),
    ("layer3.0.downsample.0.bias", 0, INF32, "contains NaN or infinite"),
])
def test_hostile_int8_values_refused(corpus, tmp_path, name, index, packed, match):
    g = corpus("int8")
    g.poke(name, index, packed)
    refused(write(tmp_path, g.bytes()), match)

"""Property-based fuzzing of everything that reads untrusted bytes: the GGUF loader and the converter's input.

The property is always the same: whatever the bytes, the outcome is a successful load or the documented
error (ModelFormatError), never another exception, never a crash (an abort() in ggml would kill this very
process: the suite then fails loudly, which is the point of fuzzing in-process), never a hang.

CI runs a few dozen examples per target, derandomized (the same examples every run). A longer random
campaign runs the same targets with more examples, e.g.:

    PYGGML_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics

(docs/reliability.md records the last campaign's numbers).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import pyggml_resnet
from pyggml_resnet import ModelFormatError, arch, convert

CAMPAIGN = int(os.environ.get("PYGGML_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int):
    """`examples` per run in CI (derandomized); PYGGML_FUZZ_EXAMPLES random ones in a campaign."""
    return settings(max_examples=CAMPAIGN or examples, derandomize=not CAMPAIGN, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# ----------------------------------------------------------------------------------------------------------
# The GGUF loader


def numeric_fields(raw: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every count, length, type code, dimension and offset in a valid GGUF file's header,
    metadata and tensor table: where a wrong integer does the most damage."""
    fields = [(4, 4), (8, 8), (16, 8)]
    n_ti, n_kv = struct.unpack_from("<QQ", raw, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(pos):
        fields.append((pos, 8))
        return pos + 8 + struct.unpack_from("<Q", raw, pos)[0]

    def value(pos, vtype):
        if vtype == 8:
            return string(pos)
        if vtype == 9:
            fields.extend([(pos, 4), (pos + 4, 8)])
            itype, count = struct.unpack_from("<IQ", raw, pos)
            pos += 12
            for _ in range(count):
                pos = value(pos, itype)
            return pos
        fields.append((pos, sizes[vtype]))
        return pos + sizes[vtype]

    for _ in range(n_kv):
        pos = string(pos)
        fields.append((pos, 4))
        pos = value(pos + 4, struct.unpack_from("<I", raw, pos)[0])
    for _ in range(n_ti):
        pos = string(pos)
        n_dims = struct.unpack_from("<I", raw, pos)[0]
        fields.append((pos, 4))
        fields.extend((pos + 4 + 8 * i, 8) for i in range(n_dims))
        pos += 4 + 8 * n_dims
        fields.extend([(pos, 4), (pos + 4, 8)])
        pos += 12
    return fields


@pytest.fixture(scope="module")
def gguf_base(model_files):
    """The resnet18 (10 classes) GGUF file's bytes (f16: 22 MB, so each example is cheap; a campaign can pick
    another type with PYGGML_FUZZ_DTYPE), and where its fields are."""
    raw = model_files(18, 10, os.environ.get("PYGGML_FUZZ_DTYPE", "f16"))[2].read_bytes()
    fields = numeric_fields(raw)
    return raw, fields, fields[-1][0] + 8  # the end of the tensor table


INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 30, 31, 32, 63, 64, 255, 1024, 2**16, 2**20, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


# A mutation: (kind, near the structure?, position as a fraction of 2**32, argument). Positions are taken
# modulo the current length when applied, so a failing example prints as a short list, not 22 MB of bytes.
_POS = st.integers(0, 2**32 - 1)
_KINDS = ["flip", "byte", "insert", "delete", "truncate", "int32"]


def _mutation(kinds, fields=()):
    arg = st.integers(0, 2**64 - 1) | st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=16)
    return st.tuples(st.sampled_from(kinds), st.booleans(), _POS, arg,
                     st.sampled_from(fields) if fields else st.just(None))


def apply(raw: bytes, mutations, focus: int) -> bytes:
    """Applies the mutations in order; `near` ones fall in the first `focus` bytes."""
    out = bytearray(raw)
    for kind, near, pos, arg, field in mutations:
        if not out:
            break
        at = pos % (min(focus, len(out)) if near else len(out))
        n = arg if isinstance(arg, int) else len(arg)
        if kind == "field":  # a count, length, type, dimension or offset set to a chosen integer
            off, size = field
            if off + size <= len(out) and isinstance(arg, int):
                out[off:off + size] = (arg % 2 ** (8 * size)).to_bytes(size, "little")
        elif kind == "flip":
            out[at] ^= 1 << n % 8
        elif kind == "byte":
            out[at] = n % 256
        elif kind == "insert":
            out[at:at] = arg if isinstance(arg, bytes) else n.to_bytes(8, "little")[: 1 + n % 8]
        elif kind == "delete":
            del out[at:at + 1 + n % 16]
        elif kind == "truncate":
            del out[at:]
        else:  # int32: an interesting 32-bit integer written anywhere
            out[at:at + 4] = struct.pack("<I", (INTERESTING[n % len(INTERESTING)] if n < 2**16 else n) % 2**32)
    return bytes(out)


def _outcome(path: Path, e: ModelFormatError | None) -> str:
    """"loaded", or "refused: " and the error's gist (numbers and names elided), recorded as a hypothesis
    event: `--hypothesis-show-statistics` then tabulates what a campaign hit."""
    if e is None:
        what = "loaded"
    else:
        msg = str(e).replace(f"{path}: ", "").replace(str(path), "FILE")
        msg = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|b'.*?'|-?\d+(\.\d+)?(e-?\d+)?", "_", msg)
        what = "refused: " + " ".join(msg.split()[:9])
    event(what)
    return what


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One file that every example overwrites and deletes: a campaign of thousands of 45 MB examples must
    not fill the disk."""
    path = tmp_path_factory.mktemp("fuzz") / "example"
    yield path
    path.unlink(missing_ok=True)


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _load_outcome(path: Path) -> str:
    try:
        model = pyggml_resnet.load(path, threads=1)
    except ModelFormatError as e:
        return _outcome(path, e)
    with model:  # it loaded: it must also compute (whatever the corrupted weights give)
        assert model.logits(np.zeros((1, 3, 4, 4), np.float32)).shape == (1, model.num_classes)
    return _outcome(path, None)


@fuzz_settings(30)
@given(data=st.data())
def test_gguf_loader_fuzz(gguf_base, scratch, data):
    raw, fields, meta_end = gguf_base
    mutations = data.draw(st.lists(_mutation(["field", "field", "field"] + _KINDS, fields), min_size=1, max_size=3),
                          label="mutations")
    _load_outcome(written(scratch, apply(raw, mutations, meta_end + 64)))


# ----------------------------------------------------------------------------------------------------------
# The converter's input: convert.read_checkpoint


def _only_model_format_error(path: Path) -> str:
    try:
        convert.read_checkpoint(path)
    except ModelFormatError as e:
        return _outcome(path, e)
    return _outcome(path, None)


@fuzz_settings(40)
@given(prefix=st.sampled_from([b"", b"PK\x03\x04", struct.pack("<i", convert.LEGACY_MAGIC), b"\x80\x02", b"\x80\x04",
                               b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"]),
       body=st.binary(max_size=2048))
def test_random_bytes_are_refused(scratch, prefix, body):
    assert _only_model_format_error(written(scratch, prefix + body)).startswith("refused")


# Leaves of a random checkpoint: plain values, and small tensors of every kind torch.save writes.
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8,
           torch.bool, torch.complex64]
_NAMES = list(arch.expected_tensors(arch.CONFIGS[18], 10))[:6] + ["fc.weight", "fc.bias", "state_dict", "model",
                                                                   "module.conv1.weight", "num_batches_tracked"]


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4), label="shape"))
    dtype = draw(st.sampled_from(_DTYPES), label="dtype")
    t = torch.zeros(shape, dtype=dtype) if draw(st.booleans()) else torch.ones(shape, dtype=dtype)
    how = draw(st.sampled_from(["plain", "nan", "expanded", "view", "transposed"]), label="how")
    if how == "nan" and dtype.is_floating_point and t.numel():
        t.view(-1)[0] = float("nan")
    elif how == "expanded":  # a stride-0 view: one stored value, many elements
        t = torch.zeros(1, dtype=dtype).expand(draw(st.sampled_from([(64, 3, 7, 7), (10, 512), (2**20, 512)])))
    elif how == "view" and t.numel() > 1:
        t = t.view(-1)[1:]
    elif how == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    return t


leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8) | tensors()
keys = st.sampled_from(_NAMES) | st.text(max_size=12) | st.integers(-2, 2)
objects = st.recursive(leaves, lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
                       | st.dictionaries(keys, children, max_size=6), max_leaves=12)
# Mostly state_dict-like: dicts of tensors under resnet names, bare or wrapped as training scripts save them.
state_dicts = st.dictionaries(st.sampled_from(_NAMES) | st.text(max_size=12), tensors() | tensors() | objects,
                              max_size=8)
checkpoints = (state_dicts | st.fixed_dictionaries({"state_dict": state_dicts})
               | st.fixed_dictionaries({"model": state_dicts, "epoch": st.integers()}) | objects)


@fuzz_settings(40)
@given(obj=checkpoints)
def test_random_checkpoints_are_refused(scratch, obj):
    torch.save(obj, scratch)
    assert _only_model_format_error(scratch).startswith("refused")


@fuzz_settings(20)
@given(obj=objects, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_raw_pickles_are_refused(scratch, obj, protocol):
    """Plain pickles (not torch.save's format), including of tensors, which pickle by reference to torch."""
    assert _only_model_format_error(written(scratch, pickle.dumps(obj, protocol=protocol))).startswith("refused")


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory) -> bytes:
    """A small (not complete, so never loadable) state_dict in torch.save's zip format: its structure
    (zip records, the pickle, tensor records) is what byte mutations hit."""
    g = torch.Generator().manual_seed(0)
    sd = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g), "bn1.weight": torch.ones(64),
          "bn1.num_batches_tracked": torch.tensor(5), "fc.weight": torch.randn(10, 512, generator=g),
          "fc.bias": torch.zeros(10)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


@fuzz_settings(40)
@given(data=st.data())
def test_mutated_zip_checkpoint_is_refused(small_pth, scratch, data):
    mutations = data.draw(st.lists(_mutation(_KINDS), min_size=1, max_size=4), label="mutations")
    assert _only_model_format_error(written(scratch, apply(small_pth, mutations, len(small_pth)))).startswith("refused")


def write_legacy_bin(sd) -> bytes:
    """The design document's legacy .bin: magic, then per state_dict entry an int32 n_dims, the squeezed
    dims reversed, float32 data."""
    out = [struct.pack("<i", convert.LEGACY_MAGIC)]
    for t in sd.values():
        a = t.detach().squeeze().numpy().astype("<f4")
        out += [struct.pack(f"<i{a.ndim}i", a.ndim, *reversed(a.shape)), a.tobytes()]
    return b"".join(out)


@pytest.fixture(scope="module")
def legacy_r18(model_files) -> bytes:
    """The seeded resnet18 (10 classes) as a legacy .bin (from the fixture's checkpoint: no new model)."""
    return write_legacy_bin(torch.load(model_files(18, 10, "f16")[1], weights_only=True))


@fuzz_settings(15)
@given(data=st.data())
def test_mutated_legacy_bin(legacy_r18, scratch, data):
    """Loads (the mutation only changed weight values) or ModelFormatError: nothing else."""
    # "near" ones land in the first 64 KB, where the small records' headers are densest.
    mutations = data.draw(st.lists(_mutation(_KINDS), min_size=1, max_size=4), label="mutations")
    _only_model_format_error(written(scratch, apply(legacy_r18, mutations, 64 * 1024)))

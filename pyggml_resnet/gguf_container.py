"""A bounded reader of the GGUF container: header, metadata and tensor table, in pure Python, knowing nothing
of what the file describes (the ResNet schema is checked on top of it, in `loader`).

Not `gguf.GGUFReader`: on hostile input that reader loops and allocates without bound (a 149-byte file
claiming a 2**40-item array grows it by ~150 MB/s until the machine runs out of memory; a 48 MB file of two
million empty tensor entries keeps it busy for more than 30 s), recurses on nested arrays, and reads through a
memory map, which turns a file truncated while it is being read into SIGBUS, killing the process. This parser
checks every count and length against the bytes left in the file and against fixed limits (`_MAX_*`) before
using it, reads with plain `read()` calls, and keeps the values of only the keys it is asked for, so whatever
a file holds, reading it costs a bounded amount of memory and time, and a bad one raises ModelFormatError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFormatError

# The parser's limits. A valid ResNet file is far below each (resnet152: 777 tensors, 16 keys, ~24 KB of
# metadata, mostly ImageNet's labels); they bound what a hostile file can make the parser do.
MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # the same layout; version 1 had 32-bit counts
_MAX_META_BYTES = 64 << 20  # header + metadata + tensor table (a million labels of ~40 bytes fit)
_MAX_KV = 4096
_MAX_TENSORS = 4096
_MAX_ARRAY = 1 << 20  # items in one metadata array (a million class labels)
_MAX_KEY_BYTES = 1024
_MAX_STRING_BYTES = 1 << 20  # one metadata string
_MAX_NAME_BYTES = 63  # ggml's own limit on tensor names (GGML_MAX_NAME - 1)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32
_FIRST_READ = 1 << 16  # bytes read to parse the header; doubled while the tables need more

# GGUF metadata value types: code -> (name, struct format; None for STRING and ARRAY).
UINT32, BOOL, STRING, ARRAY = 4, 7, 8, 9
_VALUE_TYPES = {0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"), 4: ("UINT32", "I"),
                5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "?"), 8: ("STRING", None),
                9: ("ARRAY", None), 10: ("UINT64", "Q"), 11: ("INT64", "q"), 12: ("FLOAT64", "d")}
INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
FLOAT_TYPES = frozenset({6, 12})


class _NeedMore(Exception):
    """The parse ran past the bytes read so far (but not past the end of the file)."""


@dataclass(frozen=True)
class RawTensor:
    name: str
    ne: tuple[int, ...]  # ggml order
    type_code: int
    offset: int  # relative to the data section


@dataclass
class Container:
    """What the header, metadata and tensor table say, each length checked; no tensor data is read."""

    # key -> (type, value); type is a code, or (ARRAY, item code) with a tuple value; None for the values not kept
    fields: dict
    tensors: list[RawTensor]
    data_start: int
    alignment: int

    def get(self, key: str, allowed, what: str, *, array: bool = False, required: bool = True):
        """The value of `key`: a scalar or string whose type code is in `allowed`, or with `array`, a tuple
        whose item type code is in `allowed`. ModelFormatError if it is missing (and `required`) or of
        another type."""
        if key not in self.fields:
            if required:
                raise ModelFormatError(f"missing metadata key {key!r}")
            return None
        kind, value = self.fields[key]
        is_array = isinstance(kind, tuple)
        ok = is_array and kind[1] in allowed if array else not is_array and kind in allowed
        if not ok:
            raise ModelFormatError(f"metadata key {key!r} must be {what}, got {type_name(kind)}")
        return value

    def string(self, key: str, required: bool = True):
        return self.get(key, frozenset({STRING}), "a STRING", required=required)

    def integer(self, key: str, required: bool = True):
        return self.get(key, INT_TYPES, "an integer", required=required)

    def real(self, key: str):
        return self.get(key, FLOAT_TYPES, "a FLOAT32 or FLOAT64")

    def array(self, key: str, item_types, what: str) -> list:
        return list(self.get(key, item_types, f"an ARRAY of {what}", array=True))


def type_name(kind) -> str:
    """A value type's GGUF name: "UINT32", "ARRAY[STRING]", ..."""
    if isinstance(kind, tuple):
        return f"ARRAY[{_VALUE_TYPES[kind[1]][0]}]"
    return _VALUE_TYPES[kind][0]


class _Cursor:
    """Reads little-endian values from a file whose first len(buf) bytes are in buf. Every length is checked
    against the bytes left in the file before anything is read or allocated for it."""

    def __init__(self, buf: bytes, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> int:
        """Claims the next n bytes; returns where they start."""
        start = self.pos
        if n > self.size - start:
            raise ModelFormatError(f"the file ends inside {what} (at byte {start}, {n} bytes needed, "
                                   f"{self.size - start} left; truncated?)")
        if start + n > _MAX_META_BYTES:
            raise ModelFormatError(f"the header, metadata and tensor table are larger than {_MAX_META_BYTES} "
                                   f"bytes (reached at {what})")
        if start + n > len(self.buf):
            raise _NeedMore
        self.pos = start + n
        return start

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize("<" + fmt), what))

    def u32(self, what: str) -> int:
        return self.unpack("I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("Q", what)[0]

    def string(self, what: str, limit: int, keep: bool = True) -> str | None:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise ModelFormatError(f"{what} claims {n} bytes, more than the {limit} allowed")
        start = self.take(n, what)
        if not keep:
            return None
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{what} is not valid UTF-8") from None


def _value(c: _Cursor, type_code: int, what: str, keep: bool):
    """(type, value) of one metadata value; value is None unless kept."""
    if type_code not in _VALUE_TYPES:
        raise ModelFormatError(f"{what} has unknown value type {type_code}")
    if type_code == STRING:
        return type_code, c.string(what, _MAX_STRING_BYTES, keep)
    if type_code != ARRAY:
        value = c.unpack(_VALUE_TYPES[type_code][1], what)[0]
        return type_code, (value if keep else None)
    item_type = c.u32(f"the item type of {what}")
    count = c.u64(f"the length of {what}")
    if item_type == ARRAY:
        raise ModelFormatError(f"{what} is an array of arrays, which no model key is")
    if item_type not in _VALUE_TYPES:
        raise ModelFormatError(f"{what} is an array of unknown value type {item_type}")
    if count > _MAX_ARRAY:
        raise ModelFormatError(f"{what} claims {count} items, more than the {_MAX_ARRAY} allowed")
    if item_type == STRING:
        if count * 8 > c.size - c.pos:  # each string takes at least its 8-byte length
            raise ModelFormatError(f"{what} claims {count} strings, more than the rest of the file can hold "
                                   "(truncated?)")
        items = [c.string(f"item {i} of {what}", _MAX_STRING_BYTES, keep) for i in range(count)]
    else:
        fmt = _VALUE_TYPES[item_type][1]
        start = c.take(count * struct.calcsize("<" + fmt), f"the {count} items of {what}")
        items = struct.unpack_from(f"<{count}{fmt}", c.buf, start) if keep else ()
    return (ARRAY, item_type), (tuple(items) if keep else None)


def _parse(c: _Cursor, keep: frozenset[str]) -> Container:
    start = c.take(4, "the magic number")
    magic = bytes(c.buf[start:start + 4])
    if magic != MAGIC:
        raise ModelFormatError(f"not a GGUF file (it starts with {magic!r}, not {MAGIC!r}); a checkpoint "
                               "(.pth, .ckpt, .safetensors) runs once converted: pyggml-resnet convert CHECKPOINT "
                               "MODEL.gguf")
    version = c.u32("the version")
    if version not in _VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in _VERSIONS:
            raise ModelFormatError(f"a big-endian GGUF file (version {swapped}): only little-endian is supported")
        raise ModelFormatError(f"GGUF version {version} is not supported (only {' and '.join(map(str, _VERSIONS))})")
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    if n_tensors > _MAX_TENSORS:
        raise ModelFormatError(f"the header claims {n_tensors} tensors, more than the {_MAX_TENSORS} allowed")
    if n_kv > _MAX_KV:
        raise ModelFormatError(f"the header claims {n_kv} metadata keys, more than the {_MAX_KV} allowed")

    fields = {}
    for i in range(n_kv):
        key = c.string(f"the name of metadata key {i}", _MAX_KEY_BYTES)
        if key in fields:
            raise ModelFormatError(f"metadata key {key!r} appears twice")
        type_code = c.u32(f"the type of metadata key {key!r}")
        fields[key] = _value(c, type_code, f"metadata key {key!r}", keep=key in keep or key == "general.alignment")

    tensors = []
    for i in range(n_tensors):
        name = c.string(f"the name of tensor {i}", _MAX_NAME_BYTES)
        n_dims = c.u32(f"the dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise ModelFormatError(f"tensor {name!r} claims {n_dims} dimensions, more than ggml's {_MAX_DIMS}")
        ne = c.unpack(f"{n_dims}Q", f"the dimensions of tensor {name!r}")
        type_code, offset = c.unpack("IQ", f"the type and offset of tensor {name!r}")
        tensors.append(RawTensor(name, ne, type_code, offset))

    alignment = _DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        kind, alignment = fields["general.alignment"]
        if kind != UINT32:
            raise ModelFormatError(f"general.alignment must be a UINT32 power of two, got {type_name(kind)}")
        if not (alignment > 0 and alignment & (alignment - 1) == 0):
            raise ModelFormatError(f"general.alignment must be a UINT32 power of two, got {alignment}")
    data_start = c.pos + -c.pos % alignment
    return Container(fields, tensors, data_start, alignment)


def read_container(path: Path, size: int, keep: frozenset[str]) -> Container:
    """Parses the header, metadata and tensor table of the `size`-byte file at `path`, reading only as much of
    it as they take. The values of the keys in `keep` are kept (and general.alignment's), others skipped."""
    n = min(size, _FIRST_READ)
    with open(path, "rb") as f:
        while True:
            f.seek(0)
            buf = f.read(n)
            if len(buf) != n:
                raise ModelFormatError(f"{path}: the file shrank while it was read")
            try:
                return _parse(_Cursor(buf, size), keep)
            except _NeedMore:
                n = min(size, 2 * n, _MAX_META_BYTES)

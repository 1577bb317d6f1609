"""Reads a ResNet GGUF file (written by `pyggml_resnet.convert`) and checks every field before use.

Like ggml's examples/mnist: one file, dispatch on `general.architecture`, every tensor's type and shape
checked against what the architecture expects. Anything wrong raises ModelFormatError; nothing from the
file reaches ggml unchecked. Weights are read one at a time, as float32 NumPy arrays in PyTorch's shapes.

The header, metadata and tensor table are parsed here, in pure Python, not with `gguf.GGUFReader`. On hostile
input that reader loops and allocates without bound (a 149-byte file claiming a 2**40-item array grows it by
~150 MB/s until the machine runs out of memory; a 48 MB file of two million empty tensor entries keeps it
busy for more than 30 s), recurses on nested arrays, and reads through a memory map, which turns a file
truncated while it is being read into SIGBUS, killing the process. This parser checks every count and length against the bytes left in the file and
against fixed limits (`_MAX_*`) before using it, reads with plain `read()` calls, and keeps only the keys
the loader uses, so whatever a file holds, reading it costs a bounded amount of memory and time, and a bad
one raises ModelFormatError.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import arch, dtypes, errors
from .arch import Key, Preprocessing, ResNetConfig
from .errors import ModelFormatError

_MAX_CLASSES = 1_000_000

# The parser's limits. A valid ResNet file is far below each (resnet152: 777 tensors, 16 keys, ~24 KB of
# metadata, mostly ImageNet's labels); they bound what a hostile file can make the parser do.
_GGUF_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # the same layout; version 1 had 32-bit counts
_MAX_META_BYTES = 64 << 20  # header + metadata + tensor table (a million labels of ~40 bytes fit)
_MAX_KV = 4096
_MAX_TENSORS = 4096
_MAX_ARRAY = 1 << 20  # items in one metadata array (>= _MAX_CLASSES labels)
_MAX_KEY_BYTES = 1024
_MAX_STRING_BYTES = 1 << 20  # one metadata string
_MAX_NAME_BYTES = 63  # ggml's own limit on tensor names (GGML_MAX_NAME - 1)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32
_FIRST_READ = 1 << 16  # bytes read to parse the header; doubled while the tables need more

# GGUF metadata value types: code -> (name, struct format; None for STRING and ARRAY).
_UINT32, _BOOL, _STRING, _ARRAY = 4, 7, 8, 9
_VALUE_TYPES = {0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"), 4: ("UINT32", "I"),
                5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "?"), 8: ("STRING", None),
                9: ("ARRAY", None), 10: ("UINT64", "Q"), 11: ("INT64", "q"), 12: ("FLOAT64", "d")}
_INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_FLOAT_TYPES = frozenset({6, 12})
_KEPT_KEYS = frozenset(v for k, v in vars(Key).items() if k.isupper()) | {"general.alignment"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one checked tensor lies in the file and how to decode it."""

    shape: tuple[int, ...]  # PyTorch's shape
    kind: str  # "f32", "f16", "bf16" or "q8_0"
    offset: int  # absolute, in bytes
    n_bytes: int


@dataclass
class ModelFile:
    """What a GGUF model file holds, validated. Tensor data is read on demand, one tensor at a time, so
    loading never holds a second copy of the whole model in memory."""

    path: Path
    config: ResNetConfig
    num_classes: int
    labels: tuple[str, ...]
    eps: float
    preprocessing: Preprocessing
    weights_name: str
    dtype: str  # the type the conv and fc weights are stored in
    infos: dict[str, TensorInfo] = field(repr=False)
    identity: tuple = field(repr=False)  # (device, inode, size, mtime) of the file checked

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor, read at once (for tools; the model itself streams them with `tensor`)."""
        return {name: self.tensor(name) for name in self.infos}

    def tensor(self, name: str, scratch: np.ndarray | None = None) -> np.ndarray:
        """The tensor's values as float32 in its PyTorch shape. Raises ModelFormatError if the file changed
        since it was checked (replaced, rewritten, truncated), and for NaN or infinite values or negative
        BatchNorm variances.

        `scratch`, a uint8 array at least as large as the tensor's data (for a loader reading one tensor
        after another): the bytes are read into it rather than into fresh memory, which the OS would have to
        fault in page by page, and an f32 tensor's values are a view of it, overwritten by the next read."""
        info = self.infos[name]
        fits = scratch is not None and scratch.size >= info.n_bytes
        raw = scratch[:info.n_bytes] if fits else np.empty(info.n_bytes, np.uint8)
        with open(self.path, "rb") as f:
            if _identity(os.fstat(f.fileno())) != self.identity:
                raise ModelFormatError(f"{self.path}: the file changed after it was checked")
            f.seek(info.offset)
            if f.readinto(memoryview(raw)) != info.n_bytes:
                raise ModelFormatError(f"{self.path}: tensor {name!r} is cut short (file truncated?)")
        values = dtypes.BY_NAME[info.kind].decode(raw).reshape(info.shape)
        if not np.isfinite(values).all():
            raise ModelFormatError(f"{self.path}: tensor {name!r} contains NaN or infinite values")
        if name.endswith(".running_var") and (values < 0).any():
            raise ModelFormatError(f"{self.path}: tensor {name!r} holds negative variances")
        return values


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------------------------------------
# The GGUF container: header, metadata, tensor table


class _NeedMore(Exception):
    """The parse ran past the bytes read so far (but not past the end of the file)."""


@dataclass(frozen=True)
class _RawTensor:
    name: str
    ne: tuple[int, ...]  # ggml order
    type_code: int
    offset: int  # relative to the data section


@dataclass
class _Container:
    fields: dict  # key -> (type, value); type is a code, or (ARRAY, item code) with a tuple value
    tensors: list[_RawTensor]
    data_start: int
    alignment: int


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
    if type_code == _STRING:
        return type_code, c.string(what, _MAX_STRING_BYTES, keep)
    if type_code != _ARRAY:
        value = c.unpack(_VALUE_TYPES[type_code][1], what)[0]
        return type_code, (value if keep else None)
    item_type = c.u32(f"the item type of {what}")
    count = c.u64(f"the length of {what}")
    if item_type == _ARRAY:
        raise ModelFormatError(f"{what} is an array of arrays, which no model key is")
    if item_type not in _VALUE_TYPES:
        raise ModelFormatError(f"{what} is an array of unknown value type {item_type}")
    if count > _MAX_ARRAY:
        raise ModelFormatError(f"{what} claims {count} items, more than the {_MAX_ARRAY} allowed")
    if item_type == _STRING:
        if count * 8 > c.size - c.pos:  # each string takes at least its 8-byte length
            raise ModelFormatError(f"{what} claims {count} strings, more than the rest of the file can hold "
                                   "(truncated?)")
        items = [c.string(f"item {i} of {what}", _MAX_STRING_BYTES, keep) for i in range(count)]
    else:
        fmt = _VALUE_TYPES[item_type][1]
        start = c.take(count * struct.calcsize("<" + fmt), f"the {count} items of {what}")
        items = struct.unpack_from(f"<{count}{fmt}", c.buf, start) if keep else ()
    return (_ARRAY, item_type), (tuple(items) if keep else None)


def _parse(c: _Cursor) -> _Container:
    start = c.take(4, "the magic number")
    magic = bytes(c.buf[start:start + 4])
    if magic != _GGUF_MAGIC:
        raise ModelFormatError(f"not a GGUF file (it starts with {magic!r}, not {_GGUF_MAGIC!r}); a checkpoint "
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
        fields[key] = _value(c, type_code, f"metadata key {key!r}", keep=key in _KEPT_KEYS)

    tensors = []
    for i in range(n_tensors):
        name = c.string(f"the name of tensor {i}", _MAX_NAME_BYTES)
        n_dims = c.u32(f"the dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise ModelFormatError(f"tensor {name!r} claims {n_dims} dimensions, more than ggml's {_MAX_DIMS}")
        ne = c.unpack(f"{n_dims}Q", f"the dimensions of tensor {name!r}")
        type_code, offset = c.unpack("IQ", f"the type and offset of tensor {name!r}")
        tensors.append(_RawTensor(name, ne, type_code, offset))

    alignment = _DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        kind, alignment = fields["general.alignment"]
        if kind != _UINT32:
            raise ModelFormatError(f"general.alignment must be a UINT32 power of two, got {_type_name(kind)}")
        if not (alignment > 0 and alignment & (alignment - 1) == 0):
            raise ModelFormatError(f"general.alignment must be a UINT32 power of two, got {alignment}")
    data_start = c.pos + -c.pos % alignment
    return _Container(fields, tensors, data_start, alignment)


def _read_container(path: Path, size: int) -> _Container:
    """Parses the header, metadata and tensor table, reading only as much of the file as they take."""
    n = min(size, _FIRST_READ)
    with open(path, "rb") as f:
        while True:
            f.seek(0)
            buf = f.read(n)
            if len(buf) != n:
                raise ModelFormatError(f"{path}: the file shrank while it was read")
            try:
                return _parse(_Cursor(buf, size))
            except _NeedMore:
                n = min(size, 2 * n, _MAX_META_BYTES)


# ------------------------------------------------------------------------------------------------------------
# The metadata


def _type_name(kind) -> str:
    if isinstance(kind, tuple):
        return f"ARRAY[{_VALUE_TYPES[kind[1]][0]}]"
    return _VALUE_TYPES[kind][0]


def _get(fields, key: str, allowed, what: str, *, array: bool = False, required: bool = True):
    """The value of `key`: a scalar or string whose type code is in `allowed`, or with `array`, a tuple
    whose item type code is in `allowed`."""
    if key not in fields:
        if required:
            raise ModelFormatError(f"missing metadata key {key!r}")
        return None
    kind, value = fields[key]
    ok = isinstance(kind, tuple) and kind[1] in allowed if array else not isinstance(kind, tuple) and kind in allowed
    if not ok:
        raise ModelFormatError(f"metadata key {key!r} must be {what}, got {_type_name(kind)}")
    return value


def _string(fields, key, required=True):
    return _get(fields, key, frozenset({_STRING}), "a STRING", required=required)


def _integer(fields, key, required=True):
    return _get(fields, key, _INT_TYPES, "an integer", required=required)


def _float(fields, key):
    return _get(fields, key, _FLOAT_TYPES, "a FLOAT32 or FLOAT64")


def _array(fields, key, item_types, what):
    return list(_get(fields, key, item_types, f"an ARRAY of {what}", array=True))


def _size(fields, key):
    """A resize or crop: an integer N, an ARRAY of two, (height, width) as a tuple, or the STRING "none" (no
    resize or crop: None); its range is `Preprocessing.problem`'s to check."""
    kind = fields[key][0] if key in fields else None
    what = f"metadata {key!r} must be an integer, an ARRAY of 2 (height, width) or \"none\""
    if kind == _STRING:
        if _string(fields, key) != "none":
            raise ModelFormatError(f"metadata {key!r} must be an integer, got STRING {_string(fields, key)[:100]!r} "
                                   "(or an ARRAY of 2, (height, width), or \"none\")")
        return None
    if not isinstance(kind, tuple):
        return _integer(fields, key)
    value = tuple(_array(fields, key, _INT_TYPES, "integers"))
    if len(value) != 2:
        raise ModelFormatError(f"{what}, got {len(value)} items")
    return value


def _positive_int(value: int, key: str, limit: int) -> int:
    if not 0 < value <= limit:
        raise ModelFormatError(f"metadata {key!r} must be an integer in 1..{limit}, got {value!r}")
    return value


def _metadata(fields) -> tuple[ResNetConfig, int, tuple[str, ...], float, Preprocessing, str]:
    architecture = _string(fields, Key.ARCH)
    if architecture != arch.GGUF_ARCH:
        raise ModelFormatError(f"general.architecture is {architecture[:100]!r}, expected {arch.GGUF_ARCH!r}")
    block = _string(fields, Key.BLOCK)
    if block not in ("basic", "bottleneck"):
        raise ModelFormatError(f"{Key.BLOCK} is {block[:100]!r}, expected 'basic' or 'bottleneck'")
    layers = _array(fields, Key.LAYERS, _INT_TYPES, "integers")
    if len(layers) != 4:
        raise ModelFormatError(f"{Key.LAYERS} must list 4 stages, got {layers[:8]!r}"
                               + (f" ({len(layers)} items)" if len(layers) > 8 else ""))
    # Files written before Wide ResNet and ResNeXt support have no groups key (and width 64): plain ResNets.
    groups, width = _integer(fields, Key.GROUPS, required=False), _integer(fields, Key.WIDTH, required=False)
    cfg = arch.config_for(block, layers, 1 if groups is None else _positive_int(groups, Key.GROUPS, arch.MAX_GROUPS),
                          64 if width is None else _positive_int(width, Key.WIDTH, arch.MAX_WIDTH_PER_GROUP))
    depth = _integer(fields, Key.DEPTH)
    if depth != cfg.depth:
        raise ModelFormatError(f"{Key.DEPTH} is {depth} but the blocks describe {cfg.name}")
    num_classes = _positive_int(_integer(fields, Key.NUM_CLASSES), Key.NUM_CLASSES, _MAX_CLASSES)
    labels = tuple(_array(fields, Key.LABELS, frozenset({_STRING}), "strings"))
    if len(labels) != num_classes:
        raise ModelFormatError(f"{Key.LABELS} must hold {num_classes} strings, got {len(labels)}")
    eps = _float(fields, Key.BN_EPS)
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ModelFormatError(f"{Key.BN_EPS} must be in (0, 1), got {eps!r}")
    antialias = _get(fields, Key.ANTIALIAS, frozenset({_BOOL}), "a BOOL", required=False)
    pre = Preprocessing(resize=_size(fields, Key.RESIZE), crop=_size(fields, Key.CROP),
                        mean=tuple(_array(fields, Key.MEAN, _FLOAT_TYPES, "floats")),
                        std=tuple(_array(fields, Key.STD, _FLOAT_TYPES, "floats")),
                        interpolation=_string(fields, Key.INTERPOLATION),
                        antialias=True if antialias is None else antialias)
    problem = pre.problem(keys=True)
    if problem:
        raise ModelFormatError(problem)
    weights_name = _string(fields, Key.WEIGHTS, required=False) or "custom"
    return cfg, num_classes, labels, eps, pre, weights_name


def _tensor_info(t: _RawTensor, expected: tuple[int, ...], data_start: int, alignment: int,
                 size: int) -> TensorInfo:
    """Checks one tensor's type, shape and extent in the file, without reading its data."""
    name = t.name
    dtype = dtypes.BY_CODE.get(t.type_code)  # the types `convert --dtype` writes
    if dtype is None:
        raise ModelFormatError(f"tensor {name!r} has unsupported type code {t.type_code}")
    kind = dtype.name
    if kind != "f32" and len(expected) == 1:
        raise ModelFormatError(f"tensor {name!r} must be f32, got {kind}")
    shape = tuple(reversed(t.ne))  # GGUF lists dims in ggml order
    flat = (expected[0], math.prod(expected[1:])) if len(expected) == 4 else None
    if shape != expected and not (kind == "q8_0" and shape == flat):
        raise ModelFormatError(f"tensor {name!r} has shape {shape}, expected {expected}")
    if shape[-1] % dtype.block_size:
        raise ModelFormatError(f"tensor {name!r}: rows of {shape[-1]} do not fill {kind} blocks of {dtype.block_size}")
    n_bytes = dtype.nbytes(math.prod(shape))
    if t.offset % alignment:
        raise ModelFormatError(f"tensor {name!r} has offset {t.offset}, not a multiple of the alignment {alignment}")
    offset = data_start + t.offset
    if offset + n_bytes > size:
        raise ModelFormatError(f"tensor {name!r} extends past the end of the file (truncated?)")
    return TensorInfo(expected, kind, offset, n_bytes)


def read(path: str | os.PathLike) -> ModelFile:
    """Reads and validates a model file.

    Raises FileNotFoundError if nothing is at `path`, IsADirectoryError for a directory, another OSError
    if it cannot be read, and ModelFormatError for anything else that is not a valid ResNet GGUF file
    (including special files such as FIFOs and devices)."""
    path = Path(path)
    st = os.stat(path)  # FileNotFoundError, PermissionError, ...
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a directory, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(f"{path} is not a regular file")
    size = st.st_size
    with errors.in_file(path):
        container = _read_container(path, size)
        cfg, num_classes, labels, eps, pre, weights_name = _metadata(container.fields)
        arch.check_tensor_names(cfg, num_classes, [t.name for t in container.tensors])
        expected = arch.expected_tensors(cfg, num_classes)
        found = {t.name: t for t in container.tensors}
        infos = {name: _tensor_info(found[name], shape, container.data_start, container.alignment, size)
                 for name, shape in expected.items()}
        spans = sorted((i.offset, i.offset + i.n_bytes, n) for n, i in infos.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ModelFormatError(f"the data of tensors {a!r} and {b!r} overlap")
        kinds = {i.kind for i in infos.values() if len(i.shape) > 1}
        dtype = "q8_0" if "q8_0" in kinds else next(iter(kinds - {"f32"}), "f32")
        if len(kinds - {"f32", dtype}):
            raise ModelFormatError(f"weights mix types {sorted(kinds)}")
    return ModelFile(path, cfg, num_classes, labels, eps, pre, weights_name, dtype, infos, _identity(st))

"""Reads a ResNet GGUF file (written by `pyggml_resnet.convert`) and checks every field before use.

Like ggml's examples/mnist: one file, dispatch on `general.architecture`, every tensor's type and shape
checked against what the architecture expects. Anything wrong raises ModelFormatError; nothing from the
file reaches ggml unchecked. Weights are read one at a time, as float32 NumPy arrays in PyTorch's shapes.

The container (header, metadata, tensor table) is parsed by `gguf_container`, a bounded reader that knows
nothing of ResNets; this module checks what it found against the ResNet schema (`arch`): the keys and their
values, and every tensor's name, type, shape and extent.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import arch, dtypes, errors
from .gguf_container import BOOL, FLOAT_TYPES, INT_TYPES, STRING, Container, RawTensor, read_container
from .arch import InputQuant, Key, Preprocessing, ResNetConfig
from .errors import ModelFormatError

_MAX_CLASSES = 1_000_000
_KEYS = frozenset(v for k, v in vars(Key).items() if k.isupper())  # the metadata the schema reads


@dataclass(frozen=True)
class TensorInfo:
    """Where one checked tensor lies in the file and how to decode it."""

    shape: tuple[int, ...]  # PyTorch's shape
    kind: str  # "f32", "f16", "bf16", "q8_0" or "int8"
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
    dtype: str  # the type the conv and fc weights are stored in ("int8": an int8 file, docs/gguf.md)
    infos: dict[str, TensorInfo] = field(repr=False)
    identity: tuple = field(repr=False)  # (device, inode, size, mtime) of the file checked
    input_quants: dict[str, InputQuant] | None = field(default=None, repr=False)  # an int8 file's, by conv
    # An int8 file's u8 quantization of each downsample's output, by conv; None where it keeps them f32.
    shortcut_quants: dict[str, InputQuant] | None = field(default=None, repr=False)

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor, read at once (for tools; the model itself streams them with `tensor`)."""
        return {name: self.tensor(name) for name in self.infos}

    def tensor(self, name: str, scratch: np.ndarray | None = None, decode=None) -> np.ndarray:
        """The tensor's values as float32 in its PyTorch shape (an int8 file's s8 weights: as int8, -127..127).
        Raises ModelFormatError if the file changed since it was checked (replaced, rewritten, truncated), and
        for NaN or infinite values, negative BatchNorm variances or weight scales, or an s8 value of -128.

        `scratch`, a uint8 array at least as large as the tensor's data (for a loader reading one tensor
        after another): the bytes are read into it rather than into fresh memory, which the OS would have to
        fault in page by page, and an f32 tensor's values are a view of it, overwritten by the next read.
        `decode(kind, raw)`: the stored bytes of a type ("f16", ...) -> flat float32, the values `dtypes` gives
        (the binding's C conversions, which the model's loading passes)."""
        info = self.infos[name]
        fits = scratch is not None and scratch.size >= info.n_bytes
        raw = scratch[:info.n_bytes] if fits else np.empty(info.n_bytes, np.uint8)
        with open(self.path, "rb") as f:
            if _identity(os.fstat(f.fileno())) != self.identity:
                raise ModelFormatError(f"{self.path}: the file changed after it was checked")
            f.seek(info.offset)
            if f.readinto(memoryview(raw)) != info.n_bytes:
                raise ModelFormatError(f"{self.path}: tensor {name!r} is cut short (file truncated?)")
        values = (dtypes.I8.decode(raw) if info.kind == "int8" else (decode or _decode)(info.kind, raw)).reshape(info.shape)
        if not np.isfinite(values).all():
            raise ModelFormatError(f"{self.path}: tensor {name!r} contains NaN or infinite values")
        if name.endswith(".running_var") and (values < 0).any():
            raise ModelFormatError(f"{self.path}: tensor {name!r} holds negative variances")
        if name.endswith(".weight_scale") and (values < 0).any():
            raise ModelFormatError(f"{self.path}: tensor {name!r} holds negative scales")
        if info.kind == "int8" and (values == -128).any():
            raise ModelFormatError(f"{self.path}: tensor {name!r} holds -128 (s8 weights are -127..127)")
        return values


def _decode(kind: str, raw: np.ndarray) -> np.ndarray:
    return dtypes.BY_NAME[kind].decode(raw)


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------------------------------------
# The ResNet schema


def _size(c: Container, key: str):
    """A resize or crop: an integer N, an ARRAY of two, (height, width) as a tuple, or the STRING "none" (no
    resize or crop: None); its range is `Preprocessing.problem`'s to check."""
    kind = c.fields[key][0] if key in c.fields else None
    if kind == STRING:
        if c.string(key) != "none":
            raise ModelFormatError(f"metadata {key!r} must be an integer, got STRING {c.string(key)[:100]!r} "
                                   "(or an ARRAY of 2, (height, width), or \"none\")")
        return None
    if not isinstance(kind, tuple):
        return c.integer(key)
    value = tuple(c.array(key, INT_TYPES, "integers"))
    if len(value) != 2:
        raise ModelFormatError(f"metadata {key!r} must be an integer, an ARRAY of 2 (height, width) or \"none\", "
                               f"got {len(value)} items")
    return value


def _positive_int(value: int, key: str, limit: int) -> int:
    if not 0 < value <= limit:
        raise ModelFormatError(f"metadata {key!r} must be an integer in 1..{limit}, got {value!r}")
    return value


def _metadata(c: Container) -> tuple[ResNetConfig, int, tuple[str, ...], float, Preprocessing, str]:
    architecture = c.string(Key.ARCH)
    if architecture != arch.GGUF_ARCH:
        raise ModelFormatError(f"general.architecture is {architecture[:100]!r}, expected {arch.GGUF_ARCH!r}")
    block = c.string(Key.BLOCK)
    if block not in ("basic", "bottleneck"):
        raise ModelFormatError(f"{Key.BLOCK} is {block[:100]!r}, expected 'basic' or 'bottleneck'")
    layers = c.array(Key.LAYERS, INT_TYPES, "integers")
    if len(layers) != 4:
        raise ModelFormatError(f"{Key.LAYERS} must list 4 stages, got {layers[:8]!r}"
                               + (f" ({len(layers)} items)" if len(layers) > 8 else ""))
    # Files written before Wide ResNet and ResNeXt support have no groups key (and width 64): plain ResNets.
    groups, width = c.integer(Key.GROUPS, required=False), c.integer(Key.WIDTH, required=False)
    cfg = arch.config_for(block, layers, 1 if groups is None else _positive_int(groups, Key.GROUPS, arch.MAX_GROUPS),
                          64 if width is None else _positive_int(width, Key.WIDTH, arch.MAX_WIDTH_PER_GROUP))
    depth = c.integer(Key.DEPTH)
    if depth != cfg.depth:
        raise ModelFormatError(f"{Key.DEPTH} is {depth} but the blocks describe {cfg.name}")
    num_classes = _positive_int(c.integer(Key.NUM_CLASSES), Key.NUM_CLASSES, _MAX_CLASSES)
    labels = tuple(c.array(Key.LABELS, frozenset({STRING}), "strings"))
    if len(labels) != num_classes:
        raise ModelFormatError(f"{Key.LABELS} must hold {num_classes} strings, got {len(labels)}")
    eps = c.real(Key.BN_EPS)
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ModelFormatError(f"{Key.BN_EPS} must be in (0, 1), got {eps!r}")
    antialias = c.get(Key.ANTIALIAS, frozenset({BOOL}), "a BOOL", required=False)
    pre = Preprocessing(resize=_size(c, Key.RESIZE), crop=_size(c, Key.CROP),
                        mean=tuple(c.array(Key.MEAN, FLOAT_TYPES, "floats")),
                        std=tuple(c.array(Key.STD, FLOAT_TYPES, "floats")),
                        interpolation=c.string(Key.INTERPOLATION),
                        antialias=True if antialias is None else antialias)
    problem = pre.problem(keys=True)
    if problem:
        raise ModelFormatError(problem)
    weights_name = c.string(Key.WEIGHTS, required=False) or "custom"
    return cfg, num_classes, labels, eps, pre, weights_name


def _quants(c: Container, keys: tuple[str, str], names: list[str], what: str) -> dict[str, InputQuant] | None:
    """The u8 quantizations that the scale and zero point arrays `keys` hold, one for each of `names` (`what`
    they are), every value checked; None where neither key is there."""
    scale_key, zero_key = keys
    scales = c.get(scale_key, FLOAT_TYPES, "an ARRAY of floats", array=True, required=False)
    zeros = c.get(zero_key, INT_TYPES, "an ARRAY of integers", array=True, required=False)
    if scales is None and zeros is None:
        return None
    for key, values in ((scale_key, scales), (zero_key, zeros)):
        if values is None or len(values) != len(names):
            raise ModelFormatError(f"an int8 file needs {key} with {len(names)} values (one per {what}), got "
                                   f"{'none' if values is None else len(values)}")
    if not all(math.isfinite(v) and 0 < v <= 3.4e38 for v in scales):
        raise ModelFormatError(f"{scale_key} must hold finite positive scales")
    if not all(0 <= v <= 255 for v in zeros):
        raise ModelFormatError(f"{zero_key} must hold zero points in 0..255")
    return {name: InputQuant(float(s), int(z)) for name, s, z in zip(names, scales, zeros)}


def _int8_quants(c: Container, cfg: ResNetConfig) -> tuple[dict[str, InputQuant] | None, dict[str, InputQuant] | None]:
    """An int8 file's input quantization of each ungrouped conv (Key.INPUT_SCALE, Key.INPUT_ZERO; None for a
    float file: neither key), and of each downsample's output (Key.SHORTCUT_SCALE, Key.SHORTCUT_ZERO; None
    where the file has neither: its shortcuts stay f32)."""
    inputs = _quants(c, (Key.INPUT_SCALE, Key.INPUT_ZERO),
                     [conv.name for conv in arch.convolutions(cfg) if conv.groups == 1], "ungrouped convolution")
    shortcuts = _quants(c, (Key.SHORTCUT_SCALE, Key.SHORTCUT_ZERO), [d.name for d in arch.downsamples(cfg)],
                        "downsample convolution")
    return inputs, shortcuts


def _tensor_kind(name: str, code: int, expected: tuple[int, ...], int8: frozenset | None) -> dtypes.DType:
    """The tensor's type, if a file of its kind may hold it there: an int8 file's (`int8`: the names of its
    s8 tensors, the ungrouped conv weights) s8 tensors are int8 and everything else f32; a float file holds
    no int8 and f32 vectors."""
    dtype = dtypes.STORED_BY_CODE.get(code)  # the types `convert --dtype` writes
    if dtype is None:
        raise ModelFormatError(f"tensor {name!r} has unsupported type code {code}")
    kind = dtype.name
    if int8 is not None:
        want = "int8" if name in int8 else "f32"
        if kind != want:
            raise ModelFormatError(f"tensor {name!r} of an int8 file must be {want}, got {kind}")
    elif kind != "f32" and len(expected) == 1:  # (int8 in a float file: refused by `read`)
        raise ModelFormatError(f"tensor {name!r} must be f32, got {kind}")
    return dtype


def _tensor_info(t: RawTensor, expected: tuple[int, ...], data_start: int, alignment: int,
                 size: int, int8: frozenset | None = None) -> TensorInfo:
    """Checks one tensor's type, shape and extent in the file, without reading its data."""
    name = t.name
    dtype = _tensor_kind(name, t.type_code, expected, int8)
    kind = dtype.name
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
        container = read_container(path, size, _KEYS)
        cfg, num_classes, labels, eps, pre, weights_name = _metadata(container)
        quants, shortcut_quants = _int8_quants(container, cfg)
        if quants is None and any(t.type_code == dtypes.I8.code for t in container.tensors):
            raise ModelFormatError(f"the file holds int8 weights but not their activation ranges ({Key.INPUT_SCALE}, "
                                   f"{Key.INPUT_ZERO}): convert the checkpoint with --dtype int8 --calibration IMAGES")
        if shortcut_quants is not None and quants is None:
            raise ModelFormatError(f"{Key.SHORTCUT_SCALE} and {Key.SHORTCUT_ZERO} belong to int8 files, which also "
                                   f"hold {Key.INPUT_SCALE} and {Key.INPUT_ZERO}")
        int8 = None if quants is None else frozenset(quants)  # the s8 tensors: the calibrated convs' weights
        arch.check_tensor_names(cfg, num_classes, [t.name for t in container.tensors], int8=int8 is not None)
        expected = arch.expected_tensors(cfg, num_classes, int8 is not None)
        found = {t.name: t for t in container.tensors}
        infos = {name: _tensor_info(found[name], shape, container.data_start, container.alignment, size, int8)
                 for name, shape in expected.items()}
        spans = sorted((i.offset, i.offset + i.n_bytes, n) for n, i in infos.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ModelFormatError(f"the data of tensors {a!r} and {b!r} overlap")
        kinds = {i.kind for i in infos.values() if len(i.shape) > 1}
        dtype = "q8_0" if "q8_0" in kinds else next(iter(kinds - {"f32"}), "f32")
        if len(kinds - {"f32", dtype}):
            raise ModelFormatError(f"weights mix types {sorted(kinds)}")
    return ModelFile(path, cfg, num_classes, labels, eps, pre, weights_name, "int8" if quants else dtype, infos,
                     _identity(st), quants, shortcut_quants)


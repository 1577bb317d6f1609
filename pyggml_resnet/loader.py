"""Reads a ResNet GGUF file (written by `pyggml_resnet.convert`) and checks every field before use.

Like ggml's examples/mnist: one file, dispatch on `general.architecture`, every tensor's type and shape
checked against what the architecture expects. Anything wrong raises ModelFormatError; nothing from the
file reaches ggml unchecked. Weights are read one at a time, as float32 NumPy arrays in PyTorch's shapes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import arch
from .arch import Key, Preprocessing, ResNetConfig
from .errors import ModelFormatError

# Tensor types a model file may hold, by GGUF type code: what `convert --dtype` writes.
_TYPES = {0: "f32", 1: "f16", 30: "bf16", 8: "q8_0"}
_REDUCED_OK = ("f16", "bf16", "q8_0")  # allowed for conv and fc weights only
_MAX_CLASSES = 1_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one checked tensor lies in the file and how to decode it."""

    shape: tuple[int, ...]  # PyTorch's shape
    kind: str  # "f32", "f16", "bf16" or "q8_0"
    offset: int  # absolute, in bytes
    n_bytes: int
    row: int  # elements per stored row (the stored ggml ne[0])


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

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor, read at once (for tools; the model itself streams them with `tensor`)."""
        return {name: self.tensor(name) for name in self.infos}

    def tensor(self, name: str) -> np.ndarray:
        """The tensor's values as float32 in its PyTorch shape. Raises ModelFormatError for a short read
        (the file changed since it was checked) or NaN/infinite values."""
        info = self.infos[name]
        raw = np.empty(info.n_bytes, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            if f.readinto(memoryview(raw)) != info.n_bytes:
                raise ModelFormatError(f"{self.path}: tensor {name!r} is cut short (file truncated?)")
        if info.kind == "f32":
            values = raw.view(np.float32)
        elif info.kind == "f16":
            values = raw.view(np.float16).astype(np.float32)
        else:
            import gguf

            qtype = gguf.GGMLQuantizationType[info.kind.upper()]
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            values = gguf.quants.dequantize(raw.reshape(-1, info.row // block * block_bytes), qtype)
        values = values.reshape(info.shape).astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise ModelFormatError(f"{self.path}: tensor {name!r} contains NaN or infinite values")
        return values


def _reader(path: Path):
    import gguf  # imported here: it is the slowest import of the package and only loading needs it

    try:
        return gguf.GGUFReader(path, "r")
    except MemoryError:
        raise
    except Exception as e:  # gguf raises ValueError, struct errors, IndexError... on malformed files
        raise ModelFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, kind: type, *, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ModelFormatError(f"missing metadata key {key!r}")
        return None
    try:
        if kind is str:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        if kind is list:
            values = [f.parts[i] for i in f.data]
            if values and isinstance(values[0], np.ndarray) and values[0].dtype == np.uint8:
                return [bytes(v).decode("utf-8") for v in values]
            return [v.item() for v in values]
        value = f.parts[f.data[0]]
        return kind(value.item() if hasattr(value, "item") else value[0])
    except (IndexError, ValueError, UnicodeDecodeError, TypeError) as e:
        raise ModelFormatError(f"metadata key {key!r} has an unexpected value ({e})") from None


def _positive_int(value, key: str, limit: int) -> int:
    if not isinstance(value, (int, np.integer)) or not 0 < value <= limit:
        raise ModelFormatError(f"metadata {key!r} must be an integer in 1..{limit}, got {value!r}")
    return int(value)


def _metadata(reader) -> tuple[ResNetConfig, int, tuple[str, ...], float, Preprocessing, str]:
    architecture = _field(reader, Key.ARCH, str)
    if architecture != arch.GGUF_ARCH:
        raise ModelFormatError(f"general.architecture is {architecture!r}, expected {arch.GGUF_ARCH!r}")
    block = _field(reader, Key.BLOCK, str)
    layers = _field(reader, Key.LAYERS, list)
    if len(layers) != 4:
        raise ModelFormatError(f"{Key.LAYERS} must list 4 stages, got {layers!r}")
    cfg = arch.config_for(block, layers)
    depth = _field(reader, Key.DEPTH, int)
    if depth != cfg.depth:
        raise ModelFormatError(f"{Key.DEPTH} is {depth} but the blocks describe {cfg.name}")
    num_classes = _positive_int(_field(reader, Key.NUM_CLASSES, int), Key.NUM_CLASSES, _MAX_CLASSES)
    labels = tuple(_field(reader, Key.LABELS, list))
    if len(labels) != num_classes or not all(isinstance(s, str) for s in labels):
        raise ModelFormatError(f"{Key.LABELS} must hold {num_classes} strings, got {len(labels)}")
    eps = _field(reader, Key.BN_EPS, float)
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise ModelFormatError(f"{Key.BN_EPS} must be in (0, 1), got {eps!r}")
    mean, std = _field(reader, Key.MEAN, list), _field(reader, Key.STD, list)
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ModelFormatError(f"preprocessing mean/std must be 3 finite numbers (std > 0), got {mean}, {std}")
    interpolation = _field(reader, Key.INTERPOLATION, str)
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ModelFormatError(f"unknown interpolation {interpolation!r}")
    pre = Preprocessing(resize=_positive_int(_field(reader, Key.RESIZE, int), Key.RESIZE, 8192),
                        crop=_positive_int(_field(reader, Key.CROP, int), Key.CROP, 8192),
                        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                        interpolation=interpolation)
    weights_name = _field(reader, Key.WEIGHTS, str, required=False) or "custom"
    return cfg, num_classes, labels, eps, pre, weights_name


def _tensor_info(t, expected: tuple[int, ...], size: int) -> TensorInfo:
    """Checks one tensor's type, shape and extent in the file, without reading its data."""
    import gguf

    name = t.name
    kind = _TYPES.get(int(t.tensor_type))
    if kind is None:
        raise ModelFormatError(f"tensor {name!r} has unsupported type code {int(t.tensor_type)}")
    if kind != "f32" and len(expected) == 1:
        raise ModelFormatError(f"tensor {name!r} must be f32, got {kind}")
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims in ggml order
    flat = (expected[0], int(np.prod(expected[1:]))) if len(expected) == 4 else None
    if shape != expected and not (kind == "q8_0" and shape == flat):
        raise ModelFormatError(f"tensor {name!r} has shape {shape}, expected {expected}")
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t.tensor_type))]
    row = shape[-1]
    if row % block:
        raise ModelFormatError(f"tensor {name!r}: rows of {row} do not fill {kind} blocks of {block}")
    n_bytes = int(np.prod(shape)) // block * block_bytes
    offset = int(t.data_offset)
    if int(t.n_bytes) != n_bytes or offset < 0 or offset + n_bytes > size:
        raise ModelFormatError(f"tensor {name!r} extends past the end of the file (truncated?)")
    return TensorInfo(expected, kind, offset, n_bytes, row)


def read(path: str | os.PathLike) -> ModelFile:
    """Reads and validates a model file. Raises ModelFormatError, or OSError if it cannot be opened."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    size = path.stat().st_size
    reader = _reader(path)
    try:
        cfg, num_classes, labels, eps, pre, weights_name = _metadata(reader)
        expected = arch.expected_tensors(cfg, num_classes)
        found = {t.name: t for t in reader.tensors}
        missing = [n for n in expected if n not in found]
        extra = [n for n in found if n not in expected]
        if missing or extra or len(found) != len(reader.tensors):
            raise ModelFormatError(f"{path}: tensors do not match {cfg.name}: missing {missing[:5]}, "
                                   f"unexpected {extra[:5]}" + (" (and duplicates)" if len(found) != len(
                                       reader.tensors) else ""))
        infos = {name: _tensor_info(found[name], shape, size) for name, shape in expected.items()}
        kinds = {i.kind for i in infos.values() if len(i.shape) > 1}
        dtype = "q8_0" if "q8_0" in kinds else next(iter(kinds - {"f32"}), "f32")
        if len(kinds - {"f32", dtype}):
            raise ModelFormatError(f"{path}: weights mix types {sorted(kinds)}")
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    finally:
        del reader  # drops the memory map
    return ModelFile(path, cfg, num_classes, labels, eps, pre, weights_name, dtype, infos)

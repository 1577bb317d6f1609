"""Convert a torchvision ResNet checkpoint into the GGUF file the runtime loads.

    python -m pyggml_resnet.convert CHECKPOINT OUTPUT.gguf [--arch resnet101] [--dtype f32|f16|bf16|q8_0]
                                    [--weights IMAGENET1K_V2] [--resize 256] [--crop 224]

Inputs:

* a PyTorch ``.pth``/``.pt`` file holding a ``state_dict`` (plain, or under ``"state_dict"`` or ``"model"``,
  with or without DataParallel's ``module.`` prefix). It is read with ``torch.load(weights_only=True)`` only,
  so a checkpoint can never run code: anything that is not plain tensors and containers is refused.
* the legacy headerless ``.bin`` of the C++ ResNet-101 example this project started from (recognised by its
  int32 magic 0x67676d6c, whatever the file is called): one record per state_dict entry, in order, each an
  int32 n_dims, n_dims int32 dims in ggml (reversed) order and raw float32 data, every tensor ``.squeeze()``d.
  It has no names, so the architecture is recognised from the record count and shapes (or given by --arch).

Output: a GGUF file (architecture ``resnet``) with the config, class labels and preprocessing as metadata
(keys in ``arch.Key``) and one tensor per inference tensor, under its torchvision name, in state_dict order.
Shapes are written in PyTorch order and reversed by the writer, as GGUF stores ggml order.

Storage types (``--dtype``). BatchNorm vectors and fc.bias are always f32. For the conv and fc weights:

* ``f32``, ``f16``, ``bf16``: that type, in the PyTorch shape (4-D convs, 2-D fc).
* ``q8_0``: ggml quantizes in blocks of 32 along ne0, the LAST PyTorch axis. A conv weight is therefore
  stored flattened to 2-D ``(OC, IC*KH*KW)`` (PyTorch's row-major flatten of the 4-D weight) when
  ``IC*KH*KW`` is a multiple of 32, and otherwise (the 7x7 stem: 3*7*7 = 147) kept f32 and 4-D.
  fc.weight is q8_0 when its in-features are a multiple of 32, else f32.

So a loader must accept a conv weight either 4-D ``(OC, IC, KH, KW)`` or flattened 2-D ``(OC, IC*KH*KW)``.

Reading and writing are separate steps: `read_checkpoint` gives a checked `Checkpoint` (or `Checkpoint.of`
makes one from arrays), and `write_gguf` writes one; `convert` does both.

The output is written to a temporary file beside it and renamed into place, so a failed or interrupted
conversion never leaves a partial file behind or touches an existing one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from . import dtypes
from .arch import (BY_NAME, CONFIGS, GGUF_ARCH, Key, Preprocessing, ResNetConfig, check_tensor_names,
                   expected_tensors, infer_config)
from .errors import Error, InputError, ModelFormatError, in_file, print_error
from .labels import imagenet_labels

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which every torchvision ResNet uses

LEGACY_MAGIC = 0x67676D6C  # "ggml" as a little-endian int32: the first 4 bytes of a legacy .bin
_NUM_BATCHES_TRACKED = "num_batches_tracked"


# --------------------------------------------------------------------------------------------------------
# Reading checkpoints


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A torchvision ResNet state_dict that `check_state` passed: what the converter reads, then writes.
    Make one with `read_checkpoint` (from a file) or `Checkpoint.of` (from arrays)."""

    state: Mapping[str, np.ndarray]  # {torchvision name: float array}, the inference tensors only
    config: ResNetConfig
    num_classes: int

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray], arch: str | None = None) -> "Checkpoint":
        """Checks a {torchvision name: float array} state_dict (see `check_state`); `arch` ("resnet101",
        ...) requires that architecture. Raises ModelFormatError."""
        return cls(state, *check_state(state, arch))

    @property
    def parameters(self) -> int:
        """Learnable parameters, as torchvision counts them: the BatchNorm running statistics are buffers."""
        return sum(v.size for n, v in self.state.items() if not n.endswith((".running_mean", ".running_var")))


def read_checkpoint(path, arch: str | None = None) -> Checkpoint:
    """Reads a ``.pth``/``.pt`` checkpoint or a legacy ``.bin`` and checks it.

    num_batches_tracked entries are dropped (inference does not use them). ``arch`` ("resnet101", ...)
    requires that architecture, and is how a legacy ``.bin`` can be read without guessing. Raises
    ModelFormatError, InputError for an unknown ``arch``, or OSError if the file cannot be read.
    """
    path = Path(path)
    cfg = _config_named(arch)
    with in_file(path):
        state = _load_legacy_bin(path, cfg) if _is_legacy_bin(path) else _load_torch(path)
        return Checkpoint.of(state, arch)


def _config_named(name: str | None) -> ResNetConfig | None:
    if name is None:
        return None
    if name not in BY_NAME:
        raise InputError(f"unknown architecture {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def _is_legacy_bin(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and struct.unpack("<i", head)[0] == LEGACY_MAGIC


def _load_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # only needed here: converting a .bin, or running models, works without it
    except ImportError as e:
        raise Error("reading a PyTorch checkpoint needs torch: pip install 'pyggml-resnet[convert]'") from e
    _check_zip_size(path)
    try:
        # weights_only: a pickle may name any Python callable, so unpickling an untrusted file would
        # run code. Only tensors and plain containers are allowed through.
        with warnings.catch_warnings():  # torch warns of any pickle protocol but 2, before refusing or not
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), KeyError/EOFError (garbage), ...
        raise ModelFormatError(f"{path} is not a weights-only PyTorch checkpoint "
                               f"(nor a legacy ggml .bin): {_torch_load_reason(e)}") from e
    return _state_dict_arrays(_unwrap_state_dict(obj, path), path, torch)


def _data_budget(path: Path) -> int:
    """The most bytes of float32 data a checkpoint file of this size may expand to: 2x for an f16 checkpoint,
    4x for an fp8 one, and room for small files."""
    return 4 * os.path.getsize(path) + (64 << 20)


def _check_zip_size(path: Path) -> None:
    """Refuses a zip checkpoint whose records would inflate far beyond the file (a zip bomb): torch.save
    stores records uncompressed, but torch.load also inflates deflated ones, allocating the size the zip
    claims before checking anything else."""
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(info.file_size for info in z.infolist())
    except Exception:  # not a zip, or one Python cannot read: torch.load says why
        return
    if total > _data_budget(path):
        raise ModelFormatError(f"{path}: its zip records expand to {total} bytes from a "
                               f"{os.path.getsize(path)}-byte file (a zip bomb?)")


def _torch_load_reason(e: Exception) -> str:
    """The informative part of torch.load's error: its weights-only refusal is a page of advice."""
    m = re.search(r"WeightsUnpickler error: (.*?)(\.\s|$)", str(e), re.S)
    if m:
        return m.group(1)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _unwrap_state_dict(obj, path: Path) -> Mapping:
    """The state_dict inside a loaded checkpoint, with DataParallel's "module." prefix removed."""
    if not isinstance(obj, Mapping):
        raise ModelFormatError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    # Training scripts often save {"epoch": ..., "state_dict": ..., "optimizer": ...}.
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    prefix = "module."
    if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _state_dict_arrays(sd: Mapping, path: Path, torch) -> dict[str, np.ndarray]:
    """{name: float32 array}, every tensor checked before any is copied.

    A checkpoint states each tensor's size and strides separately from the data it stores, so a 2 KB file
    can hold a "tensor" of a billion elements that all view one stored float (a stride-0 `expand`, which
    torch.save writes as it is). Copying that out would take gigabytes, so a tensor must fit in its own
    storage, and all of them together in a few times the file's size, before anything is converted."""
    tensors = []
    budget = _data_budget(path)
    for name, value in sd.items():
        if not isinstance(name, str):
            raise ModelFormatError(f"{path}: a state_dict is keyed by tensor names, not by {type(name).__name__} "
                                   f"keys like {name!r:.60}")
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        if name.endswith(_NUM_BATCHES_TRACKED):
            continue
        # An integer or quantized tensor is not a float weight we can take over without changing it.
        if not value.is_floating_point():
            raise ModelFormatError(f"{path}: {name} has dtype {value.dtype}, expected a floating-point tensor")
        try:
            stored = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
            dense = value.layout == torch.strided
        except Exception as e:  # sparse, nested or otherwise exotic tensors
            raise ModelFormatError(f"{path}: {name} cannot be read as a dense array: {e}") from e
        if not dense:
            raise ModelFormatError(f"{path}: {name} is a {value.layout} tensor, not a dense one")
        if value.numel() * value.element_size() > stored:
            raise ModelFormatError(f"{path}: {name} has shape {tuple(value.shape)} but its storage holds only "
                                   f"{max(stored, 0) // value.element_size()} values (an expanded or "
                                   "overlapping view, not a weight)")
        budget -= 4 * value.numel()
        if budget < 0:
            raise ModelFormatError(f"{path}: its tensors hold far more values than the file's size allows "
                                   "(views sharing one storage?)")
        tensors.append((name, value))
    state = {}
    for name, value in tensors:
        try:
            state[name] = value.detach().to(torch.float32).contiguous().numpy()
        except Exception as e:  # meta tensors and other exotic ones
            raise ModelFormatError(f"{path}: {name} cannot be read as a dense array: {e}") from e
    return state


# --------------------------------------------------------------------------------------------------------
# The legacy .bin format


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


def _load_legacy_bin(path: Path, cfg: ResNetConfig | None) -> dict[str, np.ndarray]:
    buf = path.read_bytes()
    records, bad_header = _read_legacy_records(buf)
    layout = _match_legacy_layout(path, buf, records, bad_header, [cfg] if cfg else list(CONFIGS.values()))
    state = {}
    for (name, shape), rec in zip(layout.items(), records):
        if name.endswith(_NUM_BATCHES_TRACKED):
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
            layout[name[: -len("running_var")] + _NUM_BATCHES_TRACKED] = ()
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


# --------------------------------------------------------------------------------------------------------
# Validation


def check_state(state: Mapping[str, np.ndarray], arch: str | None = None) -> tuple[ResNetConfig, int]:
    """The (config, num_classes) of a {name: float array} state_dict, after checking that it has exactly
    the tensors and shapes that torchvision's ResNet of that config has, and only finite values.
    Raises ModelFormatError naming the offending tensors."""
    for name, value in state.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise ModelFormatError(f"{name} is a {type(value).__name__} of {getattr(value, 'dtype', '?')}, "
                                   "expected a floating-point numpy array")
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    cfg, num_classes = infer_config(shapes)
    if arch is not None and cfg.name != arch:
        raise ModelFormatError(f"the checkpoint holds a {cfg.name} ({cfg.block} blocks {list(cfg.layers)}), "
                               f"not the {arch} asked for")
    if num_classes < 1:
        raise ModelFormatError(f"fc.weight has shape {shapes['fc.weight']}: no classes")
    expected = expected_tensors(cfg, num_classes)
    misshapen = [f"{n} {shapes[n]} (expected {expected[n]})" for n in expected
                 if n in shapes and shapes[n] != expected[n]]
    check_tensor_names(cfg, num_classes, list(shapes), [f"wrong shape: {_few(misshapen)}"] if misshapen else [])
    for name in expected:
        bad = np.count_nonzero(~np.isfinite(state[name]))
        if bad:
            raise ModelFormatError(f"{name} holds {bad} NaN or infinite values")
    return cfg, num_classes


def _few(items: Sequence[str], n: int = 4) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# --------------------------------------------------------------------------------------------------------
# Writing GGUF


@dataclasses.dataclass(frozen=True)
class _Stored:
    """How one tensor goes into the file."""

    name: str
    shape: tuple[int, ...]  # PyTorch order, as stored (q8_0 convs are flattened)
    dtype: dtypes.DType

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(math.prod(self.shape))

    def encode(self, value: np.ndarray) -> np.ndarray:
        """`value` in the bytes (or numpy dtype) GGUF stores for this tensor."""
        try:
            return self.dtype.encode(np.reshape(value, self.shape))
        except InputError as e:  # too large for the type: say which tensor, and what to do
            raise ModelFormatError(f"{self.name}: {e}; convert with --dtype f32") from None


def _storage(name: str, shape: tuple[int, ...], dtype: str) -> _Stored:
    if len(shape) < 2 or dtype == "f32":  # BatchNorm vectors and fc.bias: tiny, and exactness is cheap
        return _Stored(name, shape, dtypes.F32)
    if dtype != "q8_0":
        return _Stored(name, shape, dtypes.BY_NAME[dtype])
    # q8_0 blocks run along the last PyTorch axis: flatten a conv to (OC, IC*KH*KW) so a block never
    # straddles two output channels, and keep f32 where that row does not split into whole blocks.
    row = math.prod(shape[1:])
    if row % dtypes.Q8_0.block_size:
        return _Stored(name, shape, dtypes.F32)
    return _Stored(name, (shape[0], row), dtypes.Q8_0)


def _labels_for(num_classes: int, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return list(imagenet_labels()) if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
    labels = list(labels)
    if len(labels) != num_classes:
        raise InputError(f"labels must be {num_classes} strings (one per class), got {len(labels)}")
    if not all(isinstance(s, str) for s in labels):
        raise InputError(f"labels must be {num_classes} strings, got {sorted({type(s).__name__ for s in labels})}")
    return labels


def _check_options(dtype: str, weights: str, preprocessing: Preprocessing) -> None:
    if dtype not in dtypes.NAMES:
        raise InputError(f"dtype must be one of {', '.join(dtypes.NAMES)}, got {dtype!r}")
    if not weights:
        raise InputError("weights must be a non-empty name, e.g. 'custom' or 'IMAGENET1K_V2'")
    problem = preprocessing.problem()  # the loader's own check: what it would refuse is never written
    if problem:
        raise InputError(problem)


def _add_metadata(w: gguf.GGUFWriter, cfg, num_classes, labels, weights, p: Preprocessing) -> None:
    K, T = Key, gguf.GGUFValueType
    w.add_string(K.NAME, cfg.name)
    w.add_uint32(K.DEPTH, cfg.depth)
    w.add_string(K.BLOCK, cfg.block)
    w.add_key_value(K.LAYERS, list(cfg.layers), T.ARRAY, sub_type=T.UINT32)
    w.add_uint32(K.WIDTH, 64)
    w.add_uint32(K.NUM_CLASSES, num_classes)
    w.add_float32(K.BN_EPS, BN_EPS)
    w.add_key_value(K.LABELS, labels, T.ARRAY, sub_type=T.STRING)
    w.add_string(K.WEIGHTS, weights)
    w.add_uint32(K.RESIZE, p.resize)
    w.add_uint32(K.CROP, p.crop)
    w.add_key_value(K.MEAN, [float(v) for v in p.mean], T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value(K.STD, [float(v) for v in p.std], T.ARRAY, sub_type=T.FLOAT32)
    w.add_string(K.INTERPOLATION, p.interpolation)


def write_gguf(checkpoint: Checkpoint, out_path, *, dtype: str = "f32", weights: str = "custom",
               preprocessing: Preprocessing = Preprocessing(), labels: Sequence[str] | None = None,
               progress: bool = True) -> Path:
    """Writes a checkpoint as a GGUF model file; returns its path.

    ``dtype`` picks how conv and fc weights are stored (see the module docstring), ``weights`` names the
    weights (e.g. "IMAGENET1K_V2"), ``labels`` are the class names (default: ImageNet's for 1000 classes,
    else "class_0", ...).

    Bad options (InputError) are raised before anything is created. A weight too large for ``dtype``
    (ModelFormatError) or a failing write (OSError) is raised while writing, after the temporary file is
    deleted: the output appears only once complete, and a file already at ``out_path`` is left as it was."""
    _check_options(dtype, weights, preprocessing)
    cfg, num_classes = checkpoint.config, checkpoint.num_classes
    labels = _labels_for(num_classes, labels)
    out = _check_output_path(out_path)
    plan = [_storage(name, shape, dtype) for name, shape in expected_tensors(cfg, num_classes).items()]

    with _atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
        try:
            _add_metadata(writer, cfg, num_classes, labels, weights, preprocessing)
            # Declaring every tensor up front lets the writer emit the header, then stream the data one
            # tensor at a time instead of holding a converted copy of the whole model.
            for s in plan:
                writer.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType(s.dtype.code))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for s in tqdm(plan, desc=f"{cfg.name} -> {dtype}", unit="tensor", file=sys.stderr,
                          disable=not progress):
                writer.write_tensor_data(s.encode(checkpoint.state[s.name]))
            writer.flush()
        finally:
            writer.close()
    return out


def _check_output_path(out_path) -> Path:
    out = Path(out_path)
    if out.is_dir():
        raise InputError(f"output {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise InputError(f"output directory {out.parent} does not exist")
    return out


@contextlib.contextmanager
def _atomic_output(out: Path):
    """Yield a temporary path beside `out`; once the block succeeds, make it `out` atomically.

    On any exception (KeyboardInterrupt included) the temporary file is deleted and `out`, if it existed,
    is left as it was."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        os.close(fd)  # the GGUF writer opens the file by name
        yield Path(tmp)
        # Data on disk before the rename, or a crash could leave `out` naming an empty file.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable (directories cannot be opened on Windows)
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _new_file_mode() -> int:
    """The mode open() would give a new file (mkstemp's is 0600, private to us)."""
    umask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(umask)
    return 0o666 & ~umask


def convert(checkpoint, out_path, *, dtype: str = "f32", arch: str | None = None, weights: str = "custom",
            preprocessing: Preprocessing = Preprocessing(), labels: Sequence[str] | None = None,
            progress: bool = True) -> Path:
    """`read_checkpoint` then `write_gguf`: checkpoint file -> GGUF file. Returns the output path."""
    return write_gguf(read_checkpoint(checkpoint, arch), out_path, dtype=dtype, weights=weights,
                      preprocessing=preprocessing, labels=labels, progress=progress)


# --------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv):
    default = Preprocessing()
    p = argparse.ArgumentParser(prog="python -m pyggml_resnet.convert",
                                description="Convert a torchvision ResNet checkpoint (.pth, or the legacy "
                                            "ggml .bin) into a GGUF model file.")
    p.add_argument("checkpoint", type=Path, help="state_dict .pth/.pt file, or legacy .bin")
    p.add_argument("output", type=Path, help="GGUF file to write (replaced atomically if it exists)")
    p.add_argument("--arch", choices=list(BY_NAME),
                   help="require this architecture (default: infer it from the checkpoint)")
    p.add_argument("--dtype", choices=dtypes.NAMES, default="f32",
                   help="storage type of conv and fc weights (default: f32, exact)")
    p.add_argument("--weights", default="custom", metavar="NAME",
                   help="name of the weights stored as metadata, e.g. IMAGENET1K_V2 (default: custom)")
    p.add_argument("--resize", type=int, default=default.resize, metavar="N",
                   help=f"shorter image side before the crop (default: {default.resize})")
    p.add_argument("--crop", type=int, default=default.crop, metavar="N",
                   help=f"center crop size fed to the network (default: {default.crop})")
    return p.parse_args(argv)


def _summary(out: Path, checkpoint: Checkpoint, dtype: str) -> str:
    mb = out.stat().st_size / 1e6
    return (f"wrote {out}: {checkpoint.config.name}, {checkpoint.num_classes} classes, {len(checkpoint.state)} "
            f"tensors, {checkpoint.parameters:,} parameters, {mb:.1f} MB, {dtype}")


def main(argv=None) -> int:
    args = _parse_args(argv)
    preprocessing = dataclasses.replace(Preprocessing(), resize=args.resize, crop=args.crop)
    try:
        checkpoint = read_checkpoint(args.checkpoint, args.arch)
        out = write_gguf(checkpoint, args.output, dtype=args.dtype, weights=args.weights,
                         preprocessing=preprocessing)
    except (Error, OSError) as e:
        return print_error(e)
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    print(_summary(out, checkpoint, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a torchvision ResNet checkpoint into the GGUF file the runtime loads.

    python -m pyggml_resnet.convert CHECKPOINT OUTPUT.gguf [--arch resnet101] [--dtype f32|f16|bf16|q8_0]
                                    [--weights IMAGENET1K_V2] [--labels FILE] [--resize 256] [--crop 224]
                                    [--interpolation bilinear] [--force]

Inputs (recognised by their content, whatever the file is called):

* a PyTorch ``.pth``/``.pt``/``.ckpt`` file holding a ``state_dict``: plain, or under ``"state_dict"`` (PyTorch
  Lightning), ``"model_state_dict"`` (the PyTorch tutorial) or ``"model"``, its names prefixed or not by
  wrappers (DataParallel's ``module.``, torch.compile's ``_orig_mod.``, a LightningModule's attribute such as
  ``model.``). It is read with ``torch.load(weights_only=True)`` only, so a checkpoint can never run code:
  anything that is not plain tensors and containers is refused, a whole pickled model (``torch.save(model)``)
  with the advice to save its ``state_dict``.
* a ``.safetensors`` file (timm's and Hugging Face's format), read with the ``safetensors`` package.
* a GGUF model file of ours, to write again in another ``--dtype``; its weights name, labels and preprocessing
  are kept unless the options replace them.
* the legacy headerless ``.bin`` of the C++ ResNet-101 example this project started from (recognised by its
  int32 magic 0x67676d6c, whatever the file is called): one record per state_dict entry, in order, each an
  int32 n_dims, n_dims int32 dims in ggml (reversed) order and raw float32 data, every tensor ``.squeeze()``d.
  It has no names, so the architecture is recognised from the record count and shapes (or given by --arch).

Any torchvision ResNet converts: resnet18..152, Wide ResNets and ResNeXts (groups and width per group are read
off the first block's 3x3 conv), and timm's ResNets that keep torchvision's layout (``resnet50.a1_in1k`` and the
other plain-stem ``resnet*``, ``wide_resnet*``, ``resnext*`` weights). timm's variants that add layers (the deep
stem and average-pool shortcut of ResNet-D, squeeze-excitation, attention, blur pools, GroupNorm) are refused
with a message naming what is unsupported. timm evaluates its weights with other preprocessing than
torchvision's: give it with ``--resize/--crop/--interpolation`` (docs/usage.md lists the common values).

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
conversion never leaves a partial file behind or touches an existing one. The output may not be the input
(under any name: a symlink or hard link to it is refused too), and an existing file that is not a GGUF file
is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import stat
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
from .arch import (BY_NAME, CONFIGS, GGUF_ARCH, INTERPOLATIONS, Key, Preprocessing, ResNetConfig,
                   check_tensor_names, expected_tensors, infer_config)
from .errors import Error, InputError, ModelFormatError, in_file, print_error
from .labels import imagenet_labels

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which every torchvision ResNet uses

LEGACY_MAGIC = 0x67676D6C  # "ggml" as a little-endian int32: the first 4 bytes of a legacy .bin
GGUF_MAGIC = b"GGUF"
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
    path: Path | None = None  # the file it was read from, which writing never replaces
    # What a GGUF input records beside its tensors, kept when it is written again unless replaced:
    weights: str | None = None
    preprocessing: Preprocessing | None = None
    labels: tuple[str, ...] | None = None

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
    """Reads a checkpoint (see the module docstring: PyTorch, safetensors, GGUF, legacy ``.bin``) and
    checks it.

    num_batches_tracked entries are dropped (inference does not use them). ``arch`` ("resnet101", ...)
    requires that architecture, and is how a legacy ``.bin`` can be read without guessing. Raises
    ModelFormatError, InputError for an unknown ``arch``, or OSError if the file cannot be read.
    """
    path = Path(path)
    cfg = _config_named(arch)
    with open(path, "rb") as f:
        head = f.read(9)
    with in_file(path):
        if head[:4] == GGUF_MAGIC:
            return _read_gguf(path, arch)
        if _is_legacy_bin(head):
            state = _load_legacy_bin(path, cfg)
        elif _is_safetensors(head, path):
            state = _load_safetensors(path)
        else:
            state = _load_torch(path)
        return dataclasses.replace(Checkpoint.of(state, arch), path=path)


def _config_named(name: str | None) -> ResNetConfig | None:
    if name is None:
        return None
    if name not in BY_NAME:
        raise InputError(f"unknown architecture {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def _is_legacy_bin(head: bytes) -> bool:
    return len(head) >= 4 and struct.unpack("<i", head[:4])[0] == LEGACY_MAGIC


def _is_safetensors(head: bytes, path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (u64) and then the header's opening brace."""
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def _read_gguf(path: Path, arch: str | None) -> Checkpoint:
    """A model file of ours, to write again in another dtype: read and checked by the runtime's own loader."""
    from . import loader

    mf = loader.read(path)
    return dataclasses.replace(Checkpoint.of(mf.tensors(), arch), path=path, weights=mf.weights_name,
                               preprocessing=mf.preprocessing, labels=mf.labels)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file (what timm and Hugging Face ship). Holds only tensors, so no code can run; read
    through torch where it is installed (bfloat16 included), else NumPy."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:
        raise Error("reading a .safetensors file needs the safetensors package: pip install safetensors "
                    "(or 'pyggml-resnet[convert]')") from e
    torch = _torch_or_none()
    try:
        with safe_open(path, framework="pt" if torch else "numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, TypeError, ValueError, OSError) as e:  # NumPy has no bfloat16: TypeError
        hint = "; install torch to read bfloat16 tensors" if torch is None and "bfloat16" in str(e) else ""
        raise ModelFormatError(f"{path} cannot be read as a safetensors file: {e}{hint}") from e
    sd = _strip_prefix(tensors, path)
    if torch is not None:
        return _state_dict_arrays(sd, path, torch)
    state = {}
    for name, value in sd.items():
        if name.endswith(_NUM_BATCHES_TRACKED):
            continue
        if value.dtype.kind != "f":
            raise ModelFormatError(f"{path}: {name} has dtype {value.dtype}, expected a floating-point tensor")
        state[name] = value.astype(np.float32)
    return state


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


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
        model_class = _pickled_module(path)
        if model_class:
            raise ModelFormatError(
                f"{path} holds a whole pickled model ({model_class}), not a state_dict: loading it would run "
                "code from the file, so it is not read. Where the model's code is, save its weights with "
                "torch.save(model.state_dict(), 'weights.pth') and convert that file") from None
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


def _pickled_module(path: Path) -> str | None:
    """The class of the object `torch.save(model)` pickled into this file, if it is a torch.nn.Module (the
    pickle refers to torch.nn.modules), else None. Reads the pickle's opcodes; nothing is unpickled."""
    import pickletools

    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            data = z.read(name)
        globals_, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":  # protocol 2, torch.save's default: "module name"
                globals_.append(".".join(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # protocol 4+: the last two strings pushed
                globals_.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a zip, no pickle, malformed opcodes: not recognisably a module
        return None
    if any(g.startswith("torch.nn.modules.") for g in globals_):
        return globals_[0]  # the top object is built first
    return None


def _torch_load_reason(e: Exception) -> str:
    """The informative part of torch.load's error: its weights-only refusal is a page of advice."""
    m = re.search(r"WeightsUnpickler error: (.*?)(\.\s|$)", str(e), re.S)
    if m:
        return m.group(1)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _unwrap_state_dict(obj, path: Path) -> Mapping:
    """The state_dict inside a loaded checkpoint, under torchvision's names (see `_strip_prefix`)."""
    if not isinstance(obj, Mapping):
        raise ModelFormatError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    # Training scripts save {"epoch": ..., "state_dict": ..., "optimizer": ...} (PyTorch Lightning too), the
    # PyTorch tutorial {"model_state_dict": ...}, others {"model": ...}.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    return _strip_prefix(obj, path)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel/DDP, torch.compile, a Lightning attribute


def _strip_prefix(sd: Mapping, path: Path) -> Mapping:
    """`sd` under torchvision's names. Wrappers put a prefix before every name: DataParallel "module.",
    torch.compile "_orig_mod.", a LightningModule the attribute holding the ResNet ("model.", "net.", ...),
    in any combination. The prefix is found where conv1.weight and fc.weight both are; other entries (a loss
    function's weights, say) are not the ResNet's and are dropped."""
    names = [k for k in sd if isinstance(k, str)]
    found = {k[: -len("conv1.weight")] for k in names if k.endswith("conv1.weight")}
    prefixes = sorted(p for p in found if (p == "" or p.endswith(".")) and "layer" not in p
                      and p + "fc.weight" in sd)
    if len(prefixes) > 1:
        raise ModelFormatError(f"{path} holds several ResNets, under {', '.join(map(repr, prefixes))}: save the "
                               "one to convert as a state_dict of its own")
    if prefixes == [""]:
        return sd
    if prefixes:
        p = prefixes[0]
        return {k[len(p):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(p)}
    # No complete ResNet: strip what every name shares, so the check names what is missing.
    while sd and len(names) == len(sd):
        p = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in names)), None)
        if p is None:
            break
        sd = {k[len(p):]: v for k, v in sd.items()}
        names = list(sd)
    return sd


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
    Raises ModelFormatError naming the offending tensors, or what is unsupported for ResNet variants
    outside torchvision's layout (`arch.unsupported_variant`: timm's deep stems, SE blocks, ...)."""
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
    w.add_uint32(K.WIDTH, cfg.width_per_group)
    w.add_uint32(K.GROUPS, cfg.groups)
    w.add_uint32(K.NUM_CLASSES, num_classes)
    w.add_float32(K.BN_EPS, BN_EPS)
    w.add_key_value(K.LABELS, labels, T.ARRAY, sub_type=T.STRING)
    w.add_string(K.WEIGHTS, weights)
    w.add_uint32(K.RESIZE, p.resize)
    w.add_uint32(K.CROP, p.crop)
    w.add_key_value(K.MEAN, [float(v) for v in p.mean], T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value(K.STD, [float(v) for v in p.std], T.ARRAY, sub_type=T.FLOAT32)
    w.add_string(K.INTERPOLATION, p.interpolation)


def write_gguf(checkpoint: Checkpoint, out_path, *, dtype: str = "f32", weights: str | None = None,
               preprocessing: Preprocessing | None = None, labels: Sequence[str] | None = None,
               progress: bool = True, force: bool = False) -> Path:
    """Writes a checkpoint as a GGUF model file; returns its path.

    ``dtype`` picks how conv and fc weights are stored (see the module docstring), ``weights`` names the
    weights (e.g. "IMAGENET1K_V2"), ``labels`` are the class names. Each defaults to what the checkpoint
    records (a GGUF input), else "custom", torchvision's classic ImageNet preprocessing, and ImageNet's
    labels for 1000 classes ("class_0", ... otherwise). The output is never the checkpoint's own file, under
    any name; an existing GGUF file there is replaced, any other existing file only with ``force``.

    Bad options and outputs (InputError) are raised before anything is created. A weight too large for
    ``dtype`` (ModelFormatError) or a failing write (OSError) is raised while writing, after the temporary
    file is deleted: the output appears only once complete, and a file already at ``out_path`` is left as it
    was."""
    weights = weights if weights is not None else checkpoint.weights or "custom"
    preprocessing = preprocessing or checkpoint.preprocessing or Preprocessing()
    labels = labels if labels is not None else checkpoint.labels
    _check_options(dtype, weights, preprocessing)
    cfg, num_classes = checkpoint.config, checkpoint.num_classes
    labels = _labels_for(num_classes, labels)
    out = _check_output_path(out_path, source=checkpoint.path, force=force)
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


def _check_output_path(out_path, *, source=None, force: bool = False) -> Path:
    """The output path, if writing there can lose nothing the user did not name as the output: not the
    input (`source`) itself, under any name (a symlink or hard link to it), and not an existing file that
    is not a GGUF model file, unless `force`."""
    out = Path(out_path)
    if out.is_dir():
        raise InputError(f"output {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise InputError(f"output directory {out.parent} does not exist")
    if not out.exists():
        return out
    st = out.stat()  # follows symlinks: a link to the input is the input
    if source is not None and (st.st_dev, st.st_ino) == _file_id(source):
        how = "" if out == Path(source) else " (through a link: the same file)"
        raise InputError(f"output {out} is the input {source}{how}; writing it would destroy the checkpoint: "
                         "give another output name")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"output {out} exists and is not a regular file")
    if not force and st.st_size:
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise InputError(f"output {out} exists and is not a GGUF file: not replacing it (pass --force, "
                                 "or force=True, to replace it)")
    return out


def _file_id(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # the caller reports a missing input
        return None
    return st.st_dev, st.st_ino


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


def convert(checkpoint, out_path, *, dtype: str = "f32", arch: str | None = None, weights: str | None = None,
            preprocessing: Preprocessing | None = None, labels: Sequence[str] | None = None,
            progress: bool = True, force: bool = False) -> Path:
    """`read_checkpoint` then `write_gguf`: checkpoint file -> GGUF file. Returns the output path."""
    _check_output_path(out_path, source=checkpoint, force=force)  # before reading a large file
    return write_gguf(read_checkpoint(checkpoint, arch), out_path, dtype=dtype, weights=weights,
                      preprocessing=preprocessing, labels=labels, progress=progress, force=force)


# --------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv):
    default = Preprocessing()
    p = argparse.ArgumentParser(prog="python -m pyggml_resnet.convert",
                                description="Convert a torchvision ResNet checkpoint (.pth/.pt/.ckpt, "
                                            ".safetensors, the legacy ggml .bin, or a GGUF model file to "
                                            "re-encode) into a GGUF model file.")
    p.add_argument("checkpoint", type=Path, help="state_dict .pth/.pt, Lightning .ckpt, .safetensors, legacy "
                                                 ".bin, or .gguf")
    p.add_argument("output", type=Path, help="GGUF file to write (an existing GGUF file is replaced atomically)")
    p.add_argument("--arch", choices=list(BY_NAME),
                   help="require this architecture (default: infer it from the checkpoint)")
    p.add_argument("--dtype", choices=dtypes.NAMES, default="f32",
                   help="storage type of conv and fc weights (default: f32, exact)")
    p.add_argument("--weights", metavar="NAME",
                   help="name of the weights stored as metadata, e.g. IMAGENET1K_V2 (default: custom, or a "
                        "GGUF input's)")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="class names, one per line (default: ImageNet's for 1000 classes, or a GGUF input's)")
    p.add_argument("--resize", type=int, metavar="N",
                   help=f"shorter image side before the crop (default: {default.resize}, or a GGUF input's)")
    p.add_argument("--crop", type=int, metavar="N",
                   help=f"center crop size fed to the network (default: {default.crop}, or a GGUF input's)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS,
                   help=f"resize filter (default: {default.interpolation}, or a GGUF input's)")
    p.add_argument("--force", action="store_true", help="replace an existing output that is not a GGUF file")
    return p.parse_args(argv)


def _read_labels(path: Path) -> list[str]:
    """One class name per line (a final newline, or a Windows one, is not part of any name)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--labels {path}: not UTF-8 text ({e})") from None
    return text.splitlines()


def _summary(out: Path, checkpoint: Checkpoint, dtype: str) -> str:
    mb = out.stat().st_size / 1e6
    return (f"wrote {out}: {checkpoint.config.name}, {checkpoint.num_classes} classes, {len(checkpoint.state)} "
            f"tensors, {checkpoint.parameters:,} parameters, {mb:.1f} MB, {dtype}")


def main(argv=None) -> int:
    args = _parse_args(argv)
    changes = {k: getattr(args, k) for k in ("resize", "crop", "interpolation") if getattr(args, k) is not None}
    try:
        _check_output_path(args.output, source=args.checkpoint, force=args.force)  # before any reading
        labels = _read_labels(args.labels) if args.labels else None
        checkpoint = read_checkpoint(args.checkpoint, args.arch)
        preprocessing = dataclasses.replace(checkpoint.preprocessing or Preprocessing(), **changes)
        out = write_gguf(checkpoint, args.output, dtype=args.dtype, weights=args.weights,
                         preprocessing=preprocessing, labels=labels, force=args.force)
    except (Error, OSError) as e:
        return print_error(e)
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    print(_summary(out, checkpoint, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint files -> a checked `Checkpoint`: a PyTorch ``.pth``/``.ckpt`` (read weights-only, wrappers'
name prefixes stripped), a ``.safetensors`` file, a GGUF model file of ours, or the legacy ``.bin``, each
recognised by its content. Every size is checked against the file's before anything is copied."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..arch import BY_NAME, ResNetConfig
from ..errors import Error, InputError, ModelFormatError, in_file
from . import timm
from .checkpoint import Checkpoint
from .legacy import NUM_BATCHES_TRACKED, is_legacy_bin, load_legacy_bin

GGUF_MAGIC = b"GGUF"


def read_checkpoint(path, arch: str | None = None) -> Checkpoint:
    """Reads a checkpoint (see the module docstring: PyTorch, safetensors, GGUF, legacy ``.bin``) and
    checks it.

    num_batches_tracked entries are dropped (inference does not use them). ``arch`` ("resnet101", ...)
    requires that architecture, and is how a legacy ``.bin`` can be read without guessing. Raises
    ModelFormatError, InputError for an unknown ``arch``, or OSError if the file cannot be read.
    """
    path = Path(path)
    cfg = _config_named(arch)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; give the checkpoint to convert (a .pth, .ckpt, "
                         ".safetensors or .gguf file, or a timm model directory)")
    if path.is_dir():
        return _read_timm_dir(path, arch)
    with open(path, "rb") as f:
        head = f.read(9)
    with in_file(path):
        if head[:4] == GGUF_MAGIC:
            return _read_gguf(path, arch)
        if is_legacy_bin(head):
            state = load_legacy_bin(path, cfg)
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


def _is_safetensors(head: bytes, path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (u64) and then the header's opening brace."""
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def _read_gguf(path: Path, arch: str | None) -> Checkpoint:
    """A model file of ours, to write again in another dtype: read and checked by the runtime's own loader."""
    from .. import loader

    mf = loader.read(path)
    if mf.dtype == "int8":
        raise InputError(f"{path} is an int8 file: its BatchNorm is folded and its weights rounded, so it cannot "
                         "be converted again; convert the original checkpoint")
    return dataclasses.replace(Checkpoint.of(mf.tensors(), arch), path=path, weights=mf.weights_name,
                               preprocessing=mf.preprocessing, labels=mf.labels)


def _read_timm_dir(path: Path, arch: str | None) -> Checkpoint:
    """A timm model directory from the Hugging Face Hub: its weights file, with the preprocessing, weights tag
    and labels its config.json records."""
    model = timm.read_dir(path)
    checkpoint = read_checkpoint(model.weights, arch)
    labels = model.labels if model.labels and len(model.labels) == checkpoint.num_classes else None
    return dataclasses.replace(checkpoint, weights=model.tag, preprocessing=model.preprocessing, labels=labels)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file (what timm and Hugging Face ship). Holds only tensors, so no code can run; read
    through torch where it is installed, else NumPy (bfloat16 included where ml_dtypes is installed: importing
    it teaches NumPy the type, as onnx and others do)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:
        raise Error("reading a .safetensors file needs the safetensors package: pip install safetensors "
                    "(or 'pyggml-resnet[convert]')") from e
    torch = _torch_or_none()
    if torch is None:
        with contextlib.suppress(ImportError):
            import ml_dtypes  # noqa: F401
    try:
        with safe_open(path, framework="pt" if torch else "numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, TypeError, ValueError, OSError) as e:  # NumPy has no bfloat16: TypeError
        hint = ("; install torch or ml_dtypes to read bfloat16 tensors" if torch is None and "bfloat16" in str(e)
                else "")
        raise ModelFormatError(f"{path} cannot be read as a safetensors file: {e}{hint}") from e
    sd = _strip_prefix(tensors, path)
    if torch is not None:
        return _state_dict_arrays(sd, path, torch)
    state = {}
    for name, value in sd.items():
        if name.endswith(NUM_BATCHES_TRACKED):
            continue
        if value.dtype.kind != "f" and value.dtype.name != "bfloat16":  # ml_dtypes' bfloat16 is of kind "V"
            raise ModelFormatError(f"{path}: {name} has dtype {value.dtype}, expected a floating-point tensor")
        state[name] = value.astype(np.float32)  # exact, bfloat16 included
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
        with open(path, "rb") as f:
            head = f.read(8)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (before 1.6, a pickle)
            raise ModelFormatError(
                f"{path} is not a weights-only PyTorch checkpoint, nor another format the converter reads "
                f"(it starts with {head!r}: not a zip or a pickle). Give the file torch.save(model.state_dict(), "
                "PATH) wrote, a .safetensors or .gguf file, or a timm model directory") from None
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
        if name.endswith(NUM_BATCHES_TRACKED):
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

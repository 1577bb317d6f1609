"""A checked `Checkpoint` -> a GGUF model file, written atomically; `convert` reads and writes in one call."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from .. import atomic, dtypes
from ..arch import GGUF_ARCH, Key, Preprocessing, convolutions, downsamples, expected_tensors
from ..errors import InputError, ModelFormatError
from ..labels import imagenet_labels
from . import calibrate
from .calibrate import Calibration
from .checkpoint import Checkpoint
from .quantize import calibrated_quants, int8_tensors
from .readers import GGUF_MAGIC, read_checkpoint

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which every torchvision ResNet uses


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


def _storage(name: str, shape: tuple[int, ...], dtype: str, int8_names: frozenset = frozenset()) -> _Stored:
    if dtype == "int8":  # the s8 weights of the calibrated convs; everything else f32
        return _Stored(name, shape, dtypes.I8 if name in int8_names else dtypes.F32)
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


DTYPES = (*dtypes.NAMES, "int8")  # int8: s8 convs with calibrated inputs (quantize.py, calibrate.py)


def _check_options(dtype: str, weights: str, preprocessing: Preprocessing, calibration) -> None:
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if (dtype == "int8") != (calibration is not None):
        raise InputError("dtype int8 needs calibration images (--calibration), and only int8 takes them"
                         if dtype == "int8" else f"calibration images are for dtype int8, not {dtype}")
    if not weights:
        raise InputError("weights must be a non-empty name, e.g. 'custom' or 'IMAGENET1K_V2'")
    problem = preprocessing.problem()  # the loader's own check: what it would refuse is never written
    if problem:
        raise InputError(problem)


def _add_quants(w: gguf.GGUFWriter, cfg, quants: Calibration) -> None:
    """An int8 file's activation quantization (by conv weight name): one entry per ungrouped conv for its
    input, and one per downsample for its output, each in the order of `arch.convolutions`, as the loader reads
    them (docs/gguf.md): not the order calibration met the convs in, which runs a block's downsample before
    its main path."""
    T = gguf.GGUFValueType
    for (scale_key, zero_key), ordered in (
            ((Key.INPUT_SCALE, Key.INPUT_ZERO), [quants.inputs[c.name] for c in convolutions(cfg) if c.groups == 1]),
            ((Key.SHORTCUT_SCALE, Key.SHORTCUT_ZERO), [quants.shortcuts[d.name] for d in downsamples(cfg)])):
        w.add_key_value(scale_key, [q.scale for q in ordered], T.ARRAY, sub_type=T.FLOAT32)
        w.add_key_value(zero_key, [q.zero for q in ordered], T.ARRAY, sub_type=T.UINT8)


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
    for key, size in ((K.RESIZE, p.resize), (K.CROP, p.crop)):  # N, [H, W], or "none" (docs/gguf.md)
        if size is None:
            w.add_string(key, "none")
        elif isinstance(size, int):
            w.add_uint32(key, size)
        else:
            w.add_key_value(key, list(size), T.ARRAY, sub_type=T.UINT32)
    w.add_key_value(K.MEAN, [float(v) for v in p.mean], T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value(K.STD, [float(v) for v in p.std], T.ARRAY, sub_type=T.FLOAT32)
    w.add_string(K.INTERPOLATION, p.interpolation)
    if not p.antialias:  # written only when false: files of the PIL pipeline are as they were before the key
        w.add_bool(K.ANTIALIAS, False)


def write_gguf(checkpoint: Checkpoint, out_path, *, dtype: str = "f32", weights: str | None = None,
               preprocessing: Preprocessing | None = None, labels: Sequence[str] | None = None,
               progress: bool = True, force: bool = False, calibration=None, calibration_count: int | None = None,
               calibration_rule: str = calibrate.DEFAULT_RULE) -> Path:
    """Writes a checkpoint as a GGUF model file; returns its path.

    ``dtype`` picks how conv and fc weights are stored (see the module docstring), ``weights`` names the
    weights (e.g. "IMAGENET1K_V2"), ``labels`` are the class names. Each defaults to what the checkpoint
    records (a GGUF input), else "custom", torchvision's classic ImageNet preprocessing, and ImageNet's
    labels for 1000 classes ("class_0", ... otherwise). The output is never the checkpoint's own file, under
    any name; an existing GGUF file there is replaced, any other existing file only with ``force``.

    ``dtype="int8"`` takes ``calibration`` images (a directory, image files, PIL images or HxWx3 uint8 arrays;
    the first ``calibration_count``), which the f32 model runs over to measure each conv's input range by
    ``calibration_rule`` (calibrate.RULES), then stores s8 weights (quantize.py).

    Bad options and outputs (InputError) are raised before anything is created. A weight too large for
    ``dtype`` (ModelFormatError) or a failing write (OSError) is raised while writing, after the temporary
    file is deleted: the output appears only once complete, and a file already at ``out_path`` is left as it
    was."""
    weights = weights if weights is not None else checkpoint.weights or "custom"
    preprocessing = preprocessing or checkpoint.preprocessing or Preprocessing()
    labels = labels if labels is not None else checkpoint.labels
    _check_options(dtype, weights, preprocessing, calibration)
    cfg, num_classes = checkpoint.config, checkpoint.num_classes
    labels = _labels_for(num_classes, labels)
    out = check_output_path(out_path, source=checkpoint.path, force=force)
    header = (cfg, num_classes, labels, weights, preprocessing)
    if dtype != "int8":
        plan = [_storage(name, shape, dtype) for name, shape in expected_tensors(cfg, num_classes).items()]
        return _write(out, header, plan, (checkpoint.state[s.name] for s in plan), None, progress, dtype)
    images = calibrate.image_sources(calibration, calibration_count)

    def write_f32(path: Path) -> Path:
        return write_gguf(checkpoint, path, weights=weights, preprocessing=preprocessing, labels=labels,
                          progress=False)
    quants = calibrated_quants(write_f32, images, calibration_rule, progress)
    plan = [_storage(name, shape, dtype, frozenset(quants.inputs))
            for name, shape in expected_tensors(cfg, num_classes, int8=True).items()]
    return _write(out, header, plan, (value for _, value in int8_tensors(checkpoint, BN_EPS)), quants, progress,
                  dtype)


def _write(out: Path, header: tuple, plan: list[_Stored], values, quants: Calibration | None,
           progress: bool, dtype: str) -> Path:
    """Writes the metadata (`header`: config, classes, labels, weights name, preprocessing; an int8 file's
    `quants`) and each tensor of `plan` with its value from `values` (in plan order), atomically to `out`;
    `dtype` names the file's type in the progress bar."""
    cfg = header[0]
    with atomic.replacing(out) as tmp:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
        try:
            _add_metadata(writer, *header)
            if quants is not None:
                _add_quants(writer, cfg, quants)
            # Declaring every tensor up front lets the writer emit the header, then stream the data one
            # tensor at a time instead of holding a converted copy of the whole model.
            for s in plan:
                writer.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType(s.dtype.code))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for s, value in tqdm(zip(plan, values), total=len(plan), desc=f"{cfg.name} -> {dtype}", unit="tensor",
                                 file=sys.stderr, disable=not progress):
                writer.write_tensor_data(s.encode(value))
            writer.flush()
        finally:
            writer.close()
    return out


def check_output_path(out_path, *, source=None, force: bool = False) -> Path:
    """The output path, if writing there can lose nothing the user did not name as the output: not the
    input (`source`) itself, under any name (a symlink or hard link to it), and not an existing file that
    is not a GGUF model file, unless `force`."""
    out = atomic.check_target(out_path)
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


def convert(checkpoint, out_path, *, dtype: str = "f32", arch: str | None = None, weights: str | None = None,
            preprocessing: Preprocessing | None = None, labels: Sequence[str] | None = None,
            progress: bool = True, force: bool = False, **calibration) -> Path:
    """`read_checkpoint` then `write_gguf`: checkpoint file -> GGUF file. Returns the output path.
    `calibration`: write_gguf's calibration, calibration_count and calibration_rule, for dtype "int8"."""
    check_output_path(out_path, source=checkpoint, force=force)  # before reading a large file
    return write_gguf(read_checkpoint(checkpoint, arch), out_path, dtype=dtype, weights=weights,
                      preprocessing=preprocessing, labels=labels, progress=progress, force=force, **calibration)

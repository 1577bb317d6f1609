"""An int8 file's tensors (docs/gguf.md), from a checked checkpoint and its calibrated input ranges.

Each convolution's BatchNorm is folded in as the loader folds it for f32 (`layers.batchnorm_scale_bias` in
float64, the weights scaled in float32), so the s8 weights quantize exactly the f32 model's folded weights;
then symmetric s8 per output channel (`int8.quantize`). Grouped convs (ResNeXt's) and the fc stay f32.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .. import int8, layers
from ..arch import conv_prefix, convolutions
from ..errors import ModelFormatError
from ..model import load
from . import calibrate
from .checkpoint import Checkpoint

_BN = ("weight", "bias", "running_mean", "running_var")


def int8_tensors(checkpoint: Checkpoint, eps: float) -> Iterator[tuple[str, np.ndarray]]:
    """(name, value) of every tensor of an int8 file, in `arch.expected_tensors(..., int8=True)` order, one
    convolution at a time."""
    state = checkpoint.state
    for conv in convolutions(checkpoint.config):
        scale, bias = layers.batchnorm_scale_bias(*(np.asarray(state[f"{conv.bn}.{p}"], np.float32) for p in _BN),
                                                  eps)
        with np.errstate(over="ignore"):
            w = np.asarray(state[conv.name], np.float32) * scale[:, None, None, None]
        if not (np.isfinite(w).all() and np.isfinite(bias).all()):
            raise ModelFormatError(f"folding {conv.bn} into {conv.name} overflows float32")
        prefix = conv_prefix(conv)
        if conv.groups > 1:
            yield conv.name, w
            yield f"{prefix}.bias", bias
            continue
        q, scales = int8.quantize(w)
        yield conv.name, q.reshape(w.shape)
        yield f"{prefix}.bias", bias
        yield f"{prefix}.weight_scale", scales
    yield "fc.weight", np.asarray(state["fc.weight"], np.float32)
    yield "fc.bias", np.asarray(state["fc.bias"], np.float32)


def calibrated_quants(write_f32, images: Sequence, rule: str, progress: bool) -> calibrate.Calibration:
    """Each ungrouped conv's input quantization and each downsample's output quantization, measured on
    `images` by the f32 model that `write_f32(path)` writes (to a temporary file, deleted after)."""
    with tempfile.TemporaryDirectory(prefix="pyggml-calibrate-") as tmp:
        path = write_f32(Path(tmp) / "f32.gguf")
        with load(path) as model:
            return calibrate.quants(model, images, rule, progress)

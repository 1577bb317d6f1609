"""The checked `Checkpoint`: a torchvision ResNet state_dict whose names, shapes and values `check_state`
has verified, with what a GGUF input records beside its tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..arch import Preprocessing, ResNetConfig, check_tensor_names, expected_tensors, infer_config
from ..errors import ModelFormatError


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

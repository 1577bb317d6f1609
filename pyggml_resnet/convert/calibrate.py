"""Static calibration for int8 files: each int8 convolution's input range, measured by running the f32 model
(our own engine) over calibration images preprocessed as the model's own settings say.

Every conv input but the stem's follows a ReLU (or a max pool of one), so it is >= 0: u8 with zero point 0,
scale = t / 255 for a clipping threshold t that `RULES` choose from the values seen. The stem's input is the
normalised image, whose range the preprocessing fixes: [min (0 - mean) / std, max (1 - mean) / std], stored
as asymmetric u8 (scale = range / 255, the zero point the u8 value of 0.0), so no calibration is needed there.
A downsample's output (the shortcut its block's last conv adds) has no ReLU: asymmetric u8 over a range that
the same rule picks from both signs. Which rule is the default was measured (docs/usage.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ..arch import STEM, InputQuant, Preprocessing
from ..errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SAMPLES = 8192  # values kept per conv input and image, for the percentile and MSE rules
RULES = ("minmax", "percentile", "mse")
DEFAULT_RULE = "minmax"
PERCENTILE = 99.99
U8_MAX = 255


def image_sources(sources, count: int | None = None) -> list:
    """The calibration images: `sources` is a path (a directory: its image files, sorted by name), or a list of
    paths, PIL images, HxWx3 uint8 arrays and float32 (3, H, W) images already preprocessed as the model's
    settings say; the first `count` (all if None). InputError if none is left."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    images = []
    for s in sources:
        if isinstance(s, (str, os.PathLike)) and Path(s).is_dir():
            images += sorted(p for p in Path(s).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            images.append(s)
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputError(f"calibration count must be a positive integer, got {count!r}")
        images = images[:count]
    if not images:
        raise InputError(f"no calibration images in {sources!r}: give image files, a directory of them, or arrays")
    return images


def _preprocessed(model, img) -> np.ndarray:
    """A calibration image as the network's (3, H, W) float32 input."""
    if isinstance(img, np.ndarray) and img.dtype == np.float32 and img.ndim == 3 and img.shape[0] == 3:
        return img
    return model.preprocess(img)


class Calibration(NamedTuple):
    """What calibration measured, by conv weight name: each ungrouped conv's input quantization, and each
    downsample's output quantization (its block's shortcut, stored as u8)."""

    inputs: dict[str, InputQuant]
    shortcuts: dict[str, InputQuant]


def asymmetric(lo: float, hi: float) -> InputQuant:
    """u8 over [lo, hi] widened to hold 0.0, which it represents exactly: scale = (hi - lo) / 255 (float32),
    the zero point the u8 value of 0.0. A range of nothing but 0 gets scale 1: every value quantizes to 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        return InputQuant(1.0, 0)
    scale = float(np.float32((hi - lo) / U8_MAX))
    return InputQuant(scale, int(np.clip(np.rint(-lo / scale), 0, U8_MAX)))


def stem_quant(p: Preprocessing) -> InputQuant:
    """The stem's input (the normalised image) over its whole range: asymmetric u8."""
    mean, std = np.asarray(p.mean, np.float64), np.asarray(p.std, np.float64)
    return asymmetric(float(np.min(-mean / std)), float(np.max((1 - mean) / std)))


def threshold(samples: np.ndarray, largest: float, rule: str) -> float:
    """The clipping threshold `rule` picks for non-negative values: their largest ("minmax"), their PERCENTILE
    ("percentile"), or the candidate that minimises the squared error of rounding to 256 steps and clipping
    ("mse", over 100 fractions of the largest)."""
    if rule == "minmax" or largest <= 0:
        return largest
    if rule == "percentile":
        return float(np.percentile(samples, PERCENTILE)) or largest
    best, best_err = largest, np.inf
    for t in largest * np.linspace(0.01, 1, 100):
        step = t / U8_MAX
        err = float(np.square(np.minimum(np.rint(samples / step), U8_MAX) * step - samples).mean())
        if err < best_err:
            best, best_err = float(t), err
    return best


def signed_quant(samples: np.ndarray, lo: float, hi: float, rule: str) -> InputQuant:
    """Asymmetric u8 (`asymmetric`) for signed values seen between lo and hi, over the range `rule` picks: all
    of it ("minmax"), the (100 - PERCENTILE)th to the PERCENTILEth percentile ("percentile"), or the fraction
    of it that minimises the squared error of quantizing and clipping ("mse", over 100 fractions)."""
    if rule == "percentile":
        low, high = np.percentile(samples, [100 - PERCENTILE, PERCENTILE])
        return asymmetric(float(low), float(high)) if high > low else asymmetric(lo, hi)
    if rule == "minmax" or hi <= lo:
        return asymmetric(lo, hi)
    best, best_err = asymmetric(lo, hi), np.inf
    for f in np.linspace(0.01, 1, 100):
        q = asymmetric(lo * f, hi * f)
        err = float(np.square((np.clip(np.rint(samples / q.scale) + q.zero, 0, U8_MAX) - q.zero) * q.scale
                              - samples).mean())
        if err < best_err:
            best, best_err = q, err
    return best


class _Seen:
    """One tensor's values over the calibration images: their extremes, and a sample of each image's."""

    def __init__(self):
        self.lo = self.hi = 0.0
        self.parts: list[np.ndarray] = []

    def add(self, flat: np.ndarray, rng: np.random.Generator) -> None:
        self.lo = min(self.lo, float(flat.min(initial=0.0)))
        self.hi = max(self.hi, float(flat.max(initial=0.0)))
        self.parts.append(rng.choice(flat, min(SAMPLES, flat.size), replace=False))

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate(self.parts)


def quants(model, images: Sequence, rule: str = DEFAULT_RULE, progress: bool = True) -> Calibration:
    """Each ungrouped conv's input quantization and each downsample's output quantization (by weight name,
    graph order), from running `model` (f32) over `images` one at a time. Convs that read one tensor (a
    stage's first conv and its downsample) share one InputQuant, measured once: that tensor can then pass
    between them as u8 (`resnet._u8_successor`)."""
    if rule not in RULES:
        raise InputError(f"calibration rule must be one of {RULES}, got {rule!r}")
    rng = np.random.default_rng(0)
    first_reader: dict[str, str] = {}  # conv -> the first conv reading the same tensor, which measures it
    inputs_seen: dict[str, _Seen] = {}  # by that first reader
    shortcuts_seen: dict[str, _Seen] = {}
    for img in tqdm(images, desc="calibrating", unit="image", file=sys.stderr, disable=not progress):
        inputs, shortcuts = model.calibration_taps(_preprocessed(model, img)[None])
        readers: dict[int, str] = {}  # tensor (one array for convs reading one tensor) -> its first reader
        for name, x in inputs.items():
            first = first_reader.setdefault(name, readers.setdefault(id(x), name))
            if first != name:
                continue  # measured as `first`'s input
            flat = x.reshape(-1)
            if name != STEM.name and flat.size and flat.min() < 0:
                raise InputError(f"the input of {name} is negative: it does not follow a ReLU")
            inputs_seen.setdefault(name, _Seen()).add(flat, rng)
        for name, x in shortcuts.items():
            shortcuts_seen.setdefault(name, _Seen()).add(x.reshape(-1), rng)
    measured = {}
    for name, seen in inputs_seen.items():
        if name == STEM.name:
            measured[name] = stem_quant(model.preprocessing)
            continue
        t = threshold(seen.samples, seen.hi, rule)
        # An input that is always 0 gets any positive scale: every value quantizes to 0 exactly.
        measured[name] = InputQuant(float(np.float32(t / U8_MAX)) if t > 0 else 1.0, 0)
    shortcut_quants = {name: signed_quant(seen.samples, seen.lo, seen.hi, rule)
                       for name, seen in shortcuts_seen.items()}
    return Calibration({name: measured[first] for name, first in first_reader.items()}, shortcut_quants)

"""Static calibration for int8 files: each int8 convolution's input range, measured by running the f32 model
(our own engine) over calibration images preprocessed as the model's own settings say.

Every conv input but the stem's follows a ReLU (or a max pool of one), so it is >= 0: u8 with zero point 0,
scale = t / 255 for a clipping threshold t that `RULES` choose from the values seen. The stem's input is the
normalised image, whose range the preprocessing fixes: [min (0 - mean) / std, max (1 - mean) / std], stored
as asymmetric u8 (scale = range / 255, the zero point the u8 value of 0.0), so no calibration is needed there.
Which rule is the default was measured (docs/usage.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

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


def stem_quant(p: Preprocessing) -> InputQuant:
    """The stem's input (the normalised image) over its whole range: asymmetric u8."""
    mean, std = np.asarray(p.mean, np.float64), np.asarray(p.std, np.float64)
    lo, hi = float(np.min(-mean / std)), float(np.max((1 - mean) / std))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / U8_MAX
    return InputQuant(float(np.float32(scale)), int(np.clip(np.rint(-lo / scale), 0, U8_MAX)))


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


def input_quants(model, images: Sequence, rule: str = DEFAULT_RULE, progress: bool = True) -> dict[str, InputQuant]:
    """Each ungrouped conv's InputQuant (by weight name, graph order), from running `model` (f32) over `images`
    one at a time. Convs that read one tensor (a stage's first conv and its downsample) share one InputQuant,
    measured once: that tensor can then pass between them as u8 (`resnet._u8_successor`)."""
    if rule not in RULES:
        raise InputError(f"calibration rule must be one of {RULES}, got {rule!r}")
    rng = np.random.default_rng(0)
    first_reader: dict[str, str] = {}  # conv -> the first conv reading the same tensor, which measures it
    samples: dict[str, list[np.ndarray]] = {}
    largest: dict[str, float] = {}
    for img in tqdm(images, desc="calibrating", unit="image", file=sys.stderr, disable=not progress):
        readers: dict[int, str] = {}  # tensor (conv_inputs gives convs reading one tensor one array) -> first
        for name, x in model.conv_inputs(_preprocessed(model, img)[None]).items():
            first = first_reader.setdefault(name, readers.setdefault(id(x), name))
            if first != name:
                continue  # measured as `first`'s input
            flat = x.reshape(-1)
            if name != STEM.name and flat.size and flat.min() < 0:
                raise InputError(f"the input of {name} is negative: it does not follow a ReLU")
            largest[name] = max(largest.get(name, 0.0), float(flat.max(initial=0.0)))
            samples.setdefault(name, []).append(rng.choice(flat, min(SAMPLES, flat.size), replace=False))
    measured = {}
    for name, parts in samples.items():
        if name == STEM.name:
            measured[name] = stem_quant(model.preprocessing)
            continue
        t = threshold(np.concatenate(parts), largest[name], rule)
        # An input that is always 0 gets any positive scale: every value quantizes to 0 exactly.
        measured[name] = InputQuant(float(np.float32(t / U8_MAX)) if t > 0 else 1.0, 0)
    return {name: measured[first] for name, first in first_reader.items()}

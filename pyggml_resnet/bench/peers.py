"""What the benchmark's peers run, made from the same weights as ours: the ONNX export, ONNX Runtime's static
int8 quantization of it, the images that calibrate it and the distinct ones that test it, and how far an
engine's logits are from PyTorch's.

Importable without the bench: `ort_int8_logits` gives ONNX Runtime's int8 logits of a PyTorch ResNet (and its
f32 ones) for a test that holds our int8 to the same bound on the same net, calibration and test images.
torch, onnx and onnxruntime are imported only by the functions that need them.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..arch import Preprocessing
from ..transforms import preprocess
from .child import export_onnx, onnxruntime_session, quantize_int8  # noqa: F401 (export_onnx, quantize_int8: part of this module's API)

IMAGE_SEED = 21  # of the synthetic images
CALIBRATION, TEST = 0, 1  # the two image sets' streams under IMAGE_SEED: no image is in both


def _field(rng: np.random.Generator, side: int) -> np.ndarray:
    """side x side noise whose amplitude falls with frequency, as natural images' spectra do: random grids of 2,
    4, 8, ... cells, each upsampled bicubically and weighted 0.6x the coarser one; of order 1."""
    out = np.zeros((side, side), np.float32)
    cells, weight = 2, 1.0
    while cells <= side // 4:
        grid = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), "F")
        out += weight * np.asarray(grid.resize((side, side), Image.Resampling.BICUBIC))
        cells, weight = 2 * cells, 0.6 * weight
    return out


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A muted colour, as most surfaces are: a grey level with a little hue."""
    return rng.uniform(30, 225) + rng.normal(0, 30, 3).astype(np.float32)


def _render(rng: np.random.Generator, side: int) -> Image.Image:
    """A side x side RGB picture with what photos have and noise lacks: textured surfaces with sharp edges
    between them, shading, some blur and some sensor noise. Drawn at twice the size and shrunk, so edges are
    antialiased."""
    big = 2 * side
    texture = np.stack([_field(rng, big) for _ in range(3)], axis=-1)  # luminance, then two colour axes
    texture[..., 1:] *= 0.3
    a = _colour(rng) + 25 * texture @ np.array([[1, 1, 1], [1, 0, -1], [-0.5, 1, -0.5]], np.float32)
    for _ in range(int(rng.integers(3, 10))):  # objects, each a surface of its own texture and colour
        mask = Image.new("L", (big, big))
        draw = ImageDraw.Draw(mask)
        x0, x1 = sorted(rng.integers(-big // 4, big + big // 4, 2).tolist())
        y0, y1 = sorted(rng.integers(-big // 4, big + big // 4, 2).tolist())
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=255)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=255)
        else:
            draw.polygon([tuple(p) for p in rng.integers(0, big, (int(rng.integers(3, 8)), 2)).tolist()], fill=255)
        shift = rng.integers(0, big, 2)
        surface = _colour(rng) + rng.uniform(5, 50) * np.roll(texture[..., :1], tuple(shift), axis=(0, 1))
        inside = np.asarray(mask, np.float32)[..., None] / 255
        a = a * (1 - inside) + surface * inside
    light = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.9, 1.2), big, dtype=np.float32)  # uneven lighting
    a = a * (light[:, None, None] if rng.integers(2) else light[None, :, None])
    im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3.0))))  # focus
    a = np.asarray(im, np.float32) + rng.normal(0.0, rng.uniform(1.0, 6.0), (big, big, 3)).astype(np.float32)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB").resize((side, side),
                                                                                   Image.Resampling.LANCZOS)


def pictures(kind: int, count: int, side: int) -> list[Image.Image]:
    """The first `count` synthetic side x side RGB pictures of set `kind` (CALIBRATION or TEST): the same
    pictures at any `count`, and none in both sets. As files (`.save`), they can calibrate a converter."""
    return [_render(np.random.default_rng([IMAGE_SEED, kind, i]), side) for i in range(count)]


def images(kind: int, count: int, preprocessing: Preprocessing = Preprocessing()) -> np.ndarray:
    """`pictures` of set `kind` preprocessed as the model's own settings say: float32 (count, 3, crop, crop).
    They are drawn 5/4 the resize's side, so the resize shrinks them, as it does photos."""
    p = preprocessing
    return np.stack([preprocess(im, resize=p.resize, crop=p.crop, mean=p.mean, std=p.std,
                                interpolation=p.interpolation)
                     for im in pictures(kind, count, (p.resize or p.crop) * 5 // 4)])


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict:
    """How far (N, classes) logits are from the reference engine's for the same N images: the relative L2 error
    over all of them, and the share of images whose top-1 class is the reference's (top-1 agreement) and whose
    top 5 classes hold the reference's top-1 (top-5 agreement, as top-5 accuracy counts a label)."""
    z, r = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    ref_top1 = np.argmax(r, axis=1)
    top5 = np.argsort(-z, axis=1, kind="stable")[:, :5]
    return {"images": len(r), "rel_l2_error": float(np.linalg.norm(z - r) / max(np.linalg.norm(r), 1e-30)),
            "top1_agreement": float(np.mean(np.argmax(z, axis=1) == ref_top1)),
            "top5_agreement": float(np.mean((top5 == ref_top1[:, None]).any(axis=1)))}


def ort_int8_logits(model, calibration: np.ndarray, test: np.ndarray,
                    threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime int8 (`quantize_int8` of `model`'s export, calibrated on `calibration`) and PyTorch f32 logits
    of the `test` images (N, 3, H, W): two (N, classes) float32 arrays. `model` is a PyTorch ResNet in eval mode;
    each test image runs at batch 1, as the bench's correctness check runs them."""
    import torch

    test = np.asarray(test, np.float32)
    with tempfile.TemporaryDirectory(prefix="pyggml-peers-") as tmp:
        f32_path = export_onnx(model, os.path.join(tmp, "model.onnx"), test.shape[-1])
        run = onnxruntime_session(quantize_int8(f32_path, os.path.join(tmp, "model-int8.onnx"), calibration), threads)
        int8 = np.concatenate([run(x[None]) for x in test])
    with torch.inference_mode():
        f32 = model(torch.from_numpy(test)).numpy()
    return int8, f32

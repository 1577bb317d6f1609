"""Turn user images into the float32 arrays a torchvision ImageNet classifier eats.

``preprocess`` reproduces, with Pillow and numpy only, torchvision's
evaluation pipeline applied to a PIL image, by default the classic ImageNet one::

    Compose([Resize(256), CenterCrop(224), ToTensor(),
             Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])

and any other `arch.Preprocessing` (an exact-size resize, no crop, other
mean/std and filters), including torchvision's size arithmetic (truncating
``int()`` for the long side, banker's ``round()`` for the crop offset, zero
padding when the image is smaller than the crop).  The resize itself is
Pillow's, exactly as torchvision does for PIL input, so it is antialiased;
``antialias=False`` is torchvision's resize of the float tensor instead, which
is torch's (non-antialiased) interpolate, reimplemented here in float32.

Mode conversion follows ``Image.open(path).convert("RGB")`` except where that
is lossy in a way that matters for real photos:

* palette images with transparency go through RGBA (what Pillow asks for);
* 16-bit greyscale (``I;16*``) keeps the high byte (value // 256), so the full
  16-bit range maps onto 0..255; ``I`` (32-bit, which Pillow uses for some
  16-bit files) is clipped to 0..65535 and scaled the same way.  A plain
  ``convert("RGB")`` would clip every value above 255 to white;
* float images (``F``) are taken to be in [0, 1] and scaled to 0..255.

Alpha is dropped, not composited (again like ``convert("RGB")``), and EXIF
orientation is not applied, because torchvision applies neither.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .arch import INTERPOLATIONS, Preprocessing
from .errors import InputError

ImageLike = Union[str, "os.PathLike[str]", bytes, Image.Image, np.ndarray]

_DEFAULT = Preprocessing()  # torchvision's classic ImageNet evaluation transforms
IMAGENET_MEAN = _DEFAULT.mean
IMAGENET_STD = _DEFAULT.std

# torchvision's pil_modes_mapping for the modes we support.
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
assert set(_RESAMPLE) == set(INTERPOLATIONS)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, and the image files under each directory (recursively, sorted): what the CLI and
    `pyggml_resnet.ray.read_paths` classify."""
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(p)
    return paths


def load_image(img: ImageLike) -> Image.Image:
    """Return ``img`` (a path, the bytes of an image file, a PIL image, or a uint8 HxW / HxWx3 array) as a
    decoded RGB PIL image.

    Raises InputError for missing, empty, corrupt, truncated or oversized files
    (Pillow's ``Image.MAX_IMAGE_PIXELS`` guard) and for unusable arrays.
    """
    if isinstance(img, (str, os.PathLike)):
        path = os.fspath(img)
        return _to_rgb(_open(path), path)
    if isinstance(img, (bytes, bytearray, memoryview)):  # an encoded file received over a network
        return _to_rgb(_decode(io.BytesIO(img), "image data"), "image data")
    if isinstance(img, Image.Image):
        try:
            img.load()  # a lazily opened image may still fail to decode here
        except Exception as e:
            raise InputError(f"PIL image: cannot decode: {e}") from e
        return _to_rgb(img, "PIL image")
    if isinstance(img, np.ndarray):
        return _from_array(img)
    raise InputError(f"expected a path, PIL image or numpy array (or an image file's bytes), got {type(img).__name__}")


def _open(path: str) -> Image.Image:
    try:
        # Opening the file ourselves closes it even for multi-frame formats,
        # which Pillow would otherwise keep open after load().
        with open(path, "rb") as f:
            return _decode(f, path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def _decode(f, name: str) -> Image.Image:
    """The image in the binary file object `f`, decoded, or InputError naming `name`."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; an
            # image that big is refused like the ones Pillow refuses outright.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(f)
            limit = Image.MAX_IMAGE_PIXELS
            # Checked here too: warning filters are process-wide, so another thread leaving its
            # catch_warnings block (a server decodes in several) can undo the one above.
            if limit is not None and im.width * im.height > limit:
                raise Image.DecompressionBombError(f"{im.width * im.height} pixels, more than the limit of {limit}")
            im.load()  # decode now, so truncated or corrupt data fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(
            f"{name}: image too large, refused as a possible decompression bomb ({e}); "
            "if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS (pyggml-resnet classify --max-pixels N)"
        ) from e
    except Image.UnidentifiedImageError:
        what = "empty file" if f.seek(0, io.SEEK_END) == 0 else "not an image format Pillow can read"
        raise InputError(f"{name}: {what}") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, ... on bad data
        raise InputError(f"{name}: cannot read image ({type(e).__name__}: {e})") from e
    return im


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    if im.width < 1 or im.height < 1:
        raise InputError(f"{name}: image has no pixels (size {im.width}x{im.height})")
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "PA" or (mode == "P" and "transparency" in im.info):
        # Pillow warns on P+transparency -> RGB and asks for RGBA first.
        return im.convert("RGBA").convert("RGB")
    if mode.startswith("I;16"):
        grey = np.asarray(im) >> 8  # keep the high byte: 0..65535 -> 0..255
    elif mode == "I":
        grey = np.clip(np.asarray(im), 0, 65535) >> 8  # assume 16-bit data, as Pillow gives for some files
    elif mode == "F":
        grey = np.rint(np.clip(np.nan_to_num(np.asarray(im)), 0.0, 1.0) * 255.0)  # assume [0, 1]
    else:
        try:
            return im.convert("RGB")
        except ValueError as e:
            raise InputError(f"{name}: cannot convert mode {mode!r} to RGB: {e}") from e
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise InputError(f"image array: dtype must be uint8, got {a.dtype}")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise InputError(f"image array: shape must be (H, W) or (H, W, 3), got {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"image array: image has no pixels (shape {a.shape})")
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def _resized_size(width: int, height: int, size) -> tuple[int, int]:
    """(width, height) after torchvision ``Resize(size)``: shorter side -> size, or exactly (H, W).

    Same arithmetic as torchvision's ``_compute_resized_output_size``: the long
    side is truncated, not rounded, and a square image counts as "width is short".
    """
    if isinstance(size, tuple):
        return size[1], size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop(x: np.ndarray, crop) -> np.ndarray:
    """torchvision ``CenterCrop(crop)`` (N, or (H, W)) on an HxWxC array."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = x.shape[:2]
    if ch > h or cw > w:
        # torchvision zero-pads first; the odd pixel goes to the bottom/right.
        dh, dw = max(ch - h, 0), max(cw - w, 0)
        x = np.pad(x, ((dh // 2, (dh + 1) // 2), (dw // 2, (dw + 1) // 2), (0, 0)))
        h, w = x.shape[:2]
    # Python's round() rounds halves to even: an excess of 33 gives offset 16.
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return x[top : top + ch, left : left + cw]


def _taps(n_in: int, n_out: int, cubic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and float32 weights, (n_out, taps), of torch's interpolate along one axis
    (align_corners=False, antialias=False: UpSampleKernel.cpp's compute_indices_weights, in float32)."""
    f = np.float32
    scale = f(n_in) / f(n_out)
    # scale * (i + 0.5) - 0.5 rounded once, as torch's fused multiply-add gives it (exact in float64 first).
    real = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(f)
    if not cubic:
        real = np.maximum(real, f(0))  # linear clamps the source position at 0, cubic reads clamped pixels
    index = np.minimum(np.floor(real).astype(np.int64), n_in - 1)
    t = np.clip(real - index.astype(f), f(0), f(1))
    if cubic:  # Keys' kernel with a = -0.75, as torch's get_cubic_upsample_coefficients
        a = f(-0.75)

        def near(d):  # |d| <= 1
            return ((a + f(2)) * d - (a + f(3))) * d * d + f(1)

        def far(d):  # 1 < |d| < 2
            return ((a * d - f(5) * a) * d + f(8) * a) * d - f(4) * a

        weights = np.stack([far(t + f(1)), near(t), near(f(1) - t), far(f(1) - t + f(1))], axis=1)
        indices = np.clip(index[:, None] + np.arange(-1, 3), 0, n_in - 1)
    else:
        weights = np.stack([f(1) - t, t], axis=1)
        indices = np.stack([index, index + (index < n_in - 1)], axis=1)
    return indices, weights.astype(f)


def _interpolate(x: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """torchvision ``Resize(antialias=False)`` on a float HxWxC array, to (width, height): torch's interpolate
    in float32, the width first (the inner sum of torch's kernel), then the height."""
    cubic = interpolation == "bicubic"
    for axis, n_out in ((1, size[0]), (0, size[1])):
        indices, weights = _taps(x.shape[axis], n_out, cubic)
        shape = [1, 1, 1]
        shape[axis] = n_out
        out = np.take(x, indices[:, 0], axis) * weights[:, 0].reshape(shape)
        for j in range(1, indices.shape[1]):
            out += np.take(x, indices[:, j], axis) * weights[:, j].reshape(shape)
        x = out
    return x


def preprocess(
    img: ImageLike,
    *,
    resize: int | tuple[int, int] | None = _DEFAULT.resize,
    crop: int | tuple[int, int] | None = _DEFAULT.crop,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = _DEFAULT.interpolation,
    antialias: bool = True,
) -> np.ndarray:
    """Return ``img`` as a C-contiguous float32 array of shape (3, H, W): torchvision's
    ``Resize(resize, interpolation, antialias)``, ``CenterCrop(crop)``, ``ToTensor()``, ``Normalize(mean, std)``.

    ``resize`` is the shorter side, an exact (height, width), or None (no resize); ``crop`` a square side,
    (height, width) or None (no crop, after an exact resize). ``interpolation`` is one of
    ``arch.INTERPOLATIONS``, Pillow's filters as torchvision applies them to a PIL image; ``antialias=False``
    is torchvision's Resize of the float tensor instead (bilinear or bicubic; `arch.Preprocessing`). The
    settings must be ones a model file may record (`arch.Preprocessing.problem`), else InputError.
    """
    settings = Preprocessing(resize, crop, mean, std, interpolation, antialias)
    problem = settings.problem()
    if problem:
        raise InputError(problem)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    im = load_image(img)
    size = im.size if settings.resize is None else _resized_size(im.width, im.height, settings.resize)
    # torchvision returns the image untouched if already that size.
    if antialias:
        if size != im.size:
            im = im.resize(size, _RESAMPLE[interpolation])
        x = np.asarray(im, dtype=np.uint8)
    else:  # ToTensor first, then the tensor is resized
        x = np.asarray(im, dtype=np.uint8).astype(np.float32) / np.float32(255)
        if size != im.size:
            x = _interpolate(x, size, interpolation)
    if settings.crop is not None:
        x = _center_crop(x, settings.crop)
    # ToTensor: HWC uint8 -> CHW float32 / 255; Normalize: subtract, then divide, in float32.
    x = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
    if antialias:
        x /= np.float32(255)
    x -= mean32
    x /= std32
    return x

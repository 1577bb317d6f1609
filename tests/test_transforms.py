"""pyggml_resnet.transforms (exported as pyggml_resnet.preprocess) against torchvision's ImageNet eval transforms, rewritten here with torch ops.

The reference resizes with Pillow, because that is what torchvision's Resize
does to a PIL image (torch's interpolate is a different, non-PIL filter); the
size arithmetic, zero padding, crop offsets, ToTensor and Normalize are written
independently with torch from torchvision 0.29's transforms/functional.py.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from pyggml_resnet import labels, transforms as pp
from pyggml_resnet.errors import InputError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PIL_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
                "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
# Both sides do the same float32 operations (divide by 255, subtract, divide),
# so results are normally bit-identical; 1e-6 (~4 ulp at the largest |value|,
# about 2.6) only allows for torch vectorising a division differently.
TOL = 1e-6

SIZES = [(300, 200), (200, 300), (100, 150), (1, 1), (2000, 50), (256, 256), (224, 224)]  # (width, height)


def reference(rgb: Image.Image, resize=256, crop=224, interpolation="bilinear", mean=MEAN, std=STD,
              antialias=True) -> torch.Tensor:
    """torchvision Compose([Resize(resize, interpolation), CenterCrop(crop), ToTensor(), Normalize(mean, std)])
    on a PIL image, each step left out when its size is None; with antialias=False, ToTensor comes first and
    Resize(..., antialias=False) resizes the float tensor (torch's interpolate)."""
    w, h = rgb.size
    if isinstance(resize, int):
        # _compute_resized_output_size: shorter edge -> resize, longer edge truncated.
        if w <= h:
            new_w, new_h = resize, int(resize * h / w)
        else:
            new_w, new_h = int(resize * w / h), resize
    elif resize is not None:
        new_h, new_w = resize
    if not antialias:
        t = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)  # ToTensor
        if resize is not None and (new_h, new_w) != (h, w):
            t = torch.nn.functional.interpolate(t[None], size=(new_h, new_w), mode=interpolation,
                                                align_corners=False, antialias=False)[0]
    else:
        if resize is not None and (new_h, new_w) != (h, w):  # F.resize returns the image untouched otherwise
            rgb = rgb.resize((new_w, new_h), PIL_RESAMPLE[interpolation])  # F_pil.resize: no reducing_gap
        t = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)  # CHW uint8
    if crop is not None:
        t = center_crop(t, (crop, crop) if isinstance(crop, int) else crop)
    x = t.to(torch.float32).div(255) if antialias else t  # ToTensor
    mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub(mean).div(std)  # Normalize


def center_crop(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's F.center_crop of a CHW tensor to size (height, width)."""
    crop_h, crop_w = size
    _, h, w = t.shape
    if crop_w > w or crop_h > h:  # F.center_crop zero-pads, extra pixel right/bottom
        pad_l = (crop_w - w) // 2 if crop_w > w else 0
        pad_r = (crop_w - w + 1) // 2 if crop_w > w else 0
        pad_t = (crop_h - h) // 2 if crop_h > h else 0
        pad_b = (crop_h - h + 1) // 2 if crop_h > h else 0
        t = torch.nn.functional.pad(t, (pad_l, pad_r, pad_t, pad_b), value=0)
        _, h, w = t.shape
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return t[:, top : top + crop_h, left : left + crop_w]


def assert_close(got: np.ndarray, want: torch.Tensor) -> None:
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.shape == tuple(want.shape)
    assert np.abs(got - want.numpy()).max() <= TOL


# --- images of each mode, with the RGB pixels they should load as -------------


def make(mode: str, w: int, h: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """An image of `mode` and the HxWx3 uint8 RGB array load_image must give for it."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb), rgb
    if mode == "L":
        return Image.fromarray(grey), np.repeat(grey[..., None], 3, axis=2)
    if mode == "LA":  # alpha dropped, not composited
        return Image.fromarray(np.dstack([grey, alpha])), np.repeat(grey[..., None], 3, axis=2)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha])), rgb
    if mode in ("P", "P+transparency"):
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = grey
        im = Image.frombytes("P", (w, h), idx.tobytes())
        im.putpalette(palette.tobytes())
        if mode == "P+transparency":
            im.info["transparency"] = 7
        return im, palette[idx]
    if mode == "CMYK":
        cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8).astype(np.int64)
        nk = 255 - cmyk[..., 3:]
        want = nk - np.rint(cmyk[..., :3] * nk / 255)  # Pillow's cmyk2rgb
        return Image.fromarray(cmyk.astype(np.uint8), "CMYK"), want.astype(np.uint8)
    if mode == "I;16":
        v = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        return Image.fromarray(v), np.repeat((v >> 8).astype(np.uint8)[..., None], 3, axis=2)
    raise AssertionError(mode)


MODES = ["RGB", "L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_torchvision(mode, size):
    im, want_rgb = make(mode, *size)
    expected_mode = {"P+transparency": "P"}.get(mode, mode)
    assert im.mode == expected_mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
        loaded = pp.load_image(im)
        got = pp.preprocess(im)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), want_rgb)
    assert_close(got, reference(Image.fromarray(want_rgb)))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", SIZES + [(257, 256), (256, 259), (3, 700)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("resize,crop", [(256, 224), (232, 224), (200, 224), (None, 224), (7, 5)])
def test_sizes_and_interpolations(interpolation, size, resize, crop):
    _, rgb = make("RGB", *size, seed=1)
    got = pp.preprocess(rgb, resize=resize, crop=crop, interpolation=interpolation)
    assert_close(got, reference(Image.fromarray(rgb), resize, crop, interpolation))


# Every kind of transform a classifier's eval pipeline uses, on images larger and smaller than the sizes.
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"])
@pytest.mark.parametrize("size", [(300, 200), (97, 131), (224, 224), (640, 20)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("resize,crop", [((224, 224), None), ((224, 224), 200), ((160, 240), (150, 200)),
                                         (None, (100, 80)), (235, (224, 200)), (288, 288)])
def test_every_transform_is_torchvisions_bit_for_bit(interpolation, size, resize, crop):
    """Squash (Resize((H, W))), no crop, rectangular crops, every PIL filter torchvision maps, and the common
    fine-tuning mean/std of 0.5: equal to torchvision's PIL pipeline to the last bit."""
    _, rgb = make("RGB", *size, seed=2)
    kwargs = dict(resize=resize, crop=crop, interpolation=interpolation, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    got = pp.preprocess(rgb, **kwargs)
    want = reference(Image.fromarray(rgb), **kwargs).numpy()
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, want)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(300, 200), (97, 131), (224, 224), (40, 500)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("resize,crop", [((224, 224), None), (256, 224), ((100, 300), (90, 200))])
def test_antialias_false_is_torchs_interpolate(interpolation, size, resize, crop):
    """Resize(..., antialias=False) of the float tensor: torch's interpolate, with the same source pixels and
    weights to float32 rounding (torch fuses some multiply-adds: bilinear differs by an ulp, bicubic's
    weights by a few), so within 2e-6 of values in [0, 1] before Normalize; a pixel off by one is ~1e-1."""
    _, rgb = make("RGB", *size, seed=3)
    kwargs = dict(resize=resize, crop=crop, interpolation=interpolation, antialias=False)
    got = pp.preprocess(rgb, **kwargs)
    want = reference(Image.fromarray(rgb), **kwargs).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 2e-6 / min(STD)


def test_antialias_false_is_not_pillows_filter():
    """Shrinking without antialiasing skips pixels that Pillow's filter averages: far more than rounding."""
    _, rgb = make("RGB", 640, 480, seed=4)
    kwargs = dict(resize=(224, 224), crop=None)
    assert np.abs(pp.preprocess(rgb, antialias=False, **kwargs) - pp.preprocess(rgb, **kwargs)).max() > 0.1


# --- torchvision's arithmetic, checked against hand-computed pixel positions --


def normalized(pixels: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize of an HxWx3 uint8 array, in numpy."""
    x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (x - np.float32(MEAN).reshape(3, 1, 1)) / np.float32(STD).reshape(3, 1, 1)


def test_already_resized_image_is_only_cropped():
    _, rgb = make("RGB", 256, 256)
    np.testing.assert_array_equal(pp.preprocess(rgb), normalized(rgb[16:240, 16:240]))
    _, rgb = make("RGB", 224, 224)
    np.testing.assert_array_equal(pp.preprocess(rgb, resize=None), normalized(rgb))
    np.testing.assert_array_equal(pp.preprocess(rgb, resize=224), normalized(rgb))


def test_long_side_is_truncated_and_skip_uses_it():
    # 256 * 257 / 256 = 257 exactly: already the target size, so no resampling;
    # then the crop offset (257 - 224) / 2 = 16.5 rounds half to even -> 16, not 17.
    _, rgb = make("RGB", 257, 256)
    np.testing.assert_array_equal(pp.preprocess(rgb), normalized(rgb[16:240, 16:240]))
    _, rgb = make("RGB", 256, 259)  # 17.5 -> 18
    np.testing.assert_array_equal(pp.preprocess(rgb), normalized(rgb[18:242, 16:240]))
    assert pp._resized_size(300, 200, 256) == (384, 256)
    assert pp._resized_size(200, 300, 256) == (256, 384)
    assert pp._resized_size(2000, 50, 256) == (10240, 256)
    assert pp._resized_size(333, 500, 256) == (256, 384)  # 384.38... truncated


def test_small_image_is_zero_padded_bottom_right_heavy():
    px = np.array([[[10, 20, 30]]], dtype=np.uint8)
    got = pp.preprocess(px, resize=None, crop=4)
    canvas = np.zeros((4, 4, 3), dtype=np.uint8)
    canvas[1, 1] = px[0, 0]  # pad (4 - 1) // 2 = 1 before, 2 after
    np.testing.assert_array_equal(got, normalized(canvas))


def test_padding_in_one_direction_cropping_in_the_other():
    _, rgb = make("RGB", 300, 200)  # resize=200 leaves it untouched; 224 > 200 pads 12 + 12
    canvas = np.zeros((224, 300, 3), dtype=np.uint8)
    canvas[12:212] = rgb
    np.testing.assert_array_equal(pp.preprocess(rgb, resize=200), normalized(canvas[:, 38:262]))


# --- paths, files and modes read from disk ------------------------------------


def test_reads_files_of_each_format(tmp_path):
    im, want = make("P+transparency", 40, 30)
    im.save(tmp_path / "p.png")
    im, want16 = make("I;16", 40, 30)
    im.save(tmp_path / "g16.png")
    cmyk, want_cmyk = make("CMYK", 40, 30)
    cmyk.save(tmp_path / "c.tiff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Image.open(tmp_path / "p.png") as reread:
            assert reread.info.get("transparency") is not None
        np.testing.assert_array_equal(np.asarray(pp.load_image(tmp_path / "p.png")), want)
        np.testing.assert_array_equal(np.asarray(pp.load_image(str(tmp_path / "g16.png"))), want16)
        np.testing.assert_array_equal(np.asarray(pp.load_image(tmp_path / "c.tiff")), want_cmyk)
        assert_close(pp.preprocess(tmp_path / "g16.png"), reference(Image.fromarray(want16)))


def test_wide_int_and_float_modes():
    v = np.array([[-5, 0, 255, 256, 65535, 70000]], dtype=np.int32)
    got = np.asarray(pp.load_image(Image.fromarray(v)))  # mode "I": clipped to 16 bits, high byte
    np.testing.assert_array_equal(got[0, :, 0], [0, 0, 0, 1, 255, 255])
    f = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float32)
    got = np.asarray(pp.load_image(Image.fromarray(f)))  # mode "F": [0, 1] -> 0..255
    np.testing.assert_array_equal(got[0, :, 0], [0, 0, 128, 255, 255, 0])
    be = Image.fromarray(np.array([[0x1234, 0xFF00]], dtype=np.uint16)).convert("I").convert("I;16B")
    np.testing.assert_array_equal(np.asarray(pp.load_image(be))[0, :, 0], [0x12, 0xFF])


# --- bad input ----------------------------------------------------------------


def image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make("RGB", 64, 64)[1]).save(buf, fmt)  # noise compresses badly: plenty to cut
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,data",
    [
        ("text.jpg", b"this is not an image\n" * 10),
        ("empty.png", b""),
        ("cut.png", image_bytes("PNG")[:3000]),
        ("cut.jpg", image_bytes("JPEG")[:2000]),
    ],
)
def test_bad_files(tmp_path, monkeypatch, name, data):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=name):
        pp.load_image(path)
    with pytest.raises(InputError, match=name):
        pp.preprocess(str(path))


def test_truncated_lazy_pil_image(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    path = tmp_path / "cut.png"
    path.write_bytes(image_bytes("PNG")[:3000])
    with Image.open(path) as im, pytest.raises(InputError):
        pp.load_image(im)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(InputError, match="nope.jpg"):
        pp.load_image(tmp_path / "nope.jpg")
    with pytest.raises(InputError):
        pp.load_image(tmp_path)


@pytest.mark.parametrize("side", [40, 100])  # 1600 px: Pillow warns; 10000 px (> 2x): Pillow raises
def test_decompression_bomb(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="bomb.png.*too large"):
        pp.load_image(path)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((8, 8, 3), np.float32),
        np.zeros((8, 8), np.uint16),
        np.zeros((8, 8, 3), np.int64),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((8, 8, 1), np.uint8),
        np.zeros((3, 8, 8, 3), np.uint8),
        np.zeros((8,), np.uint8),
        np.zeros((0, 8, 3), np.uint8),
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_bad_arrays(arr):
    with pytest.raises(InputError):
        pp.load_image(arr)


def test_bad_arguments():
    rgb = make("RGB", 10, 10)[1]
    for kwargs in [{"interpolation": "cubic"}, {"crop": 0}, {"resize": 0}, {"std": (1, 0, 1)}, {"mean": (0, 0)},
                   {"resize": (224, 0)}, {"crop": (1, 2, 3)}, {"crop": None}, {"resize": None, "crop": None},
                   {"antialias": False, "interpolation": "nearest"}, {"antialias": 1}]:
        with pytest.raises(InputError):
            pp.preprocess(rgb, **kwargs)
    with pytest.raises(InputError):
        pp.load_image(42)


# --- labels -------------------------------------------------------------------


def test_imagenet_labels():
    names = labels.imagenet_labels()
    assert isinstance(names, tuple) and len(names) == 1000
    assert len(set(names)) >= 998  # torchvision's list is unique; older lists repeat "crane", "maillot"
    assert (names[0], names[258], names[999]) == ("tench", "Samoyed", "toilet tissue")
    assert all(n and n == n.strip() for n in names)
    assert labels.imagenet_labels() is names  # cached

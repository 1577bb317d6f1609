"""The packed GEMM's int8 paths (csrc/gemm.h's gemm_int8, Graph.gemm_int8) against an exact reference.

The reference quantizes the image as the op documents (x * (1 / sx) in float32, clamped to [-zx, 255 - zx],
rounded to nearest even, + zx; padding the value 0.0), sums (q - zx) * w over each window exactly (in float64,
exact here: every partial sum is an integer below 2^53), and applies the documented float32 epilogue in its
order: (float) sum * (sx * sw) + bias in one rounding, + residual (f32; or u8 bytes r, (float) (r - zr) * sr +
that in one rounding), ReLU. Every path must give those bits exactly, so the paths, batch sizes and thread
counts agree bit for bit.
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pyggml_resnet import arch, int8
from pyggml_resnet.bench.workload import products
from pyggml_resnet.errors import InputError
from pyggml_resnet.ggml import (Backend, Graph, Type, Weights, gemm_block_k_bytes, gemm_cache_bytes,
                                gemm_int8_paths, set_gemm_cache_bytes)
from test_gemm import im2col

PATHS = gemm_int8_paths()
F32 = np.float32


@pytest.fixture(scope="module")
def backend():
    with Backend(threads=2) as b:
        yield b


def quantize_image(img, sx, zx):
    """The op's u8 pixels minus zx, as int64."""
    with np.errstate(over="ignore"):
        v = img * (F32(1) / F32(sx))
    v = np.where(v > F32(-zx), v, F32(-zx))
    v = np.where(v < F32(255 - zx), v, F32(255 - zx))
    return np.rint(v).astype(np.int64)


def fma32(a, b, c):
    """a * b + c for float32 arrays, rounded once to float32 (as vfmadd and fmaf round), broadcasting."""
    a, b, c = np.broadcast_arrays(*(np.asarray(v, F32).astype(np.float64) for v in (a, b, c)))
    p = a * b  # exact: 48 bits
    s = p + c
    bp = s - p
    err = (p - (s - bp)) + (c - bp)  # TwoSum: p + c == s + err exactly
    r = s.astype(F32)
    # s is the float64 nearest p + c, so rounding it to float32 errs only where it is halfway between two
    # float32s and err, lost in float64, says on which side the exact sum lies.
    other = np.nextafter(r, np.where(s > r.astype(np.float64), np.inf, -np.inf).astype(F32))
    tie = (s != r) & (2 * s == r.astype(np.float64) + other.astype(np.float64)) & (err != 0)
    toward_other = np.sign(err) == np.sign(other.astype(np.float64) - s)
    return np.where(tie & toward_other, other, r)


def nearest_f32(x):
    """The float32 nearest the exact rational x, ties to even."""
    r = np.float32(float(x))
    near = [r, np.nextafter(r, F32(np.inf)), np.nextafter(r, F32(-np.inf))]
    return min(near, key=lambda v: (abs(Fraction(float(v)) - x), int(v.view(np.uint32)) & 1))


def test_fma32_rounds_once():
    a, tiny = F32(1 + 2**-12), F32(2**-80)
    # a * a = 1 + 2^-11 + 2^-24, halfway between two float32s: a tiny addend, lost in float64, decides it.
    assert fma32(a, a, tiny) == F32(1 + 2**-11 + 2**-23)
    assert fma32(a, a, -tiny) == F32(1 + 2**-11)
    assert fma32(a, a, F32(0)) == F32(1 + 2**-11)  # the tie itself: to even
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal(2000).astype(F32) for _ in range(2))
    z = rng.standard_normal(2000).astype(F32) * F32(2.0) ** rng.integers(-30, 30, 2000).astype(F32)
    want = [nearest_f32(Fraction(float(u)) * Fraction(float(v)) + Fraction(float(w))) for u, v, w in zip(x, y, z)]
    np.testing.assert_array_equal(fma32(x, y, z), np.array(want, F32))


def reference(img, wq, scales, kernel, stride, padding, sx, zx, bias=None, res=None, relu=False, res_u8=None):
    """img [B, H, W, C] f32 times the s8 weights wq [M, K] with their scales -> [B*OH*OW, M] f32, exactly as
    the op computes it; the residual res as f32, or with res_u8 = (sr, zr) as the op reads its u8 bytes."""
    patches, _ = im2col(quantize_image(img, sx, zx).astype(np.float64), kernel, stride, padding)
    sums = patches @ wq.T.astype(np.float64)  # exact: integers far below 2^53
    assert np.abs(sums).max(initial=0) < 2**31
    y = fma32(sums.astype(np.int32).astype(F32), F32(sx) * scales, F32(0) if bias is None else bias)
    if res is not None and res_u8 is None:
        y = y + res
    elif res is not None:
        y = fma32(minus_zero(res, *res_u8), F32(res_u8[0]), y)
    return np.where(y > 0, y, F32(0)) if relu else y


def as_u8(values, scale, zero):
    """f32 values quantized as the op quantizes its pixels: its u8 bytes."""
    return (quantize_image(values, scale, zero) + zero).astype(np.uint8)


def run(backend, img, q, kernel, stride, padding, sx, zx, bias=None, res=None, relu=False, path=None, u8=None,
        res_u8=None):
    """Graph.gemm_int8 of img [B, H, W, C] -> [B*OH*OW, M]. With u8 = (sy, zy), the op takes img as its u8
    bytes (quantized with sx and zx) and gives its result as u8 bytes (quantized with sy and zy); with
    res_u8 = (sr, zr), it takes the residual as u8 bytes (quantized with sr and zr)."""
    b, h, w, c = img.shape
    m = q.m
    specs = {"w": ("f32", tuple(reversed(q.packed.shape[:3]))), "s": ("f32", (m,)), "c": ("f32", (m,))}
    if bias is not None:
        specs["b"] = ("f32", (m,))
    with Weights(backend, specs) as wt, Graph(backend) as g:
        wt.set("w", int8.words(q.packed))
        wt.set("s", q.scales)
        wt.set("c", int8.words(q.colsums))
        if bias is not None:
            wt.set("b", bias)
        x = g.input("x", (c, w, h, b), "f32" if u8 is None else Type.I8)
        oh, ow = ((n + 2 * padding - kernel) // stride + 1 for n in (h, w))
        r = g.input("r", (m, ow, oh, b), "f32" if res_u8 is None else Type.I8) if res is not None else None
        quant = {} if u8 is None else dict(y_scale=u8[0], y_zero=u8[1])
        if res_u8 is not None:
            quant.update(residual_scale=res_u8[0], residual_zero=res_u8[1])
        y = g.gemm_int8(wt["w"], x, m, scales=wt["s"], colsums=wt["c"], x_scale=sx, x_zero=zx, kernel=kernel,
                        stride=stride, padding=padding, bias=wt["b"] if bias is not None else None, residual=r,
                        relu=relu, path=path, **quant)
        g.finalize(y)
        g.set(x, img if u8 is None else as_u8(img, sx, zx).view(np.int8))
        if r is not None:
            stored = res if res_u8 is None else as_u8(res, *res_u8).view(np.int8)
            g.set(r, stored.reshape(b, oh, ow, m))
        g.compute()
        return g.get(y).reshape(-1, m) if u8 is None else g.get(y).view(np.uint8).reshape(-1, m)


def case(seed, b, h, w, c, m, kernel, stride, padding, epilogue=("bias", "res", "relu")):
    """A random image, weights (packed, and as quants), and the epilogue's operands."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((b, h, w, c), dtype=F32)
    weights = rng.standard_normal((m, kernel, kernel, c), dtype=F32)
    wq, _ = int8.quantize(weights)
    oh, ow = ((n + 2 * padding - kernel) // stride + 1 for n in (h, w))
    bias = rng.standard_normal(m, dtype=F32) if "bias" in epilogue else None
    res = rng.standard_normal((b * oh * ow, m), dtype=F32) if "res" in epilogue else None
    return img, int8.quantize_matrix(weights), wq, bias, res


def minus_zero(values, scale, zero):
    """f32 values' u8 bytes less the zero point, as floats: (float) (r - zero), as the op reads a u8 residual."""
    return (as_u8(values, scale, zero).astype(np.int32) - zero).astype(F32)


def check(backend, path, seed, b, h, w, c, m, kernel, stride, padding, sx, zx, epilogue=("bias", "res", "relu")):
    """The f32 result against the reference, bit for bit; and from the image's u8 bytes, the result's u8 bytes
    (quantized with scale 0.05 and zero 0 after a ReLU, else 128): the reference's, quantized. With a residual,
    both again from its u8 bytes (scale 0.03, zero 128), against the reference with the residual they hold."""
    img, q, wq, bias, res = case(seed, b, h, w, c, m, kernel, stride, padding, epilogue)
    conv, relu = (kernel, stride, padding, sx, zx), "relu" in epilogue
    sy, zy = 0.05, 0 if relu else 128
    for res_u8 in (None, (0.03, 128)) if res is not None else (None,):
        got = run(backend, img, q, *conv, bias, res, relu, path=path, res_u8=res_u8)
        want = reference(img, wq, q.scales, *conv, bias, res, relu, res_u8=res_u8)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(run(backend, img, q, *conv, bias, res, relu, path=path, u8=(sy, zy),
                                          res_u8=res_u8), as_u8(want, sy, zy))


def resnet101_convs(size=224):
    """(C, H, W, M, kernel, stride, padding) of every distinct convolution of ResNet-101 at size x size."""
    cfg, seen = arch.BY_NAME["resnet101"], {}

    def add(conv, side):
        seen.setdefault((conv.in_ch, side, side, conv.out_ch, conv.kernel, conv.stride, conv.padding), None)
        return conv.out_size(side)

    side = (add(arch.STEM, size) - 1) // 2 + 1  # the stem's 3x3/2 max pool
    for block in arch.block_names(cfg):
        main, down = arch.block_convs(cfg, block)
        if down:
            add(down, side)
        for conv in main:
            side = add(conv, side)
    return list(seen)


def test_resnet101_convs_are_its_products():
    shapes = {(m, k * k * c, ((h + 2 * p - k) // s + 1) ** 2) for c, h, w, m, k, s, p in resnet101_convs()}
    assert shapes == set(products("resnet101"))


EPILOGUES = [("bias", "res", "relu"), (), ("bias", "relu"), ("res",)]


@pytest.mark.parametrize("path", PATHS)
def test_every_resnet101_conv(backend, path):
    """Every distinct conv of ResNet-101 at 224x224, batch 1, its real kernel, stride and padding; signed
    inputs with zx = 128 and inputs after a ReLU with zx = 0, in turn."""
    for i, (c, h, w, m, kernel, stride, padding) in enumerate(resnet101_convs()):
        zx = 128 if i % 2 == 0 else 0
        check(backend, path, i, 1, h, w, c, m, kernel, stride, padding, 0.03, zx, EPILOGUES[i % len(EPILOGUES)])


# (B, H, W, C, M, kernel, stride, padding): M off 16 and 32, K off 4 (1x1 over 3 channels, 3x3 over 5), N = 1,
# 13 and 49, one-pixel images, padding wider than the image, stride 2 over odd sides, a K across cache blocks;
# channels too many for one block of a u8 result's partial sums (24000: each thread's 375 tiles of 32, over
# GEMM_C_BLOCK / (12 * 32) = 341). Then windows read from a padded copy of the image (csrc/gemm.c's direct
# windows: channels a multiple of 4, an even output width): a batch of 3, stride 2 without padding, a 5x5 with
# padding 2, window rows of 1280 values across cache blocks (K 3840); and one too big for the copy (packed).
# Last, direct windows whose tiles of 14 each lie along one output row, so that with zero point 0 the kernel
# rows in the padding are skipped, and the first and last pixels' kernel columns there (csrc/gemm.c,
# clip_window): 3x3 over 14 x 14 (K across cache blocks), a 5x5 with two rows and columns in the padding, and
# stride 2 whose last output row also reaches into it. Then tiles of 7 (a path's nr_row, where the output is 7
# or 21 wide), which do the same along each row: 3x3 over 7 x 7 (a batch of 2), over 21 x 21 (three tiles a
# row, the middle one clear of the padding), a 5x5 over 7 x 7, and stride 2 onto 7 x 7 from 13 x 14.
AWKWARD = [
    (1, 1, 1, 3, 1, 1, 1, 0), (1, 1, 13, 5, 17, 1, 1, 0), (1, 7, 7, 7, 33, 1, 1, 0), (1, 1, 1, 5, 40, 3, 1, 2),
    (2, 7, 9, 5, 20, 3, 2, 1), (1, 9, 7, 130, 31, 3, 2, 1), (3, 5, 3, 2, 48, 7, 2, 3), (1, 13, 1, 200, 16, 1, 1, 0),
    (2, 2, 3, 3, 1, 3, 1, 3), (1, 2, 1, 600, 24000, 1, 1, 0),
    (3, 6, 10, 8, 40, 3, 1, 1), (2, 9, 9, 12, 33, 3, 2, 0), (1, 6, 6, 4, 16, 5, 1, 2), (1, 3, 4, 256, 20, 5, 1, 2),
    (3, 40, 40, 200, 16, 3, 1, 1),
    (2, 14, 14, 256, 40, 3, 1, 1), (1, 7, 28, 4, 33, 5, 1, 2), (1, 15, 27, 12, 32, 3, 2, 1),
    (2, 7, 7, 8, 40, 3, 1, 1), (1, 21, 21, 4, 33, 3, 1, 1), (1, 7, 7, 12, 32, 5, 1, 2), (1, 13, 14, 12, 32, 3, 2, 1),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("b,h,w,c,m,kernel,stride,padding", AWKWARD)
def test_awkward_shapes(backend, path, b, h, w, c, m, kernel, stride, padding):
    for j, (sx, zx) in enumerate([(0.02, 128), (0.01, 0), (0.5, 255), (1e-3, 3)]):  # the last two saturate
        check(backend, path, j, b, h, w, c, m, kernel, stride, padding, sx, zx, EPILOGUES[j])


@pytest.mark.parametrize("path", PATHS)
def test_extreme_pixels(backend, path):
    """NaN pixels become the lowest byte, infinities and huge values saturate, -0.0 is zero: on every path."""
    img, q, wq, bias, _ = case(5, 1, 4, 5, 6, 24, 3, 1, 1)
    img.reshape(-1)[:6] = [np.nan, np.inf, -np.inf, 3e38, -0.0, 1e-45]
    want = reference(img, wq, q.scales, 3, 1, 1, 0.05, 100, bias)
    np.testing.assert_array_equal(run(backend, img, q, 3, 1, 1, 0.05, 100, bias, path=path).view(np.uint32),
                                  want.view(np.uint32))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 64, 65, 200])  # whole vectors, 64-value packs and the rest
def test_quantize_u8_quantizes_as_the_product_packs(backend, path, n):
    """Graph.quantize_u8 gives the bytes the op makes of its pixels (the reference's, with NaN, infinities,
    huge values, -0.0 and ties among them), for any count of values and split between threads: the bytes
    from which the products above give, bit for bit, what they give on the f32 image."""
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n, dtype=F32) * 8).astype(F32)
    values[:min(n, 8)] = [np.nan, np.inf, -np.inf, 3e38, -0.0, 0.125, -2.375, 1e-45][:min(n, 8)]
    sx, zx = 0.25, 100  # 0.125 / 0.25 and -2.375 / 0.25 are ties: rounded to even
    with Graph(backend) as g:
        x = g.input("x", (n,))
        y = g.quantize_u8(x, sx, zx, path=path)
        g.finalize(y)
        g.set(x, values)
        g.compute()
        assert y.type == Type.I8 and y.ne == (n, 1, 1, 1)
        np.testing.assert_array_equal(g.get(y).view(np.uint8).reshape(n), as_u8(values, sx, zx))
    img = np.random.default_rng(4).standard_normal((2, 9, 7, 3), dtype=F32)  # a batch of stem-like images
    with Graph(backend) as g:
        x = g.input("x", (3, 7, 9, 2))
        y = g.quantize_u8(x, 0.03, 117, path=path)
        g.finalize(y)
        g.set(x, img)
        g.compute()
        np.testing.assert_array_equal(g.get(y).view(np.uint8).reshape(img.shape), as_u8(img, 0.03, 117))


def test_quantize_u8_refuses_bad_arguments(backend):
    with Graph(backend) as g:
        x = g.input("x", (4, 3))
        for args, match in (((g.input("h", (4, 3), "f16"), 0.1, 0), "f32"), ((g.input("i", (4, 3), Type.I8), 0.1, 0),
                            "f32"), ((g.permute(x, (1, 0, 2, 3)), 0.1, 0), "contiguous"), ((x, 0.0, 0), "scale"),
                            ((x, float("nan"), 0), "scale"), ((x, 1e-40, 0), "scale"), ((x, "1", 0), "scale"),
                            ((x, 0.1, 256), "x_zero"), ((x, 0.1, -1), "x_zero"), ((x, 0.1, 1.0), "x_zero")):
            with pytest.raises(InputError, match=match):
                g.quantize_u8(*args)
        for path in ("avx512", "int8-neon", 3):
            with pytest.raises(InputError, match="path"):
                g.quantize_u8(x, 0.1, 0, path=path)


@pytest.mark.parametrize("c,w", [(21, 11), (24, 12)])  # windows packed, and read from a padded copy (even width)
def test_paths_batches_and_threads_agree_bit_for_bit(c, w):
    """Every path, each image of a batch alone or together, 1, 2 and 3 threads: the same bits."""
    img, q, _, bias, res = case(9, 5, 9, w, c, 70, 3, 2, 1)
    per_image = res.shape[0] // 5
    results = []
    for threads in (1, 2, 3):
        with Backend(threads=threads) as b:
            for path in PATHS:
                results.append(run(b, img, q, 3, 2, 1, 0.04, 128, bias, res, True, path))
                for i in (0, 3):
                    rows = slice(i * per_image, (i + 1) * per_image)
                    np.testing.assert_array_equal(run(b, img[i:i + 1], q, 3, 2, 1, 0.04, 128, bias, res[rows], True,
                                                      path), results[-1][rows])
    for r in results[1:]:
        np.testing.assert_array_equal(r.view(np.uint32), results[0].view(np.uint32))


def test_paths():
    assert PATHS[-1] == "int8-scalar"
    assert set(PATHS) <= {"int8-avx512vnni", "int8-avxvnni", "int8-avx2", "int8-scalar"}


def test_quantize_and_pack():
    """Per-channel symmetric scales, quants rounded half to even, the vpdpbusd layout, column sums."""
    w = np.array([[1.0, -2.0, 0.5, 127.0, 0.25], [0.0, 0.0, 0.0, 0.0, 0.0], [-3.0, 1.5, 0.0, 0.0, 2.9]], F32)
    q, scales = int8.quantize(w)
    np.testing.assert_array_equal(scales, np.abs(w).max(axis=1) / F32(127))
    np.testing.assert_array_equal(q[0], [1, -2, 0, 127, 0])  # 0.5 and 0.25 round to even: 0
    assert not q[1].any()
    np.testing.assert_array_equal(q[2], np.rint(w[2] / scales[2]))
    mat = int8.quantize_matrix(w)
    assert mat.packed.shape == int8.packed_shape(3, 5) == (2, 2, 16, 4) and mat.packed.dtype == np.int8
    assert mat.packed[0, 1, 2, 0] == q[2, 4] and mat.packed[0, 0, 0, 3] == q[0, 3]
    assert not mat.packed[0, 1, :, 1:].any() and not mat.packed[0, :, 3:].any() and not mat.packed[1].any()
    np.testing.assert_array_equal(mat.colsums, q.sum(axis=1))
    assert int8.words(mat.packed).shape == (2, 2, 16, 1) and int8.words(mat.colsums).dtype == F32
    for bad in (np.zeros(4, F32), np.zeros((0, 3), F32), np.array([[np.nan]], F32)):
        with pytest.raises(InputError):
            int8.quantize(bad)
    with pytest.raises(InputError):
        int8.pack(np.zeros((2, 3), np.int16))


def test_gemm_int8_refuses_bad_arguments(backend):
    m, c, n = 20, 9, 4
    groups = int8.packed_shape(m, c)[1]
    with Weights(backend, {"w": ("f32", (16, groups, 2)), "s": ("f32", (m,)), "c": ("f32", (m,)),
                           "w3": ("f32", (16, int8.packed_shape(m, 9 * c)[1], 2)), "s16": ("f16", (m,))}) as wt, \
            Graph(backend) as g:
        x, r, img = g.input("x", (c, n)), g.input("r", (m, n)), g.input("img", (c, 3, 2))
        r8 = g.input("r8", (m, n), Type.I8)
        base = dict(w=wt["w"], x=x, m=m, scales=wt["s"], colsums=wt["c"], x_scale=0.1, x_zero=128, residual=r)
        for kwargs in (dict(w=wt["w3"]), dict(x=g.input("x2", (c + 4, n))), dict(m=33), dict(m=0), dict(path="avx512"),
                       dict(path="int8-neon"), dict(scales=wt["s16"]), dict(colsums=r), dict(x_scale=0.0),
                       dict(x_scale=-1.0), dict(x_scale=float("nan")), dict(x_scale=1e39), dict(x_scale=1e-40),
                       dict(x_scale="1"), dict(x_zero=256), dict(x_zero=-1), dict(x_zero=1.0), dict(bias=r),
                       dict(residual=g.input("r2", (m, n + 1))), dict(x=g.input("x16", (c, n), "f16")),
                       dict(y_scale=0.0), dict(y_scale=float("inf")), dict(y_zero=256), dict(y_zero=-1),
                       dict(residual_scale=0.1),  # an f32 residual takes no scale
                       dict(residual=r8),  # ... and a u8 one needs it
                       dict(residual=r8, residual_scale=0.0), dict(residual=r8, residual_scale=0.1, residual_zero=256),
                       dict(residual=g.input("r8b", (m, n + 1), Type.I8), residual_scale=0.1),
                       dict(residual=g.input("r16", (m, n), "f16")),
                       dict(kernel=3),  # K = 9 c: not w's
                       dict(w=wt["w3"], x=img, kernel=3, residual=None),  # a 3x3 window does not fit 3x2
                       dict(w=wt["w3"], x=img, kernel=3, padding=1)):  # residual not [m, 3, 2]
            args = base | kwargs
            with pytest.raises(InputError):
                g.gemm_int8(args.pop("w"), args.pop("x"), args.pop("m"), **args)
        g.gemm_int8(wt["w"], x, m, scales=wt["s"], colsums=wt["c"], x_scale=0.1, x_zero=128, residual=r)
        g.gemm_int8(wt["w"], x, m, scales=wt["s"], colsums=wt["c"], x_scale=0.1, x_zero=128, residual=r8,
                    residual_scale=0.1, residual_zero=255)
        u8 = g.gemm_int8(wt["w"], g.input("x8", (c, n), Type.I8), m, scales=wt["s"], colsums=wt["c"], x_scale=0.1,
                         x_zero=128, y_scale=0.2, y_zero=3)
        assert u8.type == Type.I8 and u8.ne == (m, n, 1, 1)
        g.gemm_int8(wt["w3"], img, m, scales=wt["s"], colsums=wt["c"], x_scale=0.1, x_zero=0, kernel=3, padding=1)


def test_gemm_int8_refuses_a_k_whose_sums_could_overflow(backend):
    from pyggml_resnet._ggml import lib
    c = lib.GEMM_INT8_K_MAX + 1
    m = 16
    with Weights(backend, {"w": ("f32", (16, int8.packed_shape(m, c)[1], 2)), "s": ("f32", (m,)),
                           "c": ("f32", (m,))}) as wt, Graph(backend) as g:
        with pytest.raises(InputError, match="overflow"):
            g.gemm_int8(wt["w"], g.input("x", (c, 1)), m, scales=wt["s"], colsums=wt["c"], x_scale=1.0, x_zero=0)


def test_results_do_not_depend_on_the_cache_blocks(backend):
    """Blocks sized for L1ds of 32 and 48 KiB (512 and 1024 bytes of k per block) and L2s from 128 KiB to
    8 MiB (pixel blocks of 192 to 960 rows, output blocks of 16 Ki to 128 Ki floats) order the work
    differently and give the same bits: f32 and bf16 products, and int8 with an f32 and a u8 result, each over
    K and N larger than one block."""
    from test_gemm import PATHS as FLOAT_PATHS, operands, run_gemm
    w, x, bias, res = operands(200, 1500, 1100, 3, ("bias", "res"))
    img, q, _, ibias, ires = case(4, 2, 23, 25, 170, 200, 3, 1, 1)
    results = []
    try:
        for l1, l2 in ((None, None), (32 << 10, 128 << 10), (48 << 10, 512 << 10), (32 << 10, 8 << 20),
                       (48 << 10, 8 << 20)):
            set_gemm_cache_bytes(1, l1)
            set_gemm_cache_bytes(2, l2)
            if l1:
                assert gemm_block_k_bytes() == (1024 if l1 >= 48 << 10 else 512)
            results.append([run_gemm(backend, w, x, bias, res, True, path) for path in FLOAT_PATHS]
                           + [run(backend, img, q, 3, 1, 1, 0.03, 128, ibias, ires, True, path, u8)
                              for path in PATHS for u8 in (None, (0.05, 0))])
    finally:
        set_gemm_cache_bytes(1, None)
        set_gemm_cache_bytes(2, None)
    for r in results[1:]:
        for got, want in zip(r, results[0]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("level, kind", [(1, ("Data",)), (2, ("Data", "Unified"))])
def test_blocks_are_sized_for_the_cpus_caches(level, kind):
    """The L1d and L2 sizes the blocks are made for are the ones the kernel lists for CPU 0 (read there from
    cpuid as well), unless set; set_gemm_cache_bytes(level, None) goes back to them."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    listed = [d for d in caches.glob("index*") if (d / "level").read_text().strip() == str(level)
              and (d / "type").read_text().strip() in kind] if caches.is_dir() else []
    if not listed:
        pytest.skip(f"the kernel lists no level-{level} {' or '.join(kind).lower()} cache here")
    size = (listed[0] / "size").read_text().strip()
    listed = int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
    assert gemm_cache_bytes(level) == listed
    try:
        set_gemm_cache_bytes(level, 3 << 20)
        assert gemm_cache_bytes(level) == 3 << 20
        assert gemm_cache_bytes(3 - level) != 3 << 20  # the other level keeps its own
    finally:
        set_gemm_cache_bytes(level, None)
    assert gemm_cache_bytes(level) == listed
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError):
            set_gemm_cache_bytes(level, bad)
    for bad in (0, 3, 1.0):
        with pytest.raises(InputError):
            gemm_cache_bytes(bad)
        with pytest.raises(InputError):
            set_gemm_cache_bytes(bad, 1 << 20)
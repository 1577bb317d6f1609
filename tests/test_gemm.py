"""The packed GEMM (csrc/gemm.h) on every path this CPU runs, against float64 NumPy products (for the bf16
path: of the same bf16-rounded weights and inputs, so only its f32 summation is measured).

Bound: each output is a sum of K products taken in blocks of KS (one rounding per fused multiply-add
inside a block, one per block added to the running sum), then + bias, + residual: at most
L = min(K, KS) + ceil(K / KS) + 2 roundings touch each term, so |error| <= gamma_L * (|W| |X|^T + |bias|
+ |residual|), gamma_L = L u / (1 - L u), u = 2^-24: the textbook bound for that order. A wrong index,
stride, tile edge or epilogue gives errors of the data's own size. We also hold the pooled relative L2
error of products with 1000 outputs or more to 3e-7: on these random operands we measured 1.1-2.4e-7,
against 1.1-3.8e-7 for NumPy's float32 product (OpenBLAS) on the same data. The bf16 path (vdpbf16ps: per
pair of k, two exact products added in at most two roundings; KS = 256) meets the same bound.
"""

import numpy as np
import pytest

from pyggml_resnet.bench.workload import flops_per_image, products
from pyggml_resnet.errors import InputError
from pyggml_resnet.cpu import cpuinfo
from pyggml_resnet.ggml import (MAX_WINDOW, Backend, Graph, Type, Weights, gemm_folds_broadcasts,
                                set_gemm_cache_bytes, set_gemm_folds_broadcasts)
from pyggml_resnet.packing import pack_matrix, packed_shape
from pyggml_resnet.plan import gemm_paths, gemm_type

KS = {"avx512bf16": 256}  # the summation block per path: GEMM_KS_BF16, else GEMM_KS (64) in csrc/gemm.h
U = 2.0 ** -24
F32_PATHS = gemm_paths()
PATHS = F32_PATHS + gemm_paths("bf16")
pytestmark = pytest.mark.skipif(not PATHS, reason="this CPU has no packed GEMM path (ggml's mul_mat runs)")
# Each path, and the AVX-512 f32 path's tiles in both forms (csrc/gemm_avx512.c): each pixel's broadcast folded
# into the FMAs (Zen 4's) and in a register (other CPUs'), whichever this CPU runs by default.
PATH_FORMS = [(p, folded) for p in PATHS for folded in ((True, False) if p == "avx512" else (None,))]


@pytest.fixture(params=PATH_FORMS, ids=[p + {True: "-folded", False: "-register", None: ""}[f] for p, f in PATH_FORMS])
def path(request):
    """A packed GEMM path, run in the tile form its parameter names."""
    name, folded = request.param
    set_gemm_folds_broadcasts(folded)
    try:
        yield name
    finally:
        set_gemm_folds_broadcasts(None)


@pytest.fixture(scope="module")
def backend():
    with Backend(threads=2) as b:
        yield b


def run_gemm(backend, w, x, bias=None, res=None, relu=False, path=None):
    """x [N, K] times w [M, K]^T through Graph.gemm on `path` (default: the first this CPU runs) -> [N, M]. A bf16
    path gets w rounded to bf16 (K zero-padded to even); the op rounds x itself."""
    m, k = w.shape
    path = path or PATHS[0]
    wtype = gemm_type(path)
    specs = {"w": (wtype, tuple(reversed(packed_shape(m, k, wtype))))}
    if bias is not None:
        specs["b"] = (Type.F32, (m,))
    with Weights(backend, specs) as wt, Graph(backend) as g:
        wt.set("w", wtype.encode(pack_matrix(w, wtype)))
        if bias is not None:
            wt.set("b", bias)
        xi = g.input("x", (k, len(x)))
        ri = g.input("r", (m, len(x))) if res is not None else None
        y = g.gemm(wt["w"], xi, m, bias=wt["b"] if bias is not None else None, residual=ri, relu=relu, path=path)
        g.finalize(y)
        g.set(xi, x)
        if ri is not None:
            g.set(ri, res)
        g.compute()
        return g.get(y).reshape(len(x), m)


def operands(m, k, n, seed, epilogue):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32) if "bias" in epilogue else None
    res = rng.standard_normal((n, m)).astype(np.float32) if "res" in epilogue else None
    return w, x, bias, res


def rounded(a, path):
    """a as the path's type holds it (bf16: rounded to nearest even), back in float32."""
    t = gemm_type(path).dtype
    return t.decode(t.encode(a)).reshape(a.shape)


def check(got, w, x, bias, res, relu, path):
    w64, x64 = rounded(w, path).astype(np.float64), rounded(x, path).astype(np.float64)
    want, scale = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    for v in (bias, res):
        if v is not None:
            want, scale = want + v, scale + np.abs(v)
    if relu:
        want = np.maximum(want, 0)
    k, ks = w.shape[1], KS.get(path, 64)
    steps = min(k, ks) + -(-k // ks) + 2
    gamma = steps * U / (1 - steps * U)
    assert got.shape == want.shape
    excess = np.abs(got - want) - gamma * scale
    assert excess.max() <= 0, f"error above the bound at {np.unravel_index(excess.argmax(), excess.shape)}"
    if want.size >= 1000:  # a pooled figure means little over a handful of outputs
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 3e-7


EPILOGUES = [(), ("bias",), ("bias", "relu"), ("res",), ("bias", "res", "relu"), ("relu",)]


def test_resnet101_has_104_products():
    shapes = products("resnet101")
    assert len(shapes) == 104
    assert shapes[0] == (64, 147, 112 * 112) and shapes[-1] == (2048, 512, 49)
    assert sum(2 * m * k * n for m, k, n in shapes) + 2 * 2048 * 1000 == flops_per_image("resnet101")


def test_every_resnet101_product(backend, path):
    """All 104 products of ResNet-101 at 224x224 (N = one image) and its fc layer, with the epilogues."""
    seen = {}
    for i, (m, k, n) in enumerate(products("resnet101") + [(1000, 2048, 1)]):
        if (m, k, n) in seen:  # the same shape again: the same code and tiling, with the next epilogue
            seen[m, k, n] += 1
        epilogue = EPILOGUES[seen.setdefault((m, k, n), i) % len(EPILOGUES)]
        w, x, bias, res = operands(m, k, n, i, epilogue)
        got = run_gemm(backend, w, x, bias, res, "relu" in epilogue, path)
        check(got, w, x, bias, res, "relu" in epilogue, path)


AWKWARD = [
    # (M, K, N): tile edges in M (not a multiple of 16 or 32) and N (not a multiple of 6 or 12), K below,
    # at and across the 32 and 128 blocks, N = 1, N = 13 and 25 (the 13-pixel tile), N across the 480-pixel block
    (1, 1, 1), (17, 3, 1), (31, 129, 13), (33, 127, 7), (48, 300, 25), (100, 1, 50), (64, 128, 12),
    (5, 700, 481), (1000, 2048, 1), (16, 256, 6), (40, 257, 961), (2, 4608, 3),
]


@pytest.mark.parametrize("m,k,n", AWKWARD)
def test_awkward_shapes(backend, path, m, k, n):
    for j, epilogue in enumerate(EPILOGUES):
        w, x, bias, res = operands(m, k, n, 100 * m + j, epilogue)
        check(run_gemm(backend, w, x, bias, res, "relu" in epilogue, path), w, x, bias, res, "relu" in epilogue, path)


def im2col(img, kernel, stride, padding):
    """NumPy [B, H, W, C] -> the windows [B*OH*OW, kernel*kernel*C], ordered (ky, kx, c), zeros outside."""
    b, h, w, c = img.shape
    p = np.pad(img, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    cols = [p[:, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride] for ky in range(kernel) for kx in range(kernel)]
    return np.stack(cols, axis=3).reshape(b * oh * ow, kernel * kernel * c), (oh, ow)


# (channels, kernel, stride, padding, height, width, batch): the stem's 7x7/2 over 3 channels, windows that
# cross 32- and 128-k blocks mid-tap (C = 40, 200), strided 1x1s, windows hanging over every edge
CONVS = [(3, 7, 2, 3, 23, 17, 2), (40, 3, 1, 1, 9, 7, 1), (200, 3, 2, 1, 8, 9, 2), (64, 1, 2, 0, 7, 7, 3),
         (5, 3, 1, 0, 3, 4, 1), (17, 5, 3, 4, 6, 5, 2), (1, 3, 1, 1, 1, 1, 1)]


@pytest.mark.parametrize("c,kernel,stride,padding,h,w,b", CONVS)
def test_convolutions_read_their_windows(backend, path, c, kernel, stride, padding, h, w, b):
    """The op reads each window straight from the image: the same products as over NumPy's patches."""
    rng = np.random.default_rng(c * kernel + h)
    m, k = 36, kernel * kernel * c
    wm = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    img = rng.standard_normal((b, h, w, c)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    patches, (oh, ow) = im2col(img, kernel, stride, padding)
    wtype = gemm_type(path)
    specs = {"w": (wtype, tuple(reversed(packed_shape(m, k, wtype)))), "b": (Type.F32, (m,))}
    with Weights(backend, specs) as wt, Graph(backend) as g:
        wt.set("w", wtype.encode(pack_matrix(wm, wtype)))
        wt.set("b", bias)
        xi = g.input("x", (c, w, h, b))
        args = dict(kernel=kernel, stride=stride, padding=padding, bias=wt["b"], relu=True, path=path)
        y = g.gemm(wt["w"], xi, m, **args)
        # A bf16 path also takes the image as bf16 (rounded once by a kernel-1 gather): the same bits.
        y16 = g.gemm(wt["w"], g.gather_patches(xi, 1, 1, 0, ttype=wtype), m, **args) if wtype != Type.F32 else y
        assert y.ne == y16.ne == (m, ow, oh, b)
        g.finalize(y, y16)
        g.set(xi, img)
        g.compute()
        got = g.get(y).reshape(-1, m)
        np.testing.assert_array_equal(g.get(y16).reshape(-1, m), got)
    check(got, wm, patches, bias, None, True, path)


@pytest.mark.parametrize("paths", [F32_PATHS, gemm_paths("bf16")], ids=["f32", "bf16"])
def test_paths_batches_and_threads_agree_bit_for_bit(paths):
    """The summation order depends on K alone: every path of one type (and both forms of the AVX-512 tiles),
    batch size and thread count gives the same bits."""
    if not paths:
        pytest.skip("no packed GEMM path of this type on this CPU")
    m, k, n = 72, 333, 29
    w, x, bias, res = operands(m, k, n, 7, ("bias", "res"))
    results = []
    try:
        for threads in (1, 2, 3):
            with Backend(threads=threads) as b:
                for path, folded in PATH_FORMS:
                    if path not in paths:
                        continue
                    set_gemm_folds_broadcasts(folded)
                    results.append(run_gemm(b, w, x, bias, res, True, path))
                    for rows in (1, 5, 13):  # a prefix of the pixels is its own, smaller product
                        np.testing.assert_array_equal(run_gemm(b, w, x[:rows], bias, res[:rows], True, path),
                                                      results[-1][:rows])
    finally:
        set_gemm_folds_broadcasts(None)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def run_winograd(backend, img, wt, bias, res, path):
    """The 3x3 stride-1 padding-1 convolution of img (N, H, W, C) by wt [M, C, 3, 3] through Graph.gemm_winograd,
    + bias, + res (N, H, W, M), ReLU -> (N, H, W, M)."""
    n, h, w, c = img.shape
    m = len(wt)
    k = 9 * c
    with Weights(backend, {"w": ("f32", tuple(reversed(packed_shape(m, k)))), "b": ("f32", (m,))}) as wts, \
            Graph(backend) as g:
        wts.set("w", pack_matrix(wt.transpose(0, 2, 3, 1).reshape(m, k)))  # k = (ky, kx, c), as gemm orders it
        wts.set("b", bias)
        xi, ri = g.input("x", (c, w, h, n)), g.input("r", (m, w, h, n))
        y = g.gemm_winograd(wts["w"], g.winograd_input(xi), m, like=xi, bias=wts["b"], residual=ri, relu=True,
                            path=path)
        g.finalize(y)
        g.set(xi, img)
        g.set(ri, res)
        g.compute()
        return g.get(y)


def test_winograd_products_agree_bit_for_bit():
    """Winograd's products keep each thread's sums of a block of tiles and channels and transform them as the
    block is done (csrc/gemm.c): every f32 path and tile form, thread count, batch size and cache block (L1ds
    of 32 and 48 KiB: 512 and 1024 bytes of k, so 160 channels are two K blocks or one; L2s of 128 KiB to 8 MiB:
    pixel blocks of 16 to 40 tiles of 12, of 432 Winograd tiles here) gives the same bits, as close to float64
    as Winograd F(2x2,3x3) in f32 is; odd sizes cut the edge tiles and 40 channels a tile of 32 short."""
    if not F32_PATHS:
        pytest.skip("no f32 packed GEMM path on this CPU")
    rng = np.random.default_rng(9)
    n, h, w, c, m = 3, 23, 25, 160, 40
    img = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = (rng.standard_normal((m, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    bias, res = rng.standard_normal(m).astype(np.float32), rng.standard_normal((n, h, w, m)).astype(np.float32)
    results = []
    try:
        for threads, (l1, l2) in zip((1, 2, 3, 2, 2), ((None, None), (32 << 10, 128 << 10), (48 << 10, 128 << 10),
                                                        (32 << 10, 8 << 20), (48 << 10, 8 << 20))):
            set_gemm_cache_bytes(1, l1)
            set_gemm_cache_bytes(2, l2)
            with Backend(threads=threads) as b:
                for path, folded in PATH_FORMS:
                    if path in F32_PATHS:
                        set_gemm_folds_broadcasts(folded)
                        results.append(run_winograd(b, img, wt, bias, res, path))
                        np.testing.assert_array_equal(run_winograd(b, img[1:2], wt, bias, res[1:2], path),
                                                      results[-1][1:2])
    finally:
        set_gemm_cache_bytes(1, None)
        set_gemm_cache_bytes(2, None)
        set_gemm_folds_broadcasts(None)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    x64 = np.pad(img.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = sum(x64[:, i:i + h, j:j + w] @ wt[:, :, i, j].astype(np.float64).T for i in range(3) for j in range(3))
    want = np.maximum(want + bias + res, 0)
    assert np.linalg.norm(results[0] - want) / np.linalg.norm(want) < 1e-6


def test_threads_take_chunks_afresh_in_each_computation():
    """Threads take a product's chunks as they come free (csrc/gemm.c, gemm_share: one done with its own chunks
    takes those another has not started) and clear their record of taken chunks after each computation. One
    graph computed on new inputs each time, on a thread count that changes between computations and is at
    times more than the CPUs (so threads wait and others take their chunks), gives the bits one thread gives:
    split by channels and by pixels, and a 3x3 convolution (its pixels packed as they are read)."""
    rng = np.random.default_rng(5)
    counts = (2, 7, 1, 3, 7, 2, 5)
    # (m, kernel, x's ggml shape: [K, N] or an image [C, W, H])
    for m, kernel, shape in ((320, 1, (200, 20)), (40, 1, (200, 300)), (48, 3, (10, 15, 20))):
        k = kernel * kernel * shape[0]
        w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
        xs = [rng.standard_normal(tuple(reversed(shape))).astype(np.float32) for _ in counts]
        results = {}
        for mode in ("one thread", "changing"):
            with Backend(threads=1) as b, Weights(b, {"w": ("f32", tuple(reversed(packed_shape(m, k))))}) as wt, \
                    Graph(b) as g:
                wt.set("w", pack_matrix(w))
                xi = g.input("x", shape)
                y = g.gemm(wt["w"], xi, m, kernel=kernel, padding=kernel // 2, path=F32_PATHS[0])
                g.finalize(y)
                results[mode] = []
                for count, x in zip(counts, xs):
                    b.threads = 1 if mode == "one thread" else count
                    g.set(xi, x)
                    g.compute()
                    results[mode].append(g.get(y).copy())
        for got, want in zip(results["changing"], results["one thread"]):
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(results["one thread"][0], results["one thread"][1])  # new inputs each time


def test_gemm_refuses_bad_arguments(backend):
    m, k, n = 20, 9, 4
    with Weights(backend, {"w": ("f32", (16, k, 2)), "b": ("f32", (m,)), "plain": ("f32", (k, m)),
                           "w3": ("f32", (16, 9 * k, 2))}) as wt, Graph(backend) as g:
        x, r = g.input("x", (k, n)), g.input("r", (m, n))
        img = g.input("img", (k, 3, 2))
        for kwargs in (dict(w=wt["plain"]), dict(x=g.input("x2", (k + 1, n))), dict(m=33), dict(m=0),
                       dict(bias=r), dict(residual=g.input("r2", (m, n + 1))), dict(path="sse"), dict(path=["avx2"]),
                       dict(x=g.input("x16", (k, n), "f16")), dict(kernel=3),  # K = 9 k: not w's
                       dict(w=wt["w3"], x=img, kernel=3, residual=None),  # a 3x3 window does not fit 3x2
                       dict(w=wt["w3"], x=img, kernel=3, padding=MAX_WINDOW + 1, residual=None),  # above the op's limit
                       dict(w=wt["w3"], x=img, kernel=3, padding=1)):  # residual not [m, 3, 2]
            args = dict(w=wt["w"], x=x, m=m, bias=wt["b"], residual=r, path=F32_PATHS[0]) | kwargs
            with pytest.raises(InputError):
                g.gemm(args.pop("w"), args.pop("x"), args.pop("m"), **args)
        g.gemm(wt["w"], x, m, bias=wt["b"], residual=r, path=F32_PATHS[0])  # the same, well formed
        g.gemm(wt["w3"], img, m, kernel=3, padding=1, bias=wt["b"], path=F32_PATHS[0])  # a 3x3 convolution


@pytest.mark.skipif(not gemm_paths("bf16"), reason="no bf16 packed GEMM path on this CPU")
def test_gemm_bf16_refuses_bad_arguments(backend):
    m, k, n = 20, 9, 4
    specs = {"w": ("bf16", (16, k + 1, 2)), "unpadded": ("bf16", (16, k, 2)), "w32": ("f32", (16, k, 2))}
    with Weights(backend, specs) as wt, Graph(backend) as g:
        x = g.input("x", (k, n))
        for w, xx, path in ((wt["w32"], g.input("x16", (k, n), "bf16"), F32_PATHS[0] if F32_PATHS else "avx2"),
                            # bf16 pixels go with bf16 weights only
                            (wt["unpadded"], x, "avx512bf16"),  # K = 9 is padded to 10 in packed bf16 weights
                            (wt["w32"], x, "avx512bf16"),  # f32 weights on the bf16 path
                            (wt["w"], x, F32_PATHS[0] if F32_PATHS else "avx2")):  # bf16 on an f32 path
            with pytest.raises(InputError):
                g.gemm(w, xx, m, path=path)
        g.gemm(wt["w"], x, m, path="avx512bf16")  # well formed


def test_the_avx512_tiles_fold_broadcasts_on_zen4_only():
    """The CPU's choice of tile form: folded on AMD's family 19h (Zen 4: /proc/cpuinfo's family 25), in a
    register elsewhere; set_gemm_folds_broadcasts overrides it until set to None, and takes only those."""
    info = cpuinfo()
    if "cpu family" not in info:
        pytest.skip("/proc/cpuinfo gives no CPU family here")
    zen4 = info.get("vendor_id") == "AuthenticAMD" and int(info["cpu family"]) == 25
    assert gemm_folds_broadcasts() is zen4
    try:
        for folded in (not zen4, zen4):
            set_gemm_folds_broadcasts(folded)
            assert gemm_folds_broadcasts() is folded
        set_gemm_folds_broadcasts(not zen4)
    finally:
        set_gemm_folds_broadcasts(None)
    assert gemm_folds_broadcasts() is zen4
    for bad in (0, 1, "yes", 2.0):
        with pytest.raises(InputError):
            set_gemm_folds_broadcasts(bad)

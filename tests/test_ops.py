"""Small ggml graphs built through the Python layer, compared with torch.nn.functional in f32.

Tolerances: each output element is a sum of at most a few thousand f32 products. ggml and PyTorch add
them in different orders (different blockings, FMA or not), so results differ by a few units in the last
place of the largest partial sums: relative to the output's scale that is ~1e-7 * sqrt(K). We assert a max
abs error of 2e-6 * max|reference| (K <= 1152 here), well below anything a real bug produces (>1e-3), and
exact equality where no arithmetic happens (pooling max, relu, layout moves).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyggml_resnet import layers
from pyggml_resnet.arch import Conv
from pyggml_resnet.errors import Error, InputError
from pyggml_resnet.ggml import MAX_WINDOW, Backend, Graph, Type, Weights
from pyggml_resnet.plan import Layout, gemm_paths, matrix_plan, winograd_applies

RTOL = 2e-6


@pytest.fixture(scope="module")
def backend():
    with Backend(threads=2) as b:
        yield b


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_close(got, want, rtol=RTOL):
    want = np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def to_channels_fastest(g, x):
    """A NumPy NCHW array's ggml [W, H, C, N] -> [C, W, H, N], the layout the layers work on."""
    return g.cont(g.permute(x, (1, 2, 0, 3)))


def to_nchw(g, x):
    """[C, W, H, N] -> ggml [W, H, C, N], read back as NumPy NCHW."""
    return g.cont(g.permute(x, (2, 0, 1, 3)))


def run(backend, weights: dict, build, x_nchw, spatial=True, residual=None):
    """Runs `build(g, x_channel_fastest, w)` on an NCHW input; returns its output as NCHW, or as [N, C]
    when it is not `spatial`. With an NCHW `residual`, `build` gets it channel-fastest as a fourth argument."""
    weights = weights or {"unused": np.zeros(1, np.float32)}  # Weights holds at least one tensor
    specs = {k: (Type.F32, tuple(reversed(v.shape))) for k, v in weights.items()}
    with Weights(backend, specs) as w, Graph(backend) as g:
        for k, v in weights.items():
            w.set(k, v)
        x = g.input("x", tuple(reversed(x_nchw.shape)))
        if residual is None:
            y = build(g, to_channels_fastest(g, x), w)
        else:
            r = g.input("r", tuple(reversed(residual.shape)))
            y = build(g, to_channels_fastest(g, x), w, to_channels_fastest(g, r))
        if spatial:
            y = to_nchw(g, y)
        g.finalize(y)
        g.set(x, x_nchw)
        if residual is not None:
            g.set(r, residual)
        g.compute()
        out = g.get(y)
        return out if spatial else out.reshape(y.ne[1], y.ne[0])


LAYOUTS = ("plain", "winograd", *gemm_paths())  # a layout by name, or a packed GEMM path


def conv_plan(shape, stride, padding, layout="plain", winograd=False, groups=1):
    """The plan of a conv of PyTorch weight `shape` (f32) in `layout`, one of LAYOUTS: a packed path runs
    Winograd from its packed weights where `winograd` is True and it applies."""
    oc, icg, k, _ = shape
    conv = Conv("w", "bn", icg * groups, oc, k, stride, padding, groups)
    packed = layout not in ("plain", "winograd")
    m = matrix_plan("w", conv.shape, Type.F32, layout if packed else None,
                    winograd if packed else layout == "winograd", conv)
    assert m.layout is (Layout.PACKED if packed else Layout(layout))
    return m

CONV_CASES = [
    # (N, IC, H, W, OC, kernel, stride, padding)
    (1, 16, 9, 7, 32, 1, 1, 0),
    (3, 16, 9, 7, 32, 1, 2, 0),
    (2, 8, 11, 13, 24, 3, 1, 1),
    (3, 8, 11, 13, 24, 3, 2, 1),
    (1, 128, 14, 14, 64, 3, 1, 1),
    (2, 32, 1, 1, 16, 3, 1, 1),
    (1, 64, 7, 7, 64, 3, 1, 1),
    (2, 3, 33, 29, 16, 7, 2, 3),
    # The packed GEMM's blocks: two K blocks (the second short), a partial tile of channels, pixels in several
    # blocks (1152 Winograd tiles); and pixel rows 4 KiB apart (copied for the direct product, read in place
    # by Winograd's).
    (2, 160, 48, 48, 48, 3, 1, 1),
    (1, 1024, 5, 4, 40, 3, 1, 1),
]


@pytest.mark.parametrize("n,ic,h,w,oc,k,s,p", CONV_CASES)
def test_conv2d(backend, n, ic, h, w, oc, k, s, p):
    x, wt = rand(n, ic, h, w, seed=1), rand(oc, ic, k, k, seed=2) / np.float32(np.sqrt(ic * k * k))
    bias, res = rand(oc, seed=3), rand(n, oc, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, seed=4)
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=s, padding=p).numpy()
    want_fused = np.maximum(want + bias[:, None, None] + res, 0)
    applies = winograd_applies(wt.shape, s, p, Type.F32)
    # The direct (patches) path, Winograd F(2x2,3x3) over ggml's mul_mat where it applies, the packed GEMMs,
    # and where it applies the packed GEMMs' Winograd; each plain and with the bias, residual and ReLU.
    variants = [(layout, False) for layout in LAYOUTS if layout != "winograd" or applies]
    variants += [(path, True) for path in gemm_paths() if applies]
    for layout, winograd in variants:
        plan = conv_plan(wt.shape, s, p, layout, winograd)
        weights = {"w": layers.arrange_weight(wt, plan), "b": bias}
        got = run(backend, weights, lambda g, xc, W: layers.conv2d(g, xc, W["w"], plan), x)
        assert_close(got, want)
        got = run(backend, weights, lambda g, xc, W, r: layers.conv2d(g, xc, W["w"], plan, bias=W["b"], residual=r,
                                                                      relu=True), x, residual=res)
        assert_close(got, want_fused)


GROUPED_CASES = [
    # (N, IC, H, W, OC, kernel, stride, padding, groups)
    (2, 8, 9, 7, 16, 3, 1, 1, 4),
    (1, 64, 14, 13, 64, 3, 2, 1, 32),  # resnext50_32x4d's layer2.0.conv2, on a small image
    (2, 256, 4, 5, 256, 3, 1, 1, 64),  # resnext101_64x4d's layer1 convs: 4 channels per group
    (3, 12, 5, 6, 6, 1, 1, 0, 3),  # 1x1: the gather still splits the channels
    (1, 16, 6, 6, 16, 3, 1, 1, 16),  # one channel per group
]


@pytest.mark.parametrize("n,ic,h,w,oc,k,s,p,groups", GROUPED_CASES)
def test_grouped_conv2d(backend, n, ic, h, w, oc, k, s, p, groups):
    x = rand(n, ic, h, w, seed=1)
    wt = rand(oc, ic // groups, k, k, seed=2) / np.float32(np.sqrt(ic // groups * k * k))
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=s, padding=p, groups=groups).numpy()
    plan = conv_plan(wt.shape, s, p, groups=groups)
    got = run(backend, {"w": layers.arrange_weight(wt, plan)}, lambda g, xc, W: layers.conv2d(g, xc, W["w"], plan), x)
    assert_close(got, want)


def test_grouped_conv2d_in_bf16_rounds_as_torch_does(backend):
    """bf16 weights: the grouped gather hands the product bf16 patches, as the ungrouped one does."""
    n, ic, h, w, oc, groups = 2, 64, 7, 6, 64, 8
    x, wt = rand(n, ic, h, w, seed=3), rand(oc, ic // groups, 3, 3, seed=4) / np.float32(24)
    rounded = [torch.from_numpy(a).to(torch.bfloat16).double() for a in (x, wt)]
    want = F.conv2d(*rounded, stride=2, padding=1, groups=groups).numpy()
    plan = conv_plan(wt.shape, 2, 1, groups=groups)
    m = layers.arrange_weight(wt, plan)
    with Weights(backend, {"w": (Type.BF16, tuple(reversed(m.shape)))}) as wts, Graph(backend) as g:
        wts.set("w", Type.BF16.dtype.encode(m))
        xi = g.input("x", (w, h, ic, n))
        y = to_nchw(g, layers.conv2d(g, to_channels_fastest(g, xi), wts["w"], plan))
        g.finalize(y)
        g.set(xi, x)
        g.compute()
        got = g.get(y)
    assert_close(got, want)


def _bf16_cases(rng, n):
    """f32 values that probe bf16 rounding: exact ties (both parities), just either side of a tie, huge and
    tiny values, zeros of both signs; the rest random. No subnormals (the bf16 dot product flushes them)
    and nothing that rounds to infinity (the identity's zeros would make NaNs of it)."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    bits[: n // 2] &= np.uint32(0x0FFFFFFF)  # keep half well inside the finite range
    bits[: n // 8] = (bits[: n // 8] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # ties
    bits[n // 8: n // 4] = (bits[n // 8: n // 4] & np.uint32(0xFFFF0000)) | rng.choice(
        np.array([0x7FFF, 0x8001, 0xFFFF, 0x0001], np.uint32), n // 4 - n // 8)
    x = bits.view(np.float32).copy()
    x[~np.isfinite(x) | (np.abs(x) > 1e38) | (np.abs(x) < 2e-38)] = 1.5
    x[:4] = [0.0, -0.0, 3.0e38, -2.0e-38]
    return x


@pytest.mark.parametrize("k,s,p", [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_bf16_patches_round_as_ggml_and_torch_do(backend, k, s, p):
    """The gather's bf16 output must be what ggml's own conversion of an f32 matmul input gives (bit for
    bit) and what torch's round-to-nearest-even gives."""
    c, h, w = 64, 5, 6
    x = _bf16_cases(np.random.default_rng(k * 10 + s), c * h * w).reshape(1, h, w, c).transpose(0, 3, 1, 2)
    kk = k * k * c
    eye = np.eye(kk, dtype=np.float32)
    with Weights(backend, {"eye": ("bf16", (kk, kk))}) as wt, Graph(backend) as g:
        wt.set("eye", Type.BF16.dtype.encode(eye))
        xi = g.input("x", (w, h, c, 1))
        xc = to_channels_fastest(g, xi)
        ours = g.mul_mat(wt["eye"], g.gather_patches(xc, k, s, p, ttype=Type.BF16))
        ggmls = g.mul_mat(wt["eye"], g.gather_patches(xc, k, s, p))  # f32: ggml rounds it for the product
        g.finalize(ours, ggmls)
        g.set(xi, np.ascontiguousarray(x))
        g.compute()
        got, theirs = g.get(ours).reshape(-1, kk), g.get(ggmls).reshape(-1, kk)
    want = F.unfold(torch.from_numpy(x).to(torch.bfloat16).float(), k, padding=p, stride=s)  # [1, c*k*k, L]
    want = want.reshape(c, k * k, -1).permute(2, 1, 0).reshape(-1, kk).numpy()  # rows (ky, kx, c), c fastest
    assert np.array_equal(got.view(np.uint32), theirs.view(np.uint32))
    np.testing.assert_array_equal(got, want)


def test_arranged_weights_pad_k_for_the_fast_path():
    """Plain weights above 1x1 pad K to a multiple of 32 for ggml's fast path, as their plan says."""
    for shape, s, p, want in (((64, 3, 7, 7), 2, 3, (64, 160)), ((64, 64, 3, 3), 1, 1, (64, 576)),
                              ((64, 3, 1, 1), 1, 0, (64, 3))):
        assert layers.arrange_weight(rand(*shape), conv_plan(shape, s, p)).shape == want
    for path in gemm_paths():  # the packed GEMM takes any K
        plan = conv_plan((64, 3, 7, 7), 2, 3, path)
        assert layers.arrange_weight(rand(64, 3, 7, 7), plan).shape == plan.stored_shape == (4, 147, 16)


def bn_params(c, seed):
    r = np.random.default_rng(seed)
    return dict(mean=r.normal(0, 1, c).astype(np.float32), var=r.uniform(0.05, 3, c).astype(np.float32),
                gamma=r.normal(1, 0.3, c).astype(np.float32), beta=r.normal(0, 0.5, c).astype(np.float32))


def torch_bn(x, p, eps=1e-5):
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    return F.batch_norm(torch.from_numpy(x), t["mean"], t["var"], t["gamma"], t["beta"], False, 0.0, eps).numpy()


@pytest.mark.parametrize("n,c,h,w", [(1, 16, 5, 7), (3, 24, 6, 4)])
def test_batchnorm_explicit_matches_torch(backend, n, c, h, w):
    x, p = rand(n, c, h, w, seed=3) * 2 + 0.5, bn_params(c, 4)
    got = run(backend, p, lambda g, xc, W: layers.batchnorm(g, xc, W["mean"], W["var"], W["gamma"],
                                                             W["beta"], 1e-5), x)
    assert_close(got, torch_bn(x, p))


@pytest.mark.parametrize("k,s,p,layout", [
    (k, s, p, layout) for k, s, p in [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1)] for layout in LAYOUTS
    if layout != "winograd" or (k, s) == (3, 1)])  # Winograd F(2x2,3x3) is for 3x3 stride-1 convs only
def test_conv_with_folded_batchnorm_residual_and_relu(backend, k, s, p, layout):
    """conv + folded BatchNorm + residual + ReLU: fused into the packed GEMM, separate ops otherwise."""
    n, ic, oc = 2, 16, 24
    x, wt, bn = rand(n, ic, 10, 9, seed=5), rand(oc, ic, k, k, seed=6) / np.float32(np.sqrt(ic * k * k)), bn_params(oc, 7)
    conv = torch.from_numpy(torch_bn(F.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=s, padding=p).numpy(), bn))
    res = rand(*conv.shape, seed=8)
    want = F.relu(conv + torch.from_numpy(res)).numpy()
    scale, bias = layers.batchnorm_scale_bias(bn["gamma"], bn["beta"], bn["mean"], bn["var"], 1e-5)

    plan = conv_plan(wt.shape, s, p, layout)
    specs = {"w": layers.arrange_weight(wt, plan, scale), "b": bias}
    with Weights(backend, {name: (Type.F32, tuple(reversed(v.shape))) for name, v in specs.items()}) as w, \
            Graph(backend) as g:
        for name, v in specs.items():
            w.set(name, v)
        xi, ri = g.input("x", tuple(reversed(x.shape))), g.input("res", tuple(reversed(res.shape)))
        y = layers.conv2d(g, to_channels_fastest(g, xi), w["w"], plan, bias=w["b"],
                          residual=to_channels_fastest(g, ri), relu=True)
        y = to_nchw(g, y)
        g.finalize(y)
        g.set(xi, x)
        g.set(ri, res)
        g.compute()
        got = g.get(y)
    assert_close(got, want, rtol=4e-6)  # folding rounds the scaled weights once more


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2)])
def test_max_pool_is_exact(backend, k, s, p):
    x = rand(2, 20, 13, 10, seed=8)
    x[0, 3, 4, 5] = np.nan  # a NaN wins its windows, as in PyTorch
    want = F.max_pool2d(torch.from_numpy(x), k, s, p).numpy()
    got = run(backend, {}, lambda g, xc, W: layers.max_pool(g, xc, kernel=k, stride=s, padding=p), x)
    assert np.isnan(want).any()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (5, 3, 2)])
def test_max_pool_of_u8_bytes_is_exact(backend, k, s, p):
    """An I8 tensor's bytes pool as u8 (200 beats 100, unlike as s8): int8's stem pools its u8 output, which is
    the quantized f32 pool (quantizing is monotonic), PyTorch's max_pool2d of the byte values."""
    x = np.random.default_rng(9).integers(0, 256, (2, 13, 10, 20), dtype=np.uint8)  # NHWC
    want = F.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32)), k, s, p).numpy()
    with Graph(backend) as g:
        xt = g.input("x", (20, 10, 13, 2), Type.I8)
        y = g.max_pool(xt, k, s, p)
        assert y.type == Type.I8
        g.finalize(y)
        g.set(xt, x.view(np.int8))
        g.compute()
        got = g.get(y).view(np.uint8).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, want.astype(np.uint8))


@pytest.mark.parametrize("ttype", [Type.F32, Type.I8])
@pytest.mark.parametrize("n", [1, 2, 9, 10, 100])
def test_batch_slices_stack_back_in_any_order(backend, n, ttype):
    """batch_slice views one image; stack_batch copies images into one batch, in the order given, through a
    second copy past the 9 sources a ggml custom op takes; f32 values or int8's bytes alike."""
    x = rand(n, 5, 3, 2, seed=13)  # NHWC: ggml [2, 3, 5, n]
    if ttype == Type.I8:
        x = (x * 1000).astype(np.int8)
    order = np.random.default_rng(0).permutation(n)
    with Graph(backend) as g:
        xt = g.input("x", (2, 3, 5, n), ttype)
        slices = [g.batch_slice(xt, int(i)) for i in order]
        assert all(s.ne == (2, 3, 5, 1) and s.is_contiguous for s in slices)
        y = g.stack_batch(slices)
        g.finalize(y)
        g.set(xt, x)
        g.compute()
        np.testing.assert_array_equal(g.get(y), x[order])


def test_relu_and_residual_add(backend):
    x = rand(3, 8, 5, 6, seed=9)
    want = F.relu(torch.from_numpy(x) + torch.from_numpy(x) * 0.5).numpy()
    got = run(backend, {}, lambda g, xc, W: g.relu(g.add(xc, g.scale_bias(xc, 0.5, 0.0))), x)
    np.testing.assert_array_equal(got, want)


def test_global_avg_pool_and_linear_and_softmax(backend):
    n, c, classes = 3, 64, 10
    x, wt, b = rand(n, c, 7, 5, seed=10), rand(classes, c, seed=11) / np.float32(8), rand(classes, seed=12)
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(x), 1).flatten(1)
    logits = F.linear(pooled, torch.from_numpy(wt), torch.from_numpy(b))
    got_pool = run(backend, {}, lambda g, xc, W: layers.global_avg_pool(g, xc), x, spatial=False)
    assert_close(got_pool, pooled.numpy())
    for path in (None, *gemm_paths()):  # ggml's mul_mat, and the packed GEMM's paths
        plan = matrix_plan("fc.weight", wt.shape, Type.F32, path, None)
        got_logits = run(backend, {"w": layers.arrange_weight(wt, plan), "b": b},
                         lambda g, xc, W: layers.linear(g, layers.global_avg_pool(g, xc), W["w"], W["b"], plan), x,
                         spatial=False)
        assert_close(got_logits, logits.numpy())
    plan = matrix_plan("fc.weight", wt.shape, Type.F32, None, None)
    got_probs = run(backend, {"w": wt, "b": b}, lambda g, xc, W: g.softmax(
        layers.linear(g, layers.global_avg_pool(g, xc), W["w"], W["b"], plan)), x, spatial=False)
    assert_close(got_probs, torch.softmax(logits, 1).numpy())


@pytest.mark.parametrize("layout,dim", [("cwhn", 0), ("whcn", 2)])
def test_batch_repeat_expands_along_the_channel_dimension(backend, layout, dim):
    v = np.arange(1, 6, dtype=np.float32)
    ne = (5, 3, 4, 2) if dim == 0 else (3, 4, 5, 2)
    with Weights(backend, {"v": (Type.F32, (5,))}) as w, Graph(backend) as g:
        w.set("v", v)
        like = g.input("like", ne)
        y = g.batch_repeat(w["v"], like, dim)
        g.finalize(y)
        g.compute()
        out = g.get(y)  # NumPy order: reversed ne
    want = np.broadcast_to(v.reshape([-1 if i == 3 - dim else 1 for i in range(4)]), out.shape)
    np.testing.assert_array_equal(out, want)


def _finalized(g, a):
    g.finalize(g.relu(a))
    return g


def _closed(g, a):
    g.close()
    return g


# (id, setup, call, message): each runs on a fresh graph with inputs a [4, 3] and b [5, 3], after setup.
BAD_GRAPH_CALLS = [
    ("broadcast", None, lambda g, a, b: g.add(a, b), "broadcast"),
    ("mul-mat-shapes", None, lambda g, a, b: g.mul_mat(a, b), "do not fit"),
    ("zero-dim", None, lambda g, a, b: g.input("z", (0, 3)), "positive"),
    ("negative-dim", None, lambda g, a, b: g.input("neg", (4, -1)), "positive"),
    ("permutation", None, lambda g, a, b: g.permute(a, (0, 0, 1, 2)), "permutation"),
    ("reshape", None, lambda g, a, b: g.reshape(a, (5, 5)), "elements"),
    ("window", None, lambda g, a, b: g.gather_patches(g.input("img", (3, 2, 2, 1)), 7, 2, 0), "does not fit"),
    ("gather-ttype", None, lambda g, a, b: g.gather_patches(g.input("img2", (3, 2, 2, 1)), 1, 1, 0, ttype="f16"),
     "F32 or BF16"),
    # a bf16 input only goes with bf16 weights
    ("bf16-input", None, lambda g, a, b: g.mul_mat(a, g.gather_patches(a, 1, 1, 0, ttype="bf16")), "f32 tensors"),
    ("batch-repeat", None, lambda g, a, b: g.batch_repeat(g.input("v", (3,)), a, 0), "must be"),
    ("not-a-tensor", None, lambda g, a, b: g.relu(np.zeros(3)), "Tensor"),
    ("compute-unfinalized", None, lambda g, a, b: g.compute(), "finalize"),
    ("set-float64", _finalized, lambda g, a, b: g.set(a, np.zeros((3, 4), dtype=np.float64)), "float32"),
    ("set-size", _finalized, lambda g, a, b: g.set(a, np.zeros((3, 5), dtype=np.float32)), "bytes"),
    ("build-finalized", _finalized, lambda g, a, b: g.relu(a), "finalized"),
    ("compute-closed", _closed, lambda g, a, b: g.compute(), "closed"),
    ("pool-float-kernel", None, lambda g, a, b: g.max_pool(g.input("p", (2, 8, 8, 1)), 3.0, 2, 1), "kernel"),
    ("pool-bool-stride", None, lambda g, a, b: g.max_pool(g.input("p", (2, 8, 8, 1)), 3, True, 1), "stride"),
    ("pool-padding", None, lambda g, a, b: g.max_pool(g.input("p", (2, 8, 8, 1)), 3, 2, 2), "more than half"),
    ("gather-negative-padding", None, lambda g, a, b: g.gather_patches(a, np.int64(1), 1, np.int64(-1)), "padding"),
    # the ops' parameter fields take windows up to MAX_WINDOW (csrc/op_params.h)
    ("pool-stride-limit", None, lambda g, a, b: g.max_pool(g.input("p", (2, 8, 8, 1)), 3, MAX_WINDOW + 1, 1), "stride"),
    ("gather-padding-limit", None, lambda g, a, b: g.gather_patches(a, 1, 1, MAX_WINDOW + 1), "padding"),
    # groups must divide the channels (2 does not divide 3), and be a positive integer
    *((f"gather-groups-{v!r}", None, lambda g, a, b, v=v: g.gather_patches(g.input("img3", (3, 2, 2, 1)), 1, 1, 0,
                                                                            groups=v), "groups")
      for v in (2, 0, True, 1.0)),
    # 5 output rows do not split into 2 groups
    ("grouped-conv-rows", None, lambda g, a, b: layers.conv2d(g, g.input("img4", (4, 3, 3, 1)), g.input("w5", (18, 5)),
                                                               conv_plan((5, 2, 3, 3), 1, 1, groups=2)), "elements"),
    # Winograd: the products need [C, T, 16, 1] and packed 3x3 weights for C; the output transform needs
    # products for its image's tiles and an [OC] bias
    ("slice-index", None, lambda g, a, b: g.batch_slice(g.input("s", (2, 3, 4, 5)), 5), "index"),
    ("slice-view", None, lambda g, a, b: g.batch_slice(g.permute(g.input("s", (2, 3, 4, 5)), (1, 0, 2, 3)), 0),
     "contiguous"),
    ("stack-none", None, lambda g, a, b: g.stack_batch([]), "at least one"),
    ("stack-shapes", None, lambda g, a, b: g.stack_batch([a, b]), "does not match"),
    ("stack-type", None, lambda g, a, b: g.stack_batch([g.input("h", (4, 3), "f16")]), "f32 or I8"),
    ("stack-mixed", None, lambda g, a, b: g.stack_batch([a, g.input("i", a.ne, Type.I8)]), "does not match"),
    ("winograd-v-shape", None, lambda g, a, b: g.gemm_winograd(g.input("w", (16, 36, 2)), a, 20,
                                                               like=g.input("l", (4, 4, 4, 1)), path="avx2"),
     "[4, 4, 16, 1]"),
    ("winograd-weights", None, lambda g, a, b: g.gemm_winograd(g.input("w", (16, 36, 2)), g.input("v", (5, 4, 16)),
                                                               20, like=g.input("l", (5, 4, 4, 1)), path="avx2"),
     "packed 3x3"),
    ("winograd-residual", None, lambda g, a, b: g.gemm_winograd(
        g.input("w", (16, 36, 2)), g.input("v", (4, 4, 16)), 20, like=g.input("l", (4, 4, 4, 1)),
        residual=g.input("r", (20, 4, 4, 2)), path="avx2"), "residual"),
    ("winograd-tiles", None, lambda g, a, b: g.winograd_output(g.input("m", (6, 3, 16)), g.input("l", (2, 4, 4, 1))),
     "must be"),
    ("winograd-bias", None, lambda g, a, b: g.winograd_output(g.input("m", (6, 4, 16)), g.input("l", (2, 4, 4, 1)),
                                                              bias=g.input("bias", (5,))), "bias"),
]
BAD_OTHER_CALLS = [
    ("unknown-type", lambda backend: Weights(backend, {"w": ("f64", (4,))}), "unknown tensor type"),
    ("block-size", lambda backend: Weights(backend, {"w": ("q8_0", (30, 2))}), "block size"),
    ("threads", lambda backend: Backend(threads=0), "threads"),
    ("max-nodes", lambda backend: Graph(backend, max_nodes=8), "max_nodes"),
]


@pytest.mark.parametrize("setup, call, match", [c[1:] for c in BAD_GRAPH_CALLS], ids=[c[0] for c in BAD_GRAPH_CALLS])
def test_bad_graph_calls_raise_our_errors_and_the_process_lives(backend, setup, call, match):
    with Graph(backend) as g:
        a, b = g.input("a", (4, 3)), g.input("b", (5, 3))
        if setup:
            setup(g, a)
        with pytest.raises(InputError, match=match):
            call(g, a, b)


@pytest.mark.parametrize("call, match", [c[1:] for c in BAD_OTHER_CALLS], ids=[c[0] for c in BAD_OTHER_CALLS])
def test_bad_calls_raise_our_errors_and_the_process_lives(backend, call, match):
    with pytest.raises(InputError, match=match):
        call(backend)
    assert issubclass(InputError, Error) and issubclass(InputError, ValueError)


def test_window_arguments_take_numpy_integers_alike(backend):
    """max_pool and gather_patches check kernel, stride and padding the same way: NumPy integers are integers."""
    with Graph(backend) as g:
        x = g.input("x", (2, 8, 8, 1))
        pooled = g.max_pool(x, np.int64(3), np.int32(2), np.int64(1))
        patches = g.gather_patches(x, np.int64(3), np.int64(2), np.int64(1))
        assert pooled.ne == (2, 4, 4, 1) and patches.ne == (18, 4, 4, 1)


def test_a_graph_refuses_to_run_on_closed_weights(backend):
    w = Weights(backend, {"w": (Type.F32, (4, 4))})
    w.set("w", np.eye(4, dtype=np.float32))
    g = Graph(backend)
    x = g.input("x", (4, 1))
    g.finalize(g.mul_mat(w["w"], x))
    w.close()
    with pytest.raises(InputError, match="closed"):
        g.compute()
    g.close()

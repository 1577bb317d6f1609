"""Neural-network layers as ggml graphs over channel-fastest activations.

Activations are ggml [C, W, H, N] (NumPy NHWC): with the channel fastest, a 1x1 convolution is a
single ggml_mul_mat, a k x k convolution is one mul_mat over gathered patches, and per-channel vectors
broadcast along rows, which ggml vectorises. Each layer comes in two halves that must agree on the
weight layout: a `*_weight` function arranges host arrays before upload, and a graph function uses them.
Everything stays f32 unless the caller stores weights in a reduced type: patches are gathered in f32 (bf16
for bf16 weights), not by ggml_conv_2d's im2col, which rounds them to f16.
"""

from __future__ import annotations

import numpy as np

from .ggml import Graph, Tensor, Type, gemm_type, pack_matrix, packed_shape

# ggml's fast matmul path (llamafile sgemm) wants K to be a multiple of 16 (f32) or 32 (bf16, q8_0).
K_ALIGN = 32


# Winograd F(2x2,3x3) weight transform G (the input and output transforms are in csrc/winograd.c).
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def winograd_applies(shape: tuple[int, ...], stride: int, padding: int, wtype: Type) -> bool:
    """Whether a conv can run as Winograd F(2x2,3x3) (16 multiplies per 2x2 outputs instead of 36): 3x3,
    stride 1, padding 1, f32 weights (reduced-precision weights keep the direct path)."""
    return (shape[2], shape[3], stride, padding) == (3, 3, 1, 1) and wtype == Type.F32


# How a conv's or the fc layer's weights are stored and multiplied: "plain" (ggml's mul_mat), "winograd"
# (F(2x2,3x3), mul_mat over the 16 transformed products), or one of ggml.GEMM_PATHS (packed, csrc/gemm.h).
PLAIN, WINOGRAD = "plain", "winograd"


def matrix_layout(shape: tuple[int, ...], stride: int, padding: int, wtype: Type, *, winograd: bool | None,
                  gemm: str | None, groups: int = 1) -> str:
    """The layout of a conv weight (PyTorch shape [OC, IC, KH, KW]) or fc weight ([OUT, IN]) under the
    model's options: the packed GEMM on path `gemm` for weights of its type (which runs Winograd from the
    same weights, see `packed_winograd`), else Winograd where asked for and it applies, else plain. A grouped
    conv is always plain: ggml's mul_mat broadcasts it over the groups."""
    if groups > 1:
        return PLAIN
    if gemm is not None and wtype == gemm_type(gemm):
        return gemm
    if len(shape) == 4 and winograd and winograd_applies(shape, stride, padding, wtype):
        return WINOGRAD
    return PLAIN


def packed_winograd(layout: str, shape: tuple[int, ...], stride: int, padding: int, wtype: Type,
                    winograd: bool | None, image: tuple[int, int]) -> bool:
    """Whether a conv with packed weights runs as Winograd F(2x2,3x3) products over its packed 3x3 weights,
    for an input of `image` (width, height): always where `winograd` is True and it applies, never where
    False; by default (None) where it applies and the image has WINOGRAD_MIN_TILES 2x2 tiles or more. The
    choice never depends on the batch, so an image's logits do not either."""
    if layout in (PLAIN, WINOGRAD) or winograd is False or not winograd_applies(shape, stride, padding, wtype):
        return False
    width, height = image
    return winograd or -(-width // 2) * -(-height // 2) >= WINOGRAD_MIN_TILES


# Below this many 2x2 output tiles per image (ResNet-101's layer4 at 7x7 has 16) the 16 products are too
# short to beat the direct product at batch 1: each transformed weight serves too few pixels (measured,
# docs/benchmarks.md).
WINOGRAD_MIN_TILES = 32


def conv_weight_shape(shape: tuple[int, ...], layout: str = PLAIN) -> tuple[int, ...]:
    """The shape `conv_weight` gives a PyTorch [OC, IC, KH, KW] weight."""
    oc, ic, kh, kw = shape
    k = kh * kw * ic
    if layout == WINOGRAD:
        return 16, oc, ic
    if layout != PLAIN:
        return packed_shape(oc, k, gemm_type(layout))
    if kh * kw > 1 and k % K_ALIGN:
        k += K_ALIGN - k % K_ALIGN
    return oc, k


def conv_weight(w: np.ndarray, layout: str = PLAIN, scale: np.ndarray | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """PyTorch [OC, IC, KH, KW] -> the weight array `conv2d` multiplies by, each output channel's weights
    multiplied by `scale` (a folded BatchNorm's) when given.

    Plain: a 2-D [OC, K] matrix, K running over (ky, kx, c) with c fastest (the order `gather_patches`
    emits), zero-padded to a multiple of K_ALIGN for kernels above 1x1 (only the 7x7 stem, K=147).
    Packed (a GEMM path): the same matrix unpadded, packed by `ggml.pack_matrix` for the path's type
    straight from `w` (into `out` when given, f32 only).
    Winograd: [16, OC, IC], G w G^T for each of the 16 tile positions, in float64 and rounded once.
    """
    oc, ic, kh, kw = w.shape
    if layout not in (PLAIN, WINOGRAD):
        return pack_matrix(w.transpose(0, 2, 3, 1), gemm_type(layout), scale, out=out)
    if layout == WINOGRAD:
        u = _WINOGRAD_G @ w.astype(np.float64) @ _WINOGRAD_G.T  # [OC, IC, 4, 4]
        m = np.ascontiguousarray(u.reshape(oc, ic, 16).transpose(2, 0, 1), dtype=np.float32)
    else:
        m = np.ascontiguousarray(w.transpose(0, 2, 3, 1), dtype=np.float32).reshape(oc, kh * kw * ic)
    if scale is not None:
        m = m * scale[:, None]  # rows are output channels in both layouts; `w` itself stays as it was
    k = conv_weight_shape(w.shape)[1]
    return np.pad(m, ((0, 0), (0, k - m.shape[1]))) if layout == PLAIN and k > m.shape[1] else m


def batchnorm_scale_bias(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """An inference BatchNorm as y = x * scale + bias per channel: folding it into the preceding bias-free
    convolution multiplies each output channel's weights (a row of `conv_weight`) by scale and adds bias.

    Computed in float64 and rounded once; scaling the weights is then one float32 multiply each.
    """
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale.astype(np.float32), bias.astype(np.float32)


def conv2d(g: Graph, x: Tensor, w: Tensor, *, kernel: int, stride: int, padding: int, layout: str = PLAIN,
           channels: int | None = None, bias: Tensor | None = None, residual: Tensor | None = None,
           relu: bool = False, groups: int = 1, winograd: bool = False) -> Tensor:
    """Convolution: x [C, W, H, N], w from `conv_weight` with this `layout` -> [OC, OW, OH, N], then + bias
    ([OC]), + residual (shaped like the result), ReLU. The packed GEMM does those as it writes its output;
    the other layouts add them as separate ops, after a gathering of patches (above 1x1) that the packed
    layout does not need: it reads its windows straight from x. `channels` (OC) is needed by it only.
    `groups` > 1 (plain layout only): see `grouped_product`. `winograd` (a packed 3x3 stride-1 conv, see
    `packed_winograd`): its 16 Winograd products in the packed GEMM, the epilogue in the output transform."""
    if groups > 1:
        y = grouped_product(g, x, w, kernel=kernel, stride=stride, padding=padding, groups=groups)
    elif layout == WINOGRAD or winograd:
        v = g.winograd_input(x)
        products = g.mul_mat(w, v) if layout == WINOGRAD else g.gemm_winograd(w, v, channels, path=layout)
        return g.winograd_output(products, x, bias=bias, residual=residual, relu=relu)
    elif layout != PLAIN:
        if w.type == Type.BF16 and kernel > 1:
            # Rounded to bf16 once here, not for each of the kernel*kernel windows that read a pixel.
            x = g.gather_patches(x, 1, 1, 0, ttype=Type.BF16)
        return g.gemm(w, x, channels, kernel=kernel, stride=stride, padding=padding, bias=bias,
                      residual=residual, relu=relu, path=layout)
    else:
        if (kernel, stride, padding) != (1, 1, 0) or w.type == Type.BF16:
            # bf16 weights get their input as bf16 from the gather, which rounds as ggml would but
            # vectorised: ggml's own conversion of the matmul input is a scalar loop that took 12% of a run.
            x = g.gather_patches(x, kernel, stride, padding, k_pad=w.ne[0], ttype=_patch_type(w))
        y = g.mul_mat(w, x)
    return epilogue(g, y, bias=bias, residual=residual, relu=relu)


def _patch_type(w: Tensor) -> Type:
    return Type.BF16 if w.type == Type.BF16 else Type.F32


def grouped_product(g: Graph, x: Tensor, w: Tensor, *, kernel: int, stride: int, padding: int,
                    groups: int) -> Tensor:
    """A grouped convolution (ResNeXt's: each group of OC/groups outputs sees only its own C/groups inputs):
    x [C, W, H, N], w from `conv_weight` (plain) of a PyTorch [OC, C/groups, KH, KW] weight -> [OC, OW, OH, N].

    The rows of w are the groups' [K, OC/groups] blocks in order, so the whole convolution is one product of
    each group's patches with its block: a single mul_mat node, broadcast over the groups."""
    k, oc = w.ne[0], w.ne[1]
    patches = g.gather_patches(x, kernel, stride, padding, k_pad=k, ttype=_patch_type(w), groups=groups)
    y = g.mul_mat(g.reshape(w, (k, oc // groups, groups)), patches)  # [OC/groups, OW*OH*N, groups]
    # Output channel g*OC/groups + o, as PyTorch numbers them, back in the channel-fastest layout.
    y = g.cont(g.permute(y, (0, 2, 1, 3)))
    out_w, out_h = ((n + 2 * padding - kernel) // stride + 1 for n in x.ne[1:3])
    return g.reshape(y, (oc, out_w, out_h, x.ne[3]))


def epilogue(g: Graph, y: Tensor, *, bias: Tensor | None = None, residual: Tensor | None = None,
             relu: bool = False) -> Tensor:
    """y + bias + residual, then ReLU, as separate ops (each skipped when not given), in place: y must be
    read by nothing else."""
    if bias is not None:
        y = bias_add(g, y, bias, inplace=True)
    if residual is not None:
        y = g.add(y, residual, inplace=True)
    return g.relu(y, inplace=True) if relu else y


def bias_add(g: Graph, x: Tensor, bias: Tensor, inplace: bool = False) -> Tensor:
    """x [C, ...] + bias [C]: a per-channel vector broadcast along rows."""
    return g.add(x, bias, inplace=inplace)


def batchnorm(g: Graph, x: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """Inference BatchNorm written out as PyTorch defines it, (x - mean) / sqrt(var + eps) * gamma + beta,
    with each per-channel vector expanded to x's shape by `batch_repeat` (the design document's method)."""
    std = g.sqrt(g.scale_bias(var, 1.0, eps))
    y = g.sub(x, g.batch_repeat(mean, x, 0))
    y = g.div(y, g.batch_repeat(std, y, 0))
    y = g.mul(y, g.batch_repeat(gamma, y, 0))
    return g.add(y, g.batch_repeat(beta, y, 0))


def max_pool(g: Graph, x: Tensor, *, kernel: int, stride: int, padding: int) -> Tensor:
    """Max pooling of [C, W, H, N], as PyTorch's max_pool2d."""
    return g.max_pool(x, kernel, stride, padding)


def global_avg_pool(g: Graph, x: Tensor) -> Tensor:
    """[C, W, H, N] -> [C, N], the mean over all pixels of each channel."""
    return g.mean_pool(x)


def linear(g: Graph, x: Tensor, w: Tensor, b: Tensor, layout: str = PLAIN) -> Tensor:
    """x [IN, N] times a PyTorch Linear weight [OUT, IN] (ggml [IN, OUT]; packed by `ggml.pack_matrix` for a
    GEMM path) plus bias -> [OUT, N]."""
    if layout != PLAIN:
        return g.gemm(w, x, b.ne[0], bias=b, path=layout)
    return g.add(g.mul_mat(w, x), b)

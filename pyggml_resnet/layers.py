"""Neural-network layers as ggml graphs over channel-fastest activations.

Activations are ggml [C, W, H, N] (NumPy NHWC): with the channel fastest, a 1x1 convolution is a
single ggml_mul_mat, a k x k convolution is one mul_mat over gathered patches, and per-channel vectors
broadcast along rows, which ggml vectorises. Each layer comes in two halves that must agree on the
weight layout, both reading the matrix's `plan.MatrixPlan`: `arrange_weight` arranges host arrays before
upload, and a graph function (`conv2d`, `linear`) uses them.
Everything stays f32 unless the caller stores weights in a reduced type: patches are gathered in f32 (bf16
for bf16 weights), not by ggml_conv_2d's im2col, which rounds them to f16.
"""

from __future__ import annotations

import numpy as np

from .arch import InputQuant
from .ggml import Graph, Tensor, Type, bf16_bits
from .packing import pack_matrix
from .plan import Layout, MatrixPlan, gemm_type

# Winograd F(2x2,3x3) weight transform G (the input and output transforms are in csrc/winograd.c).
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def arrange_weight(w: np.ndarray, plan: MatrixPlan, scale: np.ndarray | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
    """A PyTorch conv weight [OC, IC, KH, KW] or fc weight [OUT, IN] -> the float32 array of
    `plan.stored_shape` that `conv2d` or `linear` multiplies, each output channel's weights multiplied by
    `scale` (a folded BatchNorm's) when given. The caller rounds it to `plan.weight_type`.

    Plain: a 2-D [OC, K] matrix, K running over (ky, kx, c) with c fastest (the order `gather_patches`
    emits), zero-padded to the plan's K (a multiple of `plan.K_ALIGN` for kernels above 1x1: only the 7x7 stem).
    Packed: the same matrix unpadded, packed by `packing.pack_matrix` for the path's type straight from `w`
    (into `out` when given: float32, or uint16 bf16 bits, rounded as they are packed).
    Winograd: [16, OC, IC], G w G^T for each of the 16 tile positions, in float64 and rounded once.
    """
    rows = w.transpose(0, 2, 3, 1) if w.ndim == 4 else w  # K in (ky, kx, c) order, c fastest
    if plan.layout is Layout.PACKED:
        return pack_matrix(rows, gemm_type(plan.path), scale, out=out, round_bf16=bf16_bits)
    if plan.layout is Layout.WINOGRAD:
        oc, ic = w.shape[:2]
        u = _WINOGRAD_G @ w.astype(np.float64) @ _WINOGRAD_G.T  # [OC, IC, 4, 4]
        m = np.ascontiguousarray(u.reshape(oc, ic, 16).transpose(2, 0, 1), dtype=np.float32)
    else:
        m = np.ascontiguousarray(rows, dtype=np.float32).reshape(w.shape[0], -1)
    if scale is not None:
        m = m * scale[:, None]  # rows are output channels in both layouts; `w` itself stays as it was
    k = plan.stored_shape[-1]
    return np.pad(m, ((0, 0), (0, k - m.shape[1]))) if plan.layout is Layout.PLAIN and k > m.shape[1] else m


def batchnorm_scale_bias(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """An inference BatchNorm as y = x * scale + bias per channel: folding it into the preceding bias-free
    convolution multiplies each output channel's weights (a row of `arrange_weight`) by scale and adds bias.

    Computed in float64 and rounded once; scaling the weights is then one float32 multiply each.
    """
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale.astype(np.float32), bias.astype(np.float32)


def conv2d(g: Graph, x: Tensor, w: Tensor, plan: MatrixPlan, *, bias: Tensor | None = None,
           residual: Tensor | None = None, relu: bool = False, scales: Tensor | None = None,
           colsums: Tensor | None = None, out_quant: InputQuant | None = None,
           residual_quant: InputQuant | None = None) -> Tensor:
    """The convolution `plan.conv`: x [C, W, H, N], w from `arrange_weight` for this `plan` -> [OC, OW, OH, N],
    then + bias ([OC]), + residual (shaped like the result), ReLU. The packed GEMM does those as it writes its
    output; the other layouts add them as separate ops, after a gathering of patches (above 1x1) that the
    packed layout does not need: it reads its windows straight from x. A grouped conv (plain): see
    `grouped_product`. Winograd runs as `plan.winograd` says for x's size: a packed conv's 16 Winograd
    products in the packed GEMM, which also makes the output transform and the epilogue. Int8:
    `Graph.gemm_int8` with the weights' `scales` and `colsums` (their tensors) and the input quantization of
    the plan, epilogue fused; with `out_quant` (the next int8 conv's input quantization) the result is that
    conv's u8 input, and with `residual_quant` the residual is such u8 bytes, quantized as it says."""
    conv = plan.conv
    window = dict(kernel=conv.kernel, stride=conv.stride, padding=conv.padding)
    if plan.layout is Layout.INT8:
        q = plan.input_quant
        quantized = {} if out_quant is None else dict(y_scale=out_quant.scale, y_zero=out_quant.zero)
        if residual_quant is not None:
            quantized.update(residual_scale=residual_quant.scale, residual_zero=residual_quant.zero)
        return g.gemm_int8(w, x, conv.out_ch, scales=scales, colsums=colsums, x_scale=q.scale, x_zero=q.zero,
                           **window, bias=bias, residual=residual, relu=relu, path=plan.path, **quantized)
    if conv.groups > 1:
        y = grouped_product(g, x, w, **window, groups=conv.groups)
    elif plan.winograd.runs(x.ne[1], x.ne[2]):
        v = g.winograd_input(x)
        if plan.layout is Layout.WINOGRAD:
            return g.winograd_output(g.mul_mat(w, v), x, bias=bias, residual=residual, relu=relu)
        return g.gemm_winograd(w, v, conv.out_ch, like=x, bias=bias, residual=residual, relu=relu, path=plan.path)
    elif plan.layout is Layout.PACKED:
        if w.type == Type.BF16 and conv.kernel > 1:
            # Rounded to bf16 once here, not for each of the kernel*kernel windows that read a pixel.
            x = g.gather_patches(x, 1, 1, 0, ttype=Type.BF16)
        return g.gemm(w, x, conv.out_ch, **window, bias=bias, residual=residual, relu=relu, path=plan.path)
    else:
        if (conv.kernel, conv.stride, conv.padding) != (1, 1, 0) or w.type == Type.BF16:
            # bf16 weights get their input as bf16 from the gather, which rounds as ggml would but
            # vectorised: ggml's own conversion of the matmul input is a scalar loop that took 12% of a run.
            x = g.gather_patches(x, **window, k_pad=w.ne[0], ttype=_patch_type(w))
        y = g.mul_mat(w, x)
    return epilogue(g, y, bias=bias, residual=residual, relu=relu)


def _patch_type(w: Tensor) -> Type:
    return Type.BF16 if w.type == Type.BF16 else Type.F32


def grouped_product(g: Graph, x: Tensor, w: Tensor, *, kernel: int, stride: int, padding: int,
                    groups: int) -> Tensor:
    """A grouped convolution (ResNeXt's: each group of OC/groups outputs sees only its own C/groups inputs):
    x [C, W, H, N], w from `arrange_weight` (plain) of a PyTorch [OC, C/groups, KH, KW] weight -> [OC, OW, OH, N].

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


def linear(g: Graph, x: Tensor, w: Tensor, b: Tensor, plan: MatrixPlan) -> Tensor:
    """x [IN, N] times a PyTorch Linear weight [OUT, IN] from `arrange_weight` for this `plan` (plain: ggml
    [IN, OUT]) plus bias -> [OUT, N]."""
    if plan.layout is Layout.PACKED:
        return g.gemm(w, x, b.ne[0], bias=b, path=plan.path)
    return g.add(g.mul_mat(w, x), b)

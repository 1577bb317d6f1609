"""The packed GEMM's weights on the Python side (csrc/gemm.h): its ISA paths and the weight type each
multiplies, the packed shape of a matrix, and the packing itself. Pure NumPy: the binding layer checks a
packed tensor's shape with `packed_shape` before it calls C, and the weight upload packs with `pack_matrix`.

A packed matrix is [M, K] cut into panels of 16 rows (M zero-padded to a multiple of 32), each panel stored
k-major, the 16 weights of one k side by side; a type whose instruction multiplies several k at once
(bf16's vdpbf16ps: 2) stores them as groups of that many k for each channel, K zero-padded to whole groups.
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes
from .errors import InputError

# The packed GEMM's ISA paths (csrc/gemm.h's enum gemm_path), widest first, and the weight type each multiplies.
GEMM_PATHS = {"avx512": "f32", "avx2": "f32", "avx512bf16": "bf16"}
# Consecutive k stored side by side for one channel, by weight type: the k one instruction multiplies at once.
K_GROUP = {"f32": 1, "bf16": 2}
PANEL = 16  # output channels per panel of packed weights
_PANEL_PAIR = 2 * PANEL  # M is padded to a multiple of this


def _k_group(wtype) -> int:
    """K_GROUP of a weight type given by name, or as a `dtypes.DType` or `ggml.Type` (anything with that name)."""
    name = str(getattr(wtype, "name", wtype)).lower()
    if name not in K_GROUP:
        raise InputError(f"the packed GEMM takes {' or '.join(K_GROUP)} weights, got {wtype!r}")
    return K_GROUP[name]


def packed_shape(m: int, k: int, wtype="f32") -> tuple[int, int, int]:
    """The NumPy shape (panels, K, 16) that `pack_matrix` gives an [M, K] matrix of `wtype` (K rounded up
    to whole groups of K_GROUP[wtype])."""
    k += -k % _k_group(wtype)
    return -(-m // _PANEL_PAIR) * 2, k, PANEL


def pack_matrix(w: np.ndarray, wtype="f32", scale: np.ndarray | None = None,
                out: np.ndarray | None = None, round_bf16=dtypes.bf16_round) -> np.ndarray:
    """An [M, K] float32 matrix as the packed weights `ggml.Graph.gemm` reads for `wtype` (see the module's
    docstring). bf16 weights are rounded here (to nearest even, as `dtypes.BF16.encode`): into `out` as their
    bits, else returned as the float32 values they round to, which the caller's encoding keeps exactly.

    w may have more axes, [M, ...]: its K columns are then the trailing axes in C order, read through
    any strides (a transposed view packs without a copy first). `scale` ([M]) multiplies each row on the way,
    in float32 (a folded BatchNorm's), as `w * scale[:, None]` would. `out`: an array of `packed_shape` to
    pack into, C-contiguous, such as `Weights.fill`'s, instead of a new one: float32 for f32, uint16 (the
    bits) for bf16. `round_bf16`: float32 -> bf16 bits as `dtypes.bf16_round` does them (the binding passes its C
    conversion)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2 or not w.size:
        raise InputError(f"pack_matrix takes a non-empty matrix of 2 or more axes, got shape {w.shape}")
    m, rest = w.shape[0], w.shape[1:]
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float32)
        if scale.shape != (m,):
            raise InputError(f"pack_matrix: scale must have shape ({m},), got {scale.shape}")
    group = _k_group(wtype)
    shape = packed_shape(m, math.prod(rest), wtype)
    storage = np.float32 if group == 1 else np.uint16
    if out is not None and (out.shape != shape or out.dtype != storage or not out.flags.c_contiguous):
        raise InputError(f"pack_matrix: out must be a C-contiguous {np.dtype(storage)} array of shape {shape} "
                         f"({'f32 weights' if group == 1 else 'the bits of bf16 weights, not f32 values'}), got "
                         f"{out.dtype} {out.shape}")
    if group == 1:
        out = np.empty(shape, np.float32) if out is None else out
        _pack_rows(out, w, scale)
        return out
    bits = np.empty(shape, np.uint16) if out is None else out
    _pack_rows(bits.view(np.uint32), _rounded_groups(w, scale, shape[1], round_bf16), None)
    return bits if out is not None else dtypes.BF16.decode(bits).reshape(shape)


def _rounded_groups(w: np.ndarray, scale: np.ndarray | None, kp: int, round_bf16) -> np.ndarray:
    """w (times scale) rounded to bf16 bits, K zero-padded to kp, as [M, kp / 2] uint32: each a channel's pair
    of k, the unit `_pack_rows` moves (half the bytes of f32 to move, and rounding in w's own order). A value
    beyond bf16's range becomes infinity: the caller checks (`dtypes.bf16_finite`)."""
    m, rest = w.shape[0], w.shape[1:]
    k = math.prod(rest)
    rows = np.empty((m, kp), np.float32)  # not zeros: each page is written once, below
    rows[:, k:] = 0
    _scaled_copy(rows[:, :k].reshape(w.shape), w, None if scale is None else scale.reshape(m, *(1,) * len(rest)))
    return round_bf16(rows).view(np.uint32)


def _pack_rows(out: np.ndarray, w: np.ndarray, scale: np.ndarray | None) -> None:
    """Rows of w [M, ...] into `out` (panels, K, 16) of w's itemsize: panel r // 16, channel r % 16, K's
    axes in C order; the rows past M are zeros."""
    m, rest = w.shape[0], w.shape[1:]
    panels = out.shape[0]
    # out as (panel, *K's axes, channel in panel)
    dst = out.reshape(panels, *rest, PANEL)
    full = m // PANEL
    if full:
        _scaled_copy(dst[:full], np.moveaxis(w[:full * PANEL].reshape(full, PANEL, *rest), 1, -1),
                     None if scale is None else scale[:full * PANEL].reshape(full, *(1,) * len(rest), PANEL))
    if full < panels:  # the last rows, and the zeros that pad M
        dst[full:] = 0
        if m % PANEL:
            _scaled_copy(dst[full, ..., :m % PANEL], np.moveaxis(w[full * PANEL:], 0, -1),
                         None if scale is None else scale[full * PANEL:])


def _scaled_copy(dst: np.ndarray, src: np.ndarray, scale: np.ndarray | None) -> None:
    """dst = src * scale (broadcast), or a plain copy without scale: one pass, no temporary."""
    if scale is None:
        dst[...] = src
    else:
        np.multiply(src, scale, out=dst)

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
                out: np.ndarray | None = None) -> np.ndarray:
    """An [M, K] float32 matrix as the packed weights `ggml.Graph.gemm` reads for `wtype` (see the module's
    docstring); still float32 here for bf16: the caller rounds.

    w may have more axes, [M, ...]: its K columns are then the trailing axes in C order, read through
    any strides (a transposed view packs without a copy first). `scale` ([M]) multiplies each row on the way,
    in float32 (a folded BatchNorm's), as `w * scale[:, None]` would. `out` (f32 only): an array of
    `packed_shape` to pack into, C-contiguous float32, such as `Weights.fill`'s, instead of a new one."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2 or not w.size:
        raise InputError(f"pack_matrix takes a non-empty matrix of 2 or more axes, got shape {w.shape}")
    m, rest = w.shape[0], w.shape[1:]
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float32)
        if scale.shape != (m,):
            raise InputError(f"pack_matrix: scale must have shape ({m},), got {scale.shape}")
    group = _k_group(wtype)
    if group > 1:
        if out is not None:
            raise InputError("pack_matrix: out is for f32 weights only")
        return _pack_groups(w, scale, packed_shape(m, math.prod(rest), wtype), group)
    shape = packed_shape(m, math.prod(rest))
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise InputError(f"pack_matrix: out must be a C-contiguous float32 array of shape {shape}, got "
                         f"{out.dtype} {out.shape}")
    # out as (panel, *K's axes, channel in panel); row r of w goes to panel r // 16, channel r % 16.
    panels = shape[0]
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
    return out


def _pack_groups(w: np.ndarray, scale: np.ndarray | None, shape: tuple[int, int, int], group: int) -> np.ndarray:
    """`pack_matrix` for a type that stores `group` k side by side per channel: (panels, K/group, 16, group)."""
    m, rest = w.shape[0], w.shape[1:]
    panels, kp, _ = shape
    padded = np.zeros((panels * PANEL, kp), np.float32)
    _scaled_copy(padded[:m, :math.prod(rest)].reshape(w.shape), w,
                 None if scale is None else scale.reshape(m, *(1,) * len(rest)))
    groups = padded.reshape(panels, PANEL, kp // group, group).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(groups).reshape(shape)


def _scaled_copy(dst: np.ndarray, src: np.ndarray, scale: np.ndarray | None) -> None:
    """dst = src * scale (broadcast), or a plain copy without scale: one pass, no temporary."""
    if scale is None:
        dst[...] = src
    else:
        np.multiply(src, scale, out=dst)

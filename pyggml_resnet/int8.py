"""int8 weights for the packed GEMM's int8 paths (csrc/gemm.h, `Graph.gemm_int8`): quantization and packing,
in pure NumPy.

Weights are symmetric s8 per output channel: scale sw[m] = max|w[m, :]| / 127 (in float32), q = w / sw
(float32 division) rounded to nearest, ties to even (NumPy's rint, as the activations are rounded in C),
always within -127..127; a row of zeros has scale 0 and quants 0. The GEMM reads them packed for `vpdpbusd`:
panels of 16 output channels (M zero-padded to a multiple of 32, as for f32), each k-major in groups of 4
k per channel, K zero-padded to a multiple of 4: NumPy (P, K4/4, 16, 4). Each channel's sum of its s8
weights (int32) corrects for the activations' zero point.

ggml's I8 and I32 are not among the package's tensor types, so the three arrays travel to the GEMM in f32
tensors as raw 32-bit words (`words`): the bytes are never read as floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

PANEL = 16  # output channels per panel
K_GROUP = 4  # k per 32-bit lane of vpdpbusd
QMAX = 127


def packed_shape(m: int, k: int) -> tuple[int, int, int, int]:
    """The NumPy shape (P, K4/4, 16, 4) of an [m, k] matrix's packed s8 weights."""
    return -(-m // (2 * PANEL)) * 2, -(-k // K_GROUP), PANEL, K_GROUP


def words(a: np.ndarray) -> np.ndarray:
    """`a` (packed s8 weights, whose last axis is 4 bytes, or int32 column sums) as the float32 words of the
    f32 tensor that holds it (packed: (P, K4/4, 16, 1)), bytes unchanged."""
    return np.ascontiguousarray(a).view(np.float32)


@dataclass(frozen=True)
class Int8Matrix:
    """A quantized [M, K] weight matrix: `packed` s8 (P, K4/4, 16, 4), `scales` float32 [M] (sw), `colsums`
    int32 [M] (sum over k of the s8 weights)."""

    packed: np.ndarray
    scales: np.ndarray
    colsums: np.ndarray

    @property
    def m(self) -> int:
        return len(self.scales)


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An [M, ...] float matrix (K: the trailing axes in C order; for a convolution (ky, kx, c), as `Graph.gemm`
    reads windows: a PyTorch weight transposed by (0, 2, 3, 1)) -> (s8 quants [M, K], float32 scales [M])."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2 or not w.size:
        raise InputError(f"int8 quantize takes a non-empty matrix of 2 or more axes, got shape {w.shape}")
    w = w.reshape(len(w), -1)
    if not np.isfinite(w).all():
        raise InputError("int8 quantize: the weights hold a NaN or an infinity")
    scales = np.abs(w).max(axis=1) / np.float32(QMAX)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.rint(w / safe[:, None])
    return np.clip(q, -QMAX, QMAX).astype(np.int8), scales.astype(np.float32)


def pack(q: np.ndarray) -> np.ndarray:
    """s8 quants [M, K] -> the packed (P, K4/4, 16, 4) s8 array, zeros padding M and K."""
    q = np.asarray(q)
    if q.dtype != np.int8 or q.ndim != 2 or not q.size:
        raise InputError(f"int8 pack takes a non-empty int8 [M, K] matrix, got {q.dtype} {q.shape}")
    m, k = q.shape
    panels, groups, _, _ = shape = packed_shape(m, k)
    padded = np.zeros((panels * PANEL, groups * K_GROUP), np.int8)
    padded[:m, :k] = q
    return np.ascontiguousarray(padded.reshape(panels, PANEL, groups, K_GROUP).transpose(0, 2, 1, 3)).reshape(shape)


def quantize_matrix(w: np.ndarray) -> Int8Matrix:
    """`quantize` then `pack`, with each channel's column sum."""
    q, scales = quantize(w)
    return Int8Matrix(pack(q), scales, q.sum(axis=1, dtype=np.int32))

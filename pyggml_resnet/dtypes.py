"""The weight types a model file may store and a model may compute with: one table, in pure NumPy.

For each type: its name, its GGUF/ggml type code, its block (elements and bytes), the largest magnitude it
holds, and how a float32 array is encoded into its bytes and decoded back. The converter writes with it, the
loader reads with it, and the binding layer's `ggml.Type` takes its codes from it.

Encoding rounds exactly as `gguf.quants` (and so ggml's reference code) does: bf16 to nearest even with NaN
kept quiet, q8_0 with a per-32-block f16 scale max|x|/127 and values rounded half away from zero
(tests/test_ops.py compares the bytes). Decoding is vectorised NumPy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import InputError

_Q8_BLOCK = 32


@dataclass(frozen=True)
class DType:
    name: str  # as users spell it: "f32", "f16", "bf16", "q8_0"
    code: int  # GGUF's and ggml's type code
    block_size: int  # elements per block, along a row (the last NumPy axis)
    block_bytes: int
    max_abs: float | None  # beyond this a value would round to infinity (None: f32, which holds them all)
    host: type  # the NumPy dtype of `encode`'s result
    _encode: Callable[[np.ndarray], np.ndarray]
    _decode: Callable[[np.ndarray], np.ndarray]

    def nbytes(self, n: int) -> int:
        """Bytes of n elements (a multiple of block_size)."""
        return n // self.block_size * self.block_bytes

    def largest(self, array: np.ndarray) -> float:
        """The largest |value| of a float32 array, NaN if it holds one; 0 for f32 (which holds them all)."""
        return float(np.abs(array).max()) if self.max_abs is not None and array.size else 0.0

    def encode(self, array, fast: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """A float32 array (rows: its last axis, a multiple of block_size long) in this type's bytes: an array
        of `host` dtype (q8_0: [..., row bytes]). InputError if a value is out of range or a row does not
        fill whole blocks; the caller names the tensor.

        `fast` (the binding's `Type.encode` passes its C encoder) encodes checked, NaN-free, non-empty arrays
        of rows to the same bytes; NaN payloads are where C and this table part ways."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        largest = self.largest(array)
        if self.max_abs is not None and largest > self.max_abs:
            raise InputError(f"values up to {largest:g} do not fit {self.name.upper()}")
        if array.ndim and array.shape[-1] % self.block_size:
            raise InputError(f"{self.name} rows must be a multiple of {self.block_size} long, got {array.shape}")
        if fast is not None and array.ndim and array.size and not np.isnan(largest):
            return fast(array)
        return self._encode(array)

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Stored bytes (a flat uint8 array) -> flat float32 values."""
        return self._decode(raw)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), to nearest even, NaN kept quiet. No range check: a value beyond bf16's
    rounds to infinity (`BF16.encode` refuses those; `bf16_finite` finds them)."""
    n = a.view(np.uint32)
    if np.isnan(a).any():
        n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)  # quiet
    # To nearest even, in place on one uint32 temporary (models load through this: it is their hot loop). The
    # sum cannot wrap: a quieted NaN's low half is 0, and any other value is at most 0xFF800000.
    r = n >> 16
    r &= 1
    r += np.uint32(0x7FFF)
    r += n
    r >>= 16
    return r.astype(np.uint16)


def bf16_finite(bits: np.ndarray) -> bool:
    """Whether bf16 bits hold no infinity or NaN (an exponent of all ones)."""
    return bool(((bits & np.uint16(0x7F80)) != 0x7F80).all())


def _bf16_decode(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _q8_0_encode(a: np.ndarray) -> np.ndarray:
    blocks = a.reshape(-1, _Q8_BLOCK)
    m = np.abs(blocks)
    while m.shape[1] > 1:  # each block's max, by halving: NumPy reduces a 32-long last axis ~4x slower
        m = np.maximum(m[:, : m.shape[1] // 2], m[:, m.shape[1] // 2:])
    d = m / np.float32(127)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(1) / d
    inv[np.isinf(inv)] = 0  # d == 0, or so small that 1/d overflows: quants 0 (ggml's int8 cast of inf on x86)
    x = blocks * inv
    q = np.rint(x)
    tie = np.abs(x - q) == 0.5  # rint rounds halves to even; ggml rounds them away from zero
    if tie.any():
        q[tie] = (x + np.copysign(np.float32(0.5), x))[tie]  # exact: x is a half-integer
    raw = np.empty((len(blocks), 2 + _Q8_BLOCK), np.uint8)
    raw[:, :2] = d.astype(np.float16).view(np.uint8)
    raw[:, 2:] = q.astype(np.int8).view(np.uint8)
    return raw.reshape(*a.shape[:-1], a.shape[-1] // _Q8_BLOCK * (2 + _Q8_BLOCK))


def _q8_0_decode(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 2 + _Q8_BLOCK)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # an Inf scale times 0 gives NaN: the loader refuses it
        return (blocks[:, 2:].view(np.int8).astype(np.float32) * scale).reshape(-1)


F32 = DType("f32", 0, 1, 4, None, np.float32, lambda a: a, lambda raw: raw.view("<f4").astype(np.float32, copy=False))
F16 = DType("f16", 1, 1, 2, 65504.0, np.float16, lambda a: a.astype(np.float16),
            lambda raw: raw.view("<f2").astype(np.float32))
# bf16 keeps float32's exponent; a q8_0 block's scale max|x|/127 is stored as f16.
BF16 = DType("bf16", 30, 1, 2, 3.38e38, np.uint16, bf16_round, _bf16_decode)
Q8_0 = DType("q8_0", 8, _Q8_BLOCK, 2 + _Q8_BLOCK, 65504.0 * 127, np.uint8, _q8_0_encode, _q8_0_decode)

TYPES = (F32, F16, BF16, Q8_0)
# ggml's I8: the s8 quants of an int8 file's convolutions (docs/gguf.md), stored only: they reach the GEMM as
# raw words (int8.words), so I8 is not among the types a model computes with. `encode` takes quants that are
# already integers in -127..127 (int8.quantize makes them); `decode` gives them back as int8, not float32.
I8 = DType("int8", 24, 1, 1, 127.0, np.int8, lambda a: a.astype(np.int8), lambda raw: raw.view(np.int8))
BY_NAME = {t.name: t for t in TYPES}
BY_CODE = {t.code: t for t in TYPES}
STORED_BY_CODE = {**BY_CODE, I8.code: I8}  # what a model file may hold
NAMES = tuple(BY_NAME)  # "f32", "f16", "bf16", "q8_0"


def parse(name) -> DType:
    """The type called `name` (any case), or InputError."""
    if isinstance(name, DType):
        return name
    t = BY_NAME.get(str(name).lower())
    if t is None:
        raise InputError(f"unknown tensor type {name!r}; expected one of {', '.join(NAMES)}")
    return t

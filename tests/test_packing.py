"""The packed GEMM's weight layout (pyggml_resnet.packing): panels of 16 output channels, k-major, bf16's
k in pairs, rows scaled on the way; the products over it are tests/test_gemm.py's."""

import numpy as np
import pytest

from pyggml_resnet.errors import InputError
from pyggml_resnet.packing import GEMM_PATHS, K_GROUP, pack_matrix, packed_shape


def test_pack_matrix_layout():
    w = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    p = pack_matrix(w)
    assert p.shape == packed_shape(40, 3) == (4, 3, 16)  # M padded to 64: two pairs of 16-row panels
    assert p[1, 2, 5] == w[16 + 5, 2] and p[2, 0, 7] == w[39, 0]
    assert not p[2, :, 8:].any() and not p[3].any()
    for bad in (np.zeros(5, np.float32), np.zeros((0, 3), np.float32)):
        with pytest.raises(InputError):
            pack_matrix(bad)


@pytest.mark.parametrize("wtype", ["f32", "bf16"])
def test_pack_matrix_of_a_view_with_scale_and_out(wtype):
    """More axes are K's, read through any strides; scale multiplies rows as w * scale[:, None] does, bit for
    bit; out is filled in place (f32) and refused when it does not fit."""
    rng = np.random.default_rng(3)
    w4 = rng.standard_normal((40, 5, 3, 3), dtype=np.float32)
    view = w4.transpose(0, 2, 3, 1)  # a conv weight in (ky, kx, c) order, not contiguous
    matrix = np.ascontiguousarray(view).reshape(40, -1)
    scale = rng.standard_normal(40, dtype=np.float32)
    want = pack_matrix(matrix * scale[:, None], wtype)
    np.testing.assert_array_equal(pack_matrix(view, wtype, scale).view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(pack_matrix(view, wtype), pack_matrix(matrix, wtype))
    if wtype == "bf16":
        with pytest.raises(InputError, match="f32"):
            pack_matrix(view, wtype, out=np.empty_like(want))
        return
    out = np.full(want.shape, np.nan, np.float32)  # the padding rows must be written as zeros
    assert pack_matrix(view, wtype, scale, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    for bad in (np.empty(want.shape, np.float64), np.empty(want.shape[::-1], np.float32).T,
                np.empty((want.shape[0] - 2, *want.shape[1:]), np.float32)):
        with pytest.raises(InputError, match="out"):
            pack_matrix(view, wtype, out=bad)
    with pytest.raises(InputError, match="scale"):
        pack_matrix(view, wtype, scale[:-1])


def test_pack_matrix_bf16_layout():
    """bf16: K padded to even, each panel's k in pairs with a channel's two weights side by side."""
    w = np.arange(40 * 3, dtype=np.float32).reshape(40, 3) + 1
    p = pack_matrix(w, "bf16")
    assert p.shape == packed_shape(40, 3, "bf16") == (4, 4, 16)
    pairs = p.reshape(4, 2, 16, 2)  # (panel, k pair, channel, k in pair)
    assert pairs[1, 0, 5, 1] == w[16 + 5, 1] and pairs[1, 1, 5, 0] == w[16 + 5, 2] and pairs[2, 0, 7, 0] == w[39, 0]
    assert not pairs[:, 1, :, 1].any() and not pairs[2, :, 8:].any() and not pairs[3].any()


def test_every_path_multiplies_a_packed_type():
    """Each path's weight type has a K grouping, and a type without a packed path is refused by name."""
    assert set(GEMM_PATHS.values()) <= set(K_GROUP)
    for bad in ("q8_0", "f16", "int4"):
        with pytest.raises(InputError, match="packed GEMM takes"):
            packed_shape(32, 8, bad)


def test_bf16_packs_its_bits_in_place_as_encoding_the_f32_packing_would():
    """bf16 into `out` (the tensor's uint16 memory): rounded as it is packed, bit for bit what packing in
    float32 and then encoding gives (the load path before), the padding zeros included; beyond bf16's range
    a value becomes infinity, for the caller to find (dtypes.bf16_finite)."""
    from pyggml_resnet import dtypes

    rng = np.random.default_rng(5)
    w4 = rng.standard_normal((40, 5, 3, 3), dtype=np.float32)
    view = w4.transpose(0, 2, 3, 1)
    scale = rng.standard_normal(40, dtype=np.float32)
    rows = np.ascontiguousarray(view).reshape(40, -1) * scale[:, None]
    shape = packed_shape(40, 45, "bf16")
    padded = np.zeros((shape[0] * 16, shape[1]), np.float32)
    padded[:40, :45] = rows
    want = dtypes.BF16.encode(padded.reshape(shape[0], 16, shape[1] // 2, 2).transpose(0, 2, 1, 3)).reshape(shape)
    out = np.full(shape, 0xFFFF, np.uint16)
    assert pack_matrix(view, "bf16", scale, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert dtypes.bf16_finite(out)
    np.testing.assert_array_equal(pack_matrix(view, "bf16", scale), dtypes.BF16.decode(want).reshape(shape))
    huge = np.full((32, 2), 3.4e38, np.float32)
    assert not dtypes.bf16_finite(pack_matrix(huge, "bf16", out=np.empty(packed_shape(32, 2, "bf16"), np.uint16)))

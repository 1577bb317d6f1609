"""The weight-type table against gguf's own quantizers (the reference the converter always used) and
against ggml: encoding is byte for byte gguf.quants', decoding is its inverse as gguf.quants.dequantize
computes it, and the codes and block sizes are the compiled ggml's."""

import gguf
import numpy as np
import pytest

from pyggml_resnet import dtypes
from pyggml_resnet.errors import InputError
from pyggml_resnet.ggml import Type


def awkward_values(n_rows: int = 64, row: int = 96, seed: int = 0) -> np.ndarray:
    """Float32 rows that exercise the rounding: ties (bf16 halfway cases, q8_0 x.5 steps), both signs,
    zeros, all-zero blocks, denormals, values near each type's range, NaN payloads kept apart."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((n_rows, row)) * 10.0 ** rng.integers(-6, 4, (n_rows, 1))).astype(np.float32)
    bits = a.view(np.uint32)
    bits[0] = (bits[0] & 0xFFFF0000) | 0x8000  # exactly halfway between two bf16 values: ties to even
    bits[1] = (bits[1] & 0xFFFF0000) | 0x7FFF
    a[2, :32] = 0.0  # a q8_0 block of zeros (scale 0)
    a[3, :32] = np.arange(-16, 16) * np.float32(127 / 31)  # q8_0 values landing on x.5 after scaling
    a[4] = np.float32(1e-40)  # denormal
    a[5, ::2] = -a[5, ::2]
    a[6] = np.float32(60000.0)  # within f16's range
    return a


@pytest.mark.parametrize("t", dtypes.TYPES, ids=lambda t: t.name)
def test_encoding_is_gguf_quants_byte_for_byte(t):
    a = awkward_values()
    ours = t.encode(a)
    ref = gguf.quants.quantize(a, gguf.GGMLQuantizationType(t.code))
    assert ours.dtype == t.host
    assert ours.tobytes() == ref.tobytes()
    assert ours.nbytes == t.nbytes(a.size)


def test_bf16_keeps_nan_quiet_and_rounds_inf_and_signed_zero_as_gguf():
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7F800000, 0xFF800000, 0x80000000, 0x3F80FFFF,
                     0x3F818000, 0x3F808000], np.uint32)
    a = bits.view(np.float32)
    with np.errstate(invalid="ignore"):
        ref = gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16)
    assert dtypes.BF16._encode(a).tobytes() == ref.tobytes()  # NaNs bypass encode's range check only here
    assert np.all(np.isnan(dtypes.BF16.decode(dtypes.BF16._encode(a).view(np.uint8))[:3]))


@pytest.mark.parametrize("t", dtypes.TYPES, ids=lambda t: t.name)
def test_decoding_matches_gguf_dequantize(t):
    raw = np.ascontiguousarray(t.encode(awkward_values())).view(np.uint8).reshape(-1)
    ours = t.decode(raw)
    ref = gguf.quants.dequantize(raw.reshape(-1, t.block_bytes), gguf.GGMLQuantizationType(t.code))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, np.asarray(ref, np.float32).reshape(-1))


@pytest.mark.parametrize("t", [dtypes.F16, dtypes.BF16, dtypes.Q8_0], ids=lambda t: t.name)
def test_values_beyond_a_type_are_refused(t):
    a = np.zeros((2, 32), np.float32)
    a[1, 3] = np.float32(min(t.max_abs * 1.01, 3.4e38))
    with pytest.raises(InputError, match="do not fit"):
        t.encode(a)


def test_the_table_is_ggml_s_and_names_parse():
    assert dtypes.NAMES == ("f32", "f16", "bf16", "q8_0")
    for t in dtypes.TYPES:
        assert Type.parse(t.name).dtype is t and Type[t.name.upper()] == t.code
        assert dtypes.parse(t.name.upper()) is t
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.code)] == (t.block_size, t.block_bytes)
    with pytest.raises(InputError, match="unknown tensor type"):
        dtypes.parse("f64")
    with pytest.raises(InputError, match="multiple of 32"):
        dtypes.Q8_0.encode(np.zeros((2, 30), np.float32))

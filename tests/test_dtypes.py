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


def _encoders(types):
    """(type, encode) pairs: the table's NumPy encoder and the binding's, which uses ggml's C where it can."""
    return [pytest.param(t, enc, id=f"{t.name}-{name}") for t in types
            for name, enc in (("numpy", t.encode), ("ggml", Type(t.code).encode))]


@pytest.mark.parametrize("t, encode", _encoders(dtypes.TYPES))
def test_encoding_is_gguf_quants_byte_for_byte(t, encode):
    a = awkward_values()
    ours = encode(a)
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


@pytest.mark.parametrize("t, encode", _encoders([dtypes.F16, dtypes.BF16, dtypes.Q8_0]))
def test_values_beyond_a_type_are_refused(t, encode):
    a = np.zeros((2, 32), np.float32)
    a[1, 3] = np.float32(min(t.max_abs * 1.01, 3.4e38))
    with pytest.raises(InputError, match="do not fit"):
        encode(a)
    a[1, 3] = np.inf
    with pytest.raises(InputError, match="do not fit"):
        encode(a)
    if t.block_size > 1:
        with pytest.raises(InputError, match=f"multiple of {t.block_size}"):
            encode(np.zeros((2, t.block_size + 2), np.float32))


def _f16_edges() -> np.ndarray:
    """Every finite f16 value, the float32 exactly halfway to its successor (a tie: to even) and the float32s
    one ulp either side of that, signed zeros, f32 denormals, and random bit patterns within f16's range."""
    h = np.arange(0x7BFF, dtype=np.uint16).view(np.float16).astype(np.float32)  # 0 .. the last below 65504
    nxt = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mid = (h + nxt) / 2  # exact in float32
    edges = [h, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf)), nxt]
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 0x477FE000, 1 << 20, dtype=np.uint32)  # |x| <= 65504 (0x477FE000), denormals too
    a = np.concatenate(edges + [bits.view(np.float32), np.float32([0.0, 1e-45, 1e-40, 65504.0])])
    return np.concatenate([a, -a])


def test_f16_through_ggml_is_the_table_byte_for_byte():
    a = _f16_edges()
    ggml_bytes = Type.F16.encode(a)
    assert ggml_bytes.dtype == np.float16 and ggml_bytes.shape == a.shape
    assert ggml_bytes.tobytes() == dtypes.F16.encode(a).tobytes()


def test_nan_encodes_as_the_table_does():
    # NumPy keeps a NaN's payload and sign, the F16C instruction quiets it: NaN rows take the table's route.
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7FA00000, 0x3F800000], np.uint32)
    a = np.tile(bits.view(np.float32), 32).reshape(6, 32)
    with np.errstate(invalid="ignore"):
        for t in (dtypes.F16, dtypes.Q8_0):
            assert Type(t.code).encode(a).tobytes() == t.encode(a).tobytes()


def test_q8_0_through_ggml_is_the_table_byte_for_byte():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4096, 64)).astype(np.float32)
    a *= np.float32(10.0) ** rng.integers(-12, 7, (4096, 1)).astype(np.float32)  # scales from f16 denormal to 1e5
    a[0, :32] = 0.0  # an all-zero block: scale 0, quants 0
    a[1, :32] = np.arange(-16, 16) * np.float32(127 / 31)  # quants landing exactly on x.5: away from zero
    a[1, 32:] = -a[1, :32]
    a[2] = np.float32(65504.0 * 127)  # the largest scale f16 holds
    a[3, :32] = np.float32(1e-40)  # a denormal block
    a[4:68] = rng.integers(-126, 126, (64, 64)) + np.float32(0.5)  # a block max of 127: scale 1, every quant a tie
    a[4:68, ::32] = np.float32(127.0)
    ggml_bytes = Type.Q8_0.encode(a)
    assert ggml_bytes.dtype == np.uint8 and ggml_bytes.shape == (4096, 68)
    assert ggml_bytes.tobytes() == dtypes.Q8_0.encode(a).tobytes()
    assert Type.Q8_0.encode(a[:, :32].reshape(2, 2048, 32)).tobytes() == dtypes.Q8_0.encode(a[:, :32]).tobytes()


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


def test_bf16_and_f16_through_ggml_are_the_table_bit_for_bit():
    """Loading decodes f16 and bf16 and rounds to bf16 in ggml's C (Type.decode, ggml.bf16_bits): the same bits
    as the NumPy table for every f16 and bf16 pattern (infinities, subnormals; NaN stays NaN), and for float32 values
    between bf16's, ties, subnormals and NaN payloads included."""
    from pyggml_resnet.ggml import bf16_bits

    every = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    for t in (dtypes.F16, dtypes.BF16):
        ours, table = Type(t.code).decode(every), t.decode(every)
        # F16C quiets a signalling NaN's payload, NumPy keeps it: NaN either way, which the loader refuses.
        assert np.array_equal(np.isnan(ours), np.isnan(table))
        keep = ~np.isnan(table)
        np.testing.assert_array_equal(ours[keep].view(np.uint32), table[keep].view(np.uint32))
    rng = np.random.default_rng(7)
    a = np.concatenate([rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint32),
                        (np.arange(1 << 16, dtype=np.uint32) << 16) | 0x8000,  # exactly between two bf16 values
                        np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x00000001, 0x807FFFFF], np.uint32)])
    a = a.view(np.float32)
    np.testing.assert_array_equal(bf16_bits(a), dtypes.bf16_round(a))

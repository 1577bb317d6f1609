"""int8 calibration's ranges (convert/calibrate.py) for signed tensors: the stem's input and the downsamples'
outputs (the shortcuts), stored as asymmetric u8, checked against the quantization the op applies."""

import numpy as np
import pytest

from pyggml_resnet.convert import calibrate

F32 = np.float32


def round_trip(x, q):
    """x quantized as the int8 op quantizes (clamp(rint(x / scale) + zero, 0, 255)) and read back."""
    return (np.clip(np.rint(x / q.scale) + q.zero, 0, 255) - q.zero) * q.scale


def test_asymmetric_range_holds_zero_exactly_and_spans_the_range():
    q = calibrate.asymmetric(-1.0, 3.0)
    assert q.scale == F32(4 / 255) and q.zero == 64  # rint(1 / (4 / 255)) = rint(63.75)
    assert round_trip(np.array([0.0]), q)[0] == 0.0
    ends = round_trip(np.array([-1.0, 3.0]), q)
    assert np.all(np.abs(ends - [-1.0, 3.0]) <= q.scale / 2 + 1e-7)
    assert calibrate.asymmetric(0.5, 2.0) == calibrate.asymmetric(0.0, 2.0)  # widened to hold 0
    assert calibrate.asymmetric(0.0, 0.0).scale == 1.0  # a tensor of zeros: any scale


@pytest.fixture
def shortcut_values():
    """Values like a downsample's output: signed, mostly small, a few far out."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(20000).astype(F32)
    x[:10] *= 40
    return x


def test_signed_ranges_of_each_rule(shortcut_values):
    x = shortcut_values
    lo, hi = float(x.min()), float(x.max())
    minmax = calibrate.signed_quant(x, lo, hi, "minmax")
    assert minmax == calibrate.asymmetric(lo, hi)
    assert np.abs(round_trip(x, minmax) - x).max() <= minmax.scale / 2 + 1e-6  # nothing clipped
    pct = calibrate.signed_quant(x, lo, hi, "percentile")
    low, high = np.percentile(x, [100 - calibrate.PERCENTILE, calibrate.PERCENTILE])
    assert pct == calibrate.asymmetric(float(low), float(high)) and pct.scale < minmax.scale
    mse = calibrate.signed_quant(x, lo, hi, "mse")
    err = {name: float(np.square(round_trip(x, q) - x).mean()) for name, q in
           (("minmax", minmax), ("percentile", pct), ("mse", mse))}
    assert mse.scale < minmax.scale and err["mse"] < err["minmax"], err

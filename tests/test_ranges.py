"""Ranges: scales kept in a dtype that holds them. fp64 activations and weights far beyond
fp32's range quantize through int8 and FP8 (fp64 scales on the torch path, fp64's), or,
where a format keeps fp32 scales (FP8Weight), are refused with a ValueError; fp16 weights
with small rows keep their int8 scales (fp32), through Int8Linear.half() too; W8A8's int32
accumulator does not overflow at K = 133,145 (the first K where a single int32 sum can),
on every (device, backend)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparqle
from sparqle import FP8Weight, Int8Weight
from sparqle.formats.int4 import sqnr_db
from sparqle.nn import Int8Linear

from ._oracle import fp8_rows_rule, int8_rows_rule
from .conftest import device_backends

E4M3 = torch.float8_e4m3fn
FP64_EXPONENTS = st.integers(-300, 300)
BACKENDS = pytest.mark.parametrize("device,backend", device_backends(), ids=lambda p: str(p))


@settings(max_examples=20, deadline=None)
@given(exponent=FP64_EXPONENTS, fp8=st.booleans())
def test_fp64_activations_quantize_at_any_magnitude(exponent, fp8):
    """fp64 runs on the torch path: its scales are fp64, so x * 10^e quantizes as x does."""
    x = torch.randn(3, 50, dtype=torch.float64) * 10.0 ** exponent
    if fp8:
        q, scale = sparqle.fp8_quantize_rows(x, "e4m3")
        expected_q, expected_scale = fp8_rows_rule(x, E4M3)
        assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
    else:
        q, scale = sparqle.quantize_rows(x)
        expected_q, expected_scale = int8_rows_rule(x)
        assert torch.equal(q.double(), expected_q)
    assert scale.dtype == torch.float64 and torch.equal(scale, expected_scale)
    unit = 10.0 ** -exponent  # back to magnitude 1, where the SQNR's squares are finite
    assert sqnr_db(x * unit, q.double() * scale[:, None] * unit) >= 25


@settings(max_examples=20, deadline=None)
@given(exponent=FP64_EXPONENTS, fmt=st.sampled_from(["int8", "fp8"]))
def test_fp64_layers_at_any_magnitude(exponent, fmt):
    """An fp64 layer: weights and x scaled by 10^e. Int8Weight keeps fp64 scales; FP8Weight
    keeps fp32 ones, and refuses a weight whose scale fp32 cannot hold."""
    w = torch.randn(8, 64, dtype=torch.float64) * 10.0 ** exponent
    x = torch.randn(20, 64, dtype=torch.float64)  # M > 16: FP8 quantizes x too
    fp32_scales = (w.abs().amax(1) / torch.finfo(E4M3).max).float()  # what FP8Weight would keep
    if fmt == "fp8" and not (torch.isfinite(fp32_scales) & (fp32_scales > 0)).all():
        with pytest.raises(ValueError, match="outside float32's range"):
            FP8Weight.from_float(w)
        return
    qw = Int8Weight.from_float(w) if fmt == "int8" else FP8Weight.from_float(w)
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    unit = 10.0 ** -exponent  # back to magnitude 1, where the SQNR's squares are finite
    assert sqnr_db(w * unit, qw.dequantize() * unit) >= 25
    y = sparqle.linear(x * unit, qw)  # W8A8: x quantized too, at magnitude 10^-e
    assert sqnr_db(x @ (w * unit).T, y) >= 20


@settings(max_examples=10, deadline=None)
@given(exponent=st.integers(-7, 0))
def test_fp16_weights_keep_their_int8_scales(exponent):
    """Rows whose max is 10^e: an fp16 scale (max / 127) underflows below about 1e-5."""
    linear = nn.Linear(64, 8).half()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(8, 64) * 10.0 ** exponent)
        linear.bias.zero_()
    w = linear.weight.detach()
    qw = Int8Weight.from_float(w)
    assert qw.dtype == torch.float16 and qw.scales.dtype == torch.float32
    assert sqnr_db(w.double(), qw.dequantize().double()) >= 30
    layer = Int8Linear.from_linear(linear.float(), activation=None).half()  # .half() after convert
    assert layer.scales.dtype == torch.float32
    x = torch.randn(4, 64, dtype=torch.float16) * 1000  # y above fp16's subnormals at every e
    expected = x.double() @ w.double().T
    assert sqnr_db(expected, layer(x).double()) >= 30


@BACKENDS
def test_w8a8_does_not_overflow_int32(device, backend):
    """K = 133,145: 127 * 127 * K > 2^31 - 1, the int32 sum of a row of 127s."""
    k = 133_145
    x, w = torch.ones(1, k, device=device), Int8Weight.from_float(torch.ones(2, k)).to(device)
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, w)
    torch.testing.assert_close(y, torch.full((1, 2), float(k), device=device), rtol=1e-6, atol=0)

"""NaN and Inf in the activations reach the output of every weight op as they do through
F.linear on the dense (dequantized) weight, on every (device, backend): the same NaN, +Inf
and -Inf entries (inf * 0 is NaN, inf - inf is NaN), and the finite entries right. Sparse
formats multiply their stored entries only (as torch.sparse does): an Inf meets no weight
outside the pattern. The quantizers give a row holding a NaN scale NaN, one holding ±Inf
scale +Inf, and quantize NaN to 0, the same on every backend. Inputs are drawn by
hypothesis: where the NaN and Inf sit, and which weights are exactly zero."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparqle
from sparqle import CSR, BlockedELL, FP8Weight, Int4Weight, Int8Weight, SemiStructured
from sparqle.functional import fp8_training_linear

from ._oracle import assert_close, fp8_rows_rule, int8_rows_rule, random_sparse
from .conftest import device_backends

E4M3 = torch.float8_e4m3fn
FUZZ = settings(max_examples=8, deadline=None)
BACKENDS = pytest.mark.parametrize("device,backend", device_backends(), ids=lambda p: str(p))
FORMATS = ["int8", "int8-w8a16", "fp8", "int4", "nm", "csr", "bell"]
KINDS = {"nan": float("nan"), "+inf": float("inf"), "-inf": -float("inf")}


def nonfinite_x(data, m, k):
    """x [m, k] with NaN, +Inf or -Inf at a few drawn places (several in one row at times)."""
    x = torch.randn(m, k)
    for _ in range(data.draw(st.integers(1, 4), label="how many")):
        row, col = data.draw(st.integers(0, m - 1), label="row"), data.draw(st.integers(0, k - 1), label="col")
        x[row, col] = KINDS[data.draw(st.sampled_from(sorted(KINDS)), label="kind")]
    return x


def weight(fmt, w):
    """(format object, dense float64 W it multiplies by, stored-entry mask or None)."""
    if fmt.startswith("int8"):
        q = Int8Weight.from_float(w)
        return q, q.qweight.double() * q.scales.double()[:, None], None
    if fmt == "fp8":
        q = FP8Weight.from_float(w)
        return q, q.qweight.double() * q.scales.double()[:, None], None
    if fmt == "int4":
        q = Int4Weight.from_float(w, 32)
        return q, q.dequantize().double(), None
    if fmt == "nm":
        q = SemiStructured.from_dense(w)
        return q, q.to_dense().double(), None
    if fmt == "csr":
        q = CSR.from_dense(w)
        return q, w.double(), w != 0
    q = BlockedELL.from_dense(w, 16)
    ones = BlockedELL._trusted(ell_cols=q.ell_cols, values=torch.ones_like(q.values), shape=q.shape)
    return q, q.to_dense().double(), ones.to_dense() != 0  # every entry of the stored blocks


def pattern_oracle(x64, w64, b64, stored):
    """x @ W^T + b entry by entry in float64 (IEEE: inf * 0 and inf - inf are NaN), over
    the stored entries only when ``stored`` is given."""
    prod = x64[:, None, :] * w64[None, :, :]
    if stored is not None:
        prod = torch.where(stored[None], prod, torch.zeros_like(prod))
    return prod.sum(-1) + b64


def assert_same_nonfinite(y, expected, what):
    y = y.detach().double()
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = test(y), test(expected)
        assert torch.equal(got, want), (f"{what}: {name} at {got.nonzero().tolist()}, "
                                        f"expected at {want.nonzero().tolist()}")


@pytest.mark.parametrize("fmt", FORMATS)
@BACKENDS
@FUZZ
@given(data=st.data())
def test_linear_propagates_nan_and_inf_as_f_linear(fmt, device, backend, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    m = data.draw(st.integers(1, 20), label="M")  # fp8: M > 16 quantizes x, M <= 16 does not
    n, k = data.draw(st.integers(1, 12), label="N"), data.draw(st.integers(1, 24), label="K")
    w = random_sparse(n, k, 0.5, torch.float32) if fmt in ("csr", "bell") else torch.randn(n, k)
    if fmt not in ("csr", "bell", "nm"):
        w[torch.rand(n, k) < 0.2] = 0  # exact zeros: an Inf meeting one gives NaN
    q, w64, stored = weight(fmt, w)
    x, bias = nonfinite_x(data, m, k), torch.randn(n)
    with sparqle.use_backend(backend):
        y = (sparqle.int8_linear(x, q, bias, activation=None) if fmt == "int8-w8a16"
             else sparqle.linear(x, q, bias))
    b64 = bias.double()
    expected = pattern_oracle(x.double(), w64, b64, stored)
    assert_same_nonfinite(y, expected, fmt)
    # Finite entries: rows without NaN or Inf go through the quantized x where the op
    # quantizes it (their oracle), the others through x itself.
    finite_rows = torch.isfinite(x).all(1)
    if fmt == "int8":
        q_x, s_x = int8_rows_rule(x)
    elif fmt == "fp8" and m > 16:
        q_x, s_x = fp8_rows_rule(x, E4M3)
    else:
        q_x, s_x = x, torch.ones(m)
    x_used = torch.where(finite_rows[:, None], q_x.double() * s_x.double()[:, None], 0)
    values = torch.where(finite_rows[:, None], pattern_oracle(x_used, w64, b64, stored), expected)
    scale = pattern_oracle(torch.where(torch.isfinite(x), x, 0).double().abs(), w64.abs(), b64.abs(), stored)
    keep = torch.isfinite(expected)
    assert_close(y.detach()[keep], values[keep], scale[keep] + 1e-6, torch.float32, f"{fmt} finite entries")


@BACKENDS
@FUZZ
@given(data=st.data())
def test_fp8_training_gives_nonfinite_rows(device, backend, data):
    """FP8 training quantizes both operands: a row of x holding a NaN gives a NaN row, one
    holding ±Inf a row of NaN (an infinity has no FP8 scale: a documented limit, see
    docs/checks.md), and every other row is finite."""
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    m, n, k = (data.draw(st.integers(1, 8), label=s) for s in "MNK")
    x = nonfinite_x(data, m, k)
    with sparqle.use_backend(backend):
        y = fp8_training_linear(x, torch.randn(n, k), torch.randn(n))
    bad = ~torch.isfinite(x).all(1)
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()


@pytest.mark.parametrize("quantizer", ["int8", "e4m3", "e5m2"])
@BACKENDS
@FUZZ
@given(data=st.data())
def test_quantizers_flag_nonfinite_rows(quantizer, device, backend, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    m, k = data.draw(st.integers(1, 6), label="M"), data.draw(st.integers(1, 40), label="K")
    x = nonfinite_x(data, m, k) * 3
    static = torch.tensor([0.05]) if data.draw(st.booleans(), label="static") else None
    with sparqle.use_backend(backend):
        if quantizer == "int8":
            q, scale = sparqle.quantize_rows(x, static)
            expected_q, expected_scale = int8_rows_rule(x, static)
            assert torch.equal(q.float(), expected_q)
        else:
            q, scale = sparqle.fp8_quantize_rows(x, quantizer, static)
            expected_q, expected_scale = fp8_rows_rule(x, q.dtype, static)
            assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))
    torch.testing.assert_close(scale, expected_scale, rtol=0, atol=0, equal_nan=True)
    has_nan, has_inf = x.isnan().any(1), x.isinf().any(1)
    assert torch.equal(scale.isnan(), has_nan)
    if static is None:
        assert torch.equal(scale.isposinf(), has_inf & ~has_nan)
    else:
        assert torch.isfinite(q.float()).all()  # an infinity saturates


@pytest.mark.parametrize("quantizer,transposed", [("int8", False), ("e4m3", False), ("e4m3", True)])
@BACKENDS
def test_quantizers_flag_nonfinite_past_the_first_block(quantizer, transposed, device, backend):
    """Rows longer than the quantizer's block (K = 1100 > the interpreter's BLOCK_K = 1024,
    and 64 for FP8's column-wise kernel, which takes x with its rows as columns in memory):
    the first block is held in registers, the later ones are read twice (for the max, then
    to quantize); a NaN or an infinity in either gives the same scale and row as the rule."""
    x = torch.randn(5, 1100) * 3
    x[0, 1090], x[1, 1050], x[2, 3], x[2, 1080] = float("nan"), -float("inf"), float("inf"), float("nan")
    x[3, 1099] = 1e4  # the row's max past the first block
    if transposed:
        x = x.t().contiguous().t()
    for static in (None, torch.tensor([0.05])):
        with sparqle.use_backend(backend):
            if quantizer == "int8":
                q, scale = sparqle.quantize_rows(x.to(device), None if static is None else static.to(device))
                expected_q, expected_scale = int8_rows_rule(x, static)
                assert torch.equal(q.cpu().float(), expected_q)
            else:
                q, scale = sparqle.fp8_quantize_rows(x.to(device), quantizer,
                                                     None if static is None else static.to(device))
                expected_q, expected_scale = fp8_rows_rule(x, q.dtype, static)
                assert torch.equal(q.cpu().view(torch.uint8), expected_q.view(torch.uint8))
        torch.testing.assert_close(scale.cpu(), expected_scale, rtol=0, atol=0, equal_nan=True)
        assert scale[0].isnan() and scale[2].isnan() and (scale[1] == float("inf")) == (static is None)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_infinite_rows_found_without_host_reads_during_capture(fmt, monkeypatch):
    """While a CUDA graph is captured the torch path cannot look the rows up on the host:
    it recomputes every row and picks on the device, with the same result."""
    from sparqle.kernels import _capture
    x = torch.randn(20, 24)
    x[3, 5], x[7, 1], x[7, 2] = float("inf"), -float("inf"), float("nan")
    w = Int8Weight.from_float(torch.randn(8, 24)) if fmt == "int8" else FP8Weight.from_float(torch.randn(8, 24))
    with sparqle.use_backend("torch"):
        eager = sparqle.linear(x, w)
        monkeypatch.setattr(_capture, "capturing", lambda: True)
        monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("a host read"))
        captured = sparqle.linear(x, w)
    torch.testing.assert_close(captured, eager, rtol=0, atol=0, equal_nan=True)
    assert torch.isinf(eager[3]).any()

"""int8 linear layers (W8A8 and W8A16): quantization rules exactly, the op on every
(device, backend) against the float64 oracle of its quantized operands, SQNR against the
float layer, the quantizer's opcheck, the module, convert, and bad input (the contract of
int8_linear: gradients, gradcheck, opcheck, compile, state_dict: tests/test_contract.py)."""

import pytest
import torch
from torch import nn

import sparqle
from sparqle import Int8Weight
from sparqle.formats.int4 import sqnr_db
from sparqle.kernels.triton import int8_linear as int8_kernels
from sparqle.nn import Int8Linear

from ._oracle import assert_close
from ._oracle import int8_rows_rule as quantize_rows_rule
from .conftest import device_backends
from .test_fp8_linear import TMA_LAYOUTS, _operand, launch_flags

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_weight_quantization_rules():
    w = torch.randn(6, 50, dtype=torch.float64)
    w[3] = 0
    qw = Int8Weight.from_float(w)
    expected_scale = w.abs().amax(1) / 127
    expected_scale[3] = 1
    assert torch.equal(qw.scales, expected_scale) and qw.qweight.dtype == torch.int8
    assert torch.equal(qw.qweight.double(), torch.clamp(torch.round(w / qw.scales[:, None]), -127, 127))
    assert torch.equal(qw.dequantize(), qw.qweight.double() * qw.scales[:, None])
    assert (qw.qweight[3] == 0).all() and qw.qweight.abs().max() == 127


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k", [(1, 1), (7, 70), (3, 1030)])
def test_quantize_rows_is_exact(device_backend, dtype, m, k):
    device, backend = device_backend
    x = torch.randn(m, k, dtype=dtype, device=device) * 3
    x[0] = 0
    if k >= 3 and m > 1:  # scale 1 exactly: x / scale lands on ties, which round half to even
        x[-1] = 0
        x[-1, :3] = torch.tensor([127.0, 2.5, -3.5])
    with sparqle.use_backend(backend):
        q, scale = sparqle.quantize_rows(x)
        q_static, scale_static = sparqle.quantize_rows(x, torch.tensor([0.05], device=device))
    expected_q, expected_scale = quantize_rows_rule(x)
    assert q.dtype == torch.int8 and torch.equal(q.cpu().float(), expected_q)
    assert torch.equal(scale.cpu(), expected_scale)
    assert torch.equal(q_static.cpu().float(), torch.round(torch.clamp(x.float().cpu() / 0.05, -127, 127)))
    assert torch.equal(scale_static.cpu(), torch.full((m,), 0.05))


SHAPES = [(1, 1, 1), (1, 40, 70), (5, 33, 130), (17, 8, 256), (33, 19, 77)]


@pytest.mark.parametrize("m,n,k", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["dynamic", None])
def test_linear_matches_oracle(device_backend, m, n, k, dtype, activation):
    device, backend = device_backend
    qw = Int8Weight.from_float(torch.randn(n, k, dtype=dtype)).to(device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    bias = torch.randn(n, dtype=dtype, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.int8_linear(x, qw, bias, activation=activation)
    w64 = qw.qweight.double().cpu() * qw.scales.double().cpu()[:, None]
    b64 = bias.double().cpu()
    if activation == "dynamic":
        q, scale = quantize_rows_rule(x)
        x64 = q.double() * scale.double()[:, None]
    else:
        x64 = x.double().cpu()
    assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), dtype, "y")


@pytest.mark.parametrize("m,n,k", [(1, 40, 70), (5, 33, 130), (33, 19, 1030)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_smoothed_w8a8_quantizes_x_over_s_and_its_gradient_divides_by_s(device_backend, m, n, k, dtype):
    """smoothing s (SmoothQuant's divisor): the quantizer takes x / s, divided in fp32 (fp64
    for fp64 x) inside it, so y = quantize(x / s) @ W^T + bias exactly as the oracle
    quantizes x / s; a row holding Inf is recomputed from x / s; dx = dy @ W / s. K = 1030
    crosses a quantizer block, and s spans two orders of magnitude or more."""
    device, backend = device_backend
    qw = Int8Weight.from_float(torch.randn(n, k, dtype=dtype)).to(device)
    s = torch.exp(torch.randn(k)).to(device)   # so that y fits fp16
    x = (torch.randn(m, k, dtype=dtype) * 5).to(device)
    if m > 1:
        x[1, 3] = float("inf")
    bias = torch.randn(n, dtype=dtype, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.int8_linear(x, qw, bias, smoothing=s)
        xg = x.detach().clone().requires_grad_()
        dy = torch.randn(m, n, dtype=dtype, device=device)
        sparqle.int8_linear(xg, qw, bias, smoothing=s).backward(dy)
    w64, b64 = qw.qweight.double().cpu() * qw.scales.double().cpu()[:, None], bias.double().cpu()
    xs = (x.to(torch.float64 if dtype == torch.float64 else torch.float32) / s).cpu()
    q, scale = quantize_rows_rule(xs)
    x64 = q.double() * scale.double()[:, None]
    finite = torch.isfinite(scale)
    assert_close(y[finite.to(device)], (x64 @ w64.T + b64)[finite], (x64.abs() @ w64.abs().T + b64.abs())[finite],
                 dtype, "y")
    if m > 1:  # the row holding +Inf: F.linear's pattern of ±Inf and NaN (Inf * 0) on x / s
        expected = xs[1].double() @ w64.T + b64
        assert torch.equal(y[1].isnan().cpu(), expected.isnan()) and not bool(torch.isfinite(y[1]).any())
        assert torch.equal(y[1].cpu()[~expected.isnan()].double(), expected[~expected.isnan()])
    dy64 = dy.double().cpu()
    assert_close(xg.grad, dy64 @ w64 / s.double().cpu(), dy64.abs() @ w64.abs() / s.double().cpu(), dtype, "dx")


def test_smoothing_bad_input():
    qw = Int8Weight.from_float(torch.randn(8, 16))
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"smoothing must be a float32 \[16\] tensor"):
        sparqle.int8_linear(x, qw, smoothing=torch.ones(15))
    with pytest.raises(ValueError, match=r"smoothing must be a float32 \[16\] tensor"):
        sparqle.int8_linear(x, qw, smoothing=torch.ones(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="it needs quantize_activation"):
        sparqle.int8_linear(x, qw, activation=None, smoothing=torch.ones(16))
    with pytest.raises(TypeError, match="smoothing must be a torch.Tensor or None"):
        sparqle.int8_linear(x, qw, smoothing=[1.0] * 16)


@pytest.mark.parametrize("k,x_layout,w_layout", list(TMA_LAYOUTS), ids=str)
@pytest.mark.parametrize("activation", ["dynamic", None])
def test_linear_through_tma_and_through_pointers(monkeypatch, k, x_layout, w_layout, activation):
    """On every Triton device (the interpreter emulates TMA), the GEMM loads its operands
    (x, quantized or not, and the int8 weight) through TMA descriptors when both allow it,
    else through pointers, chosen per call; each way matches the oracle with M and N off
    every tile, W8A8 and W8A16 (bf16, whose K = 76 rows are not a multiple of 16 bytes
    either). W8A8 quantizes x into a fresh contiguous tensor: only the weight's layout and K
    decide there."""
    devices = [device for device, backend in device_backends() if backend == "triton"]
    if not devices:
        pytest.skip("no Triton backend here")
    used = launch_flags(monkeypatch, int8_kernels._int8_linear_kernel, "USE_TMA")
    for device in devices:
        x = _operand(37, k, torch.bfloat16, x_layout, device)
        qweight = _operand(21, k, torch.float32, w_layout, device).mul(40).round().clamp(-127, 127).to(torch.int8)
        if w_layout != "contiguous":  # the same values in the layout asked for
            qweight = _operand(21, k, torch.int8, w_layout, device).copy_(qweight)
        scales, bias = torch.rand(21, device=device) + 0.5, torch.randn(21, dtype=torch.bfloat16, device=device)
        with sparqle.use_backend("triton"):
            y = torch.ops.sparqle.int8_linear(x, qweight, scales, bias, activation == "dynamic")
        on_hopper = torch.device(device).type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)
        tma = on_hopper and (TMA_LAYOUTS[k, "contiguous" if activation else x_layout, w_layout])
        assert used.pop() == tma
        w64 = qweight.double().cpu() * scales.double().cpu()[:, None]
        b64 = bias.double().cpu()
        x64 = x.double().cpu()
        if activation == "dynamic":
            q, scale = quantize_rows_rule(x)
            x64 = q.double() * scale.double()[:, None]
        assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), torch.bfloat16, "y")


TRITON_DEVICES = [device for device, backend in device_backends() if backend == "triton"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,bias,smoothed", [(17, 8, 256, True, False), (24, 40, 72, False, True),
                                                 (33, 16, 8, True, True)], ids=str)
def test_int_mm_route_gives_the_triton_gemms_y(device, dtype, m, n, k, bias, smoothed):
    """W8A8 through torch._int_mm and sparqle's epilogue (what auto may pick on CUDA) gives
    the Triton GEMM's y bit for bit (both sum int8 products exactly in int32, then share one
    epilogue), and the oracle's: M past 16, N and K multiples of 8, with and without bias
    and smoothing, a row holding Inf and one holding NaN (recomputed as F.linear would)."""
    x = torch.randn(m, k, dtype=dtype, device=device)
    x[3, 5], x[7, 1] = float("inf"), float("nan")
    qw = Int8Weight.from_float(torch.randn(n, k, dtype=dtype)).to(device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    s = torch.rand(k, device=device) + 0.5 if smoothed else None
    assert int8_kernels.int_mm_takes(m, n, k)
    y = int8_kernels.int_mm_linear(x, qw.qweight, qw.scales, b, s)
    expected = int8_kernels.int8_linear(x, qw.qweight, qw.scales, b, True, s)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.nan_to_num(), expected.nan_to_num())
    finite = torch.ones(m, dtype=torch.bool)
    finite[[3, 7]] = False
    q, scale = quantize_rows_rule(x[finite].cpu() if s is None else x[finite].float().cpu() / s.cpu())  # / s in fp32
    w64 = qw.qweight.double().cpu() * qw.scales.double().cpu()[:, None]
    b64 = torch.zeros(n, dtype=torch.float64) if b is None else b.double().cpu()
    x64 = q.double() * scale.double()[:, None]
    assert_close(y[finite.to(device)], x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), dtype, "y")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,bias,smoothed", [(1, 40, 70, True, False), (7, 24, 1030, False, True),
                                                 (16, 33, 72, True, True), (5, 8, 1, False, False)], ids=str)
def test_fused_small_m_kernel_gives_the_three_launches_y(device, dtype, m, n, k, bias, smoothed):
    """W8A8 at M <= 16 in one launch (x quantized in the GEMM's registers; what auto may
    pick on CUDA) gives the quantizer + GEMM + ±Inf recompute's y bit for bit, and the
    oracle's: K past a quantizer block (1030), off every tile (70, 72) and 1, M from 1 to
    16, N off every tile, bias and smoothing, a row holding Inf and one holding NaN, x a
    strided view."""
    x = torch.randn(m, 2 * k, dtype=dtype, device=device)[:, ::2]
    if m > 3:
        x[1, 0], x[2, k - 1] = float("inf"), float("nan")
    qw = Int8Weight.from_float(torch.randn(n, k, dtype=dtype)).to(device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    s = torch.rand(k, device=device) + 0.5 if smoothed else None
    assert int8_kernels.fused_takes(m, k)
    y = int8_kernels.quantize_linear(x, qw.qweight, qw.scales, b, s)
    expected = int8_kernels.int8_linear(x, qw.qweight, qw.scales, b, True, s)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.nan_to_num(), expected.nan_to_num())
    finite = torch.ones(m, dtype=torch.bool)
    if m > 3:
        finite[[1, 2]] = False
        assert not bool(torch.isfinite(y[1]).any())
    q, scale = quantize_rows_rule(x[finite].cpu() if s is None else x[finite].float().cpu() / s.cpu())
    w64 = qw.qweight.double().cpu() * qw.scales.double().cpu()[:, None]
    b64 = torch.zeros(n, dtype=torch.float64) if b is None else b.double().cpu()
    x64 = q.double() * scale.double()[:, None]
    assert_close(y[finite.to(device)], x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), dtype, "y")


def test_fused_takes_every_row_in_one_block():
    assert int8_kernels.fused_takes(1, 8) and int8_kernels.fused_takes(16, 2 ** 17)
    for m, k in [(0, 8), (17, 8), (1, 2 ** 17 + 1)]:
        assert not int8_kernels.fused_takes(m, k), (m, k)


def test_int_mm_takes_what_cublaslt_takes():
    """cuBLASLt's int8 GEMM: M > 16, N and K multiples of 8, K short enough for an exact
    int32 sum."""
    assert int8_kernels.int_mm_takes(17, 8, 8)
    for m, n, k in [(16, 8, 8), (17, 12, 8), (17, 8, 12), (17, 8, 0), (17, 8, 2 ** 17 + 8)]:
        assert not int8_kernels.int_mm_takes(m, n, k), (m, n, k)


@pytest.mark.gpu
def test_auto_on_cuda_times_the_triton_gemm_and_its_alternative():
    """auto on CUDA times the Triton GEMM against the fused small-M kernel (M <= 16) or
    torch._int_mm (above) once per key, keeps the faster, and every call meets the oracle."""
    from sparqle.bindings import _fastest
    qw = Int8Weight.from_float(torch.randn(64, 96)).to("cuda")
    bias = torch.randn(64, device="cuda")
    for rows in (1, 16, 17, 300, 2048):
        x = torch.randn(rows, 96, device="cuda")
        for _ in range(2):
            y = sparqle.int8_linear(x, qw, bias, activation="dynamic")
            q, scale = quantize_rows_rule(x)
            x64 = q.double() * scale.double()[:, None]
            w64 = qw.qweight.double().cpu() * qw.scales.double().cpu()[:, None]
            assert_close(y, x64 @ w64.T + bias.double().cpu(), x64.abs() @ w64.abs().T + bias.double().cpu().abs(),
                         torch.float32, f"y (M={rows})")
        key = ("int8_linear", x.device, torch.float32, 1 << (rows - 1).bit_length(), 64, 96, True, False)
        assert _fastest._fastest[key] in ("triton", "fused" if rows <= 16 else "int_mm")


def test_sqnr_against_the_float_layer():
    w, x = torch.randn(256, 1024), torch.randn(64, 1024)
    qw = Int8Weight.from_float(w)
    assert sqnr_db(w, qw.dequantize()) >= 35
    assert sqnr_db(x @ w.T, sparqle.linear(x, qw)) >= 35


def test_opcheck_quantize_rows():
    """(int8_linear itself: tests/test_contract.py, with every other contract check.)"""
    x = torch.randn(5, 70)
    torch.library.opcheck(torch.ops.sparqle.int8_quantize_rows.default, (x, None))
    torch.library.opcheck(torch.ops.sparqle.int8_quantize_rows.default, (x, torch.ones(1)))


def test_module_and_convert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(8, 64)
    reference = model(x)
    sparqle.convert(model, "int8")
    assert all(isinstance(model[i], Int8Linear) for i in (0, 2)) and "activation=dynamic" in repr(model[0])
    assert sqnr_db(reference, model(x)) > 30
    weight_only = Int8Linear.from_linear(nn.Linear(64, 48), activation=None)
    assert weight_only(x).shape == (8, 48)


class TestBadInput:
    def test_from_float(self):
        with pytest.raises(ValueError, match="w must be 2-D"):
            Int8Weight.from_float(torch.randn(4, 4, 4))
        with pytest.raises(TypeError, match="w must be a floating-point tensor"):
            Int8Weight.from_float(torch.ones(4, 4, dtype=torch.int32))
        w = torch.randn(4, 8)
        w[1, 1] = float("nan")
        with pytest.raises(ValueError, match="w holds NaN or Inf"):
            Int8Weight.from_float(w)

    def test_constructor(self):
        with pytest.raises(TypeError, match="qweight must be int8"):
            Int8Weight(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4))
        with pytest.raises(ValueError, match=r"scales \[N\]"):
            Int8Weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5))

    def test_linear(self):
        qw = Int8Weight.from_float(torch.randn(8, 64))
        with pytest.raises(TypeError, match="x has dtype torch.int8"):
            sparqle.linear(torch.ones(2, 64, dtype=torch.int8), qw)
        with pytest.raises(ValueError, match="x must have w.shape"):
            sparqle.int8_linear(torch.randn(2, 63), qw)
        with pytest.raises(ValueError, match="activation must be 'dynamic' or None"):
            sparqle.int8_linear(torch.randn(2, 64), qw, activation="static")
        with pytest.raises(ValueError, match="activation must be one of"):
            Int8Linear(qw, activation="per-tensor")
        with pytest.raises(ValueError, match="static_scale must be a 1-element tensor"):
            sparqle.quantize_rows(torch.randn(2, 64), torch.ones(2))

    def test_triton_takes_no_float64(self):
        if not any(b == "triton" for _, b in device_backends()):
            return
        qw = Int8Weight.from_float(torch.randn(8, 64, dtype=torch.float64))
        with sparqle.use_backend("triton"):
            with pytest.raises(ValueError, match="not torch.float64"):
                sparqle.linear(torch.randn(2, 64, dtype=torch.float64), qw)

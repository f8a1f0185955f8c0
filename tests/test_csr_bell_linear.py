"""sparqle::csr_linear and sparqle::bell_linear through ``sparqle.linear(x, w, bias)``: one
op call, x @ W^T + bias with the bias fused, one row or none, empty rows and block-rows, an
all-zero weight; y and the gradients in x, the stored values and the bias against float64
autograd through the dense W, on every (device, backend) that runs here. check_linear and
the layouts serve tests/test_cupy.py, which runs every pair of x and bias layouts on CuPy
(on the other backends: tests/test_contract.py)."""
import copy

import pytest
import torch

import sparqle
from sparqle import CSR, BlockedELL

from ._oracle import assert_close, random_sparse

# How x [M, k] is laid out: its own rows, a transposed copy's view (x^T contiguous, as
# sparqle.spmm passes b^T), every other column of a wider tensor, one row expanded.
X_LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
# How bias [m] is laid out, or None.
BIAS_LAYOUTS = (None, "contiguous", "strided", "expanded")


def laid_out_x(rows: int, k: int, layout: str, dtype, device) -> torch.Tensor:
    """A fresh random x [rows, k] in ``layout``, a leaf that requires grad (its view in the
    strided layouts: the gradient is asked of the view)."""
    if layout == "contiguous":
        return torch.randn(rows, k, dtype=dtype, device=device, requires_grad=True)
    if layout == "transposed":
        return torch.randn(k, rows, dtype=dtype, device=device, requires_grad=True).t()
    if layout == "strided":
        return torch.randn(rows, 2 * k, dtype=dtype, device=device, requires_grad=True)[:, ::2]
    return torch.randn(1, k, dtype=dtype, device=device, requires_grad=True).expand(rows, k)


def laid_out_bias(m: int, layout, dtype, device):
    """A fresh random bias [m] in ``layout`` that requires grad, or None."""
    if layout is None:
        return None
    if layout == "contiguous":
        return torch.randn(m, dtype=dtype, device=device, requires_grad=True)
    if layout == "strided":
        return torch.randn(2 * m, dtype=dtype, device=device, requires_grad=True)[::2]
    return torch.randn(1, dtype=dtype, device=device, requires_grad=True).expand(m)


def check_linear(w, x: torch.Tensor, bias, backend: str) -> None:
    """y = sparqle.linear(x, w, bias) on ``backend``, then dx, d(w.values) and dbias for a
    fresh random dy, each against float64 autograd through the dense W (zero where W
    stores nothing), to within the dtype's rounding of the sums of magnitudes."""
    dtype = x.dtype
    values = w.values.detach().clone().requires_grad_(True)
    w = copy.copy(w)
    w.values = values
    leaves = [x, values] + ([] if bias is None else [bias])
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, w, bias)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, leaves, dy)
    assert y.is_contiguous()

    def dense(v):
        w64 = copy.copy(w)
        w64.values = v
        return w64.to(device="cpu").to_dense()

    x64, v64 = x.detach().double().cpu().requires_grad_(True), values.detach().double().cpu().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().cpu().requires_grad_(True)
    y64 = x64 @ dense(v64).T + (0 if b64 is None else b64)
    dy64 = dy.double().cpu()
    expected = torch.autograd.grad(y64, [x64, v64] + ([] if b64 is None else [b64]), dy64)
    # Scales: the same sums over magnitudes (W is linear in its values).
    ones = torch.ones_like(v64, requires_grad=True)
    w_abs = dense(v64.detach().abs())
    scale_y = x64.detach().abs() @ w_abs.T + (0 if b64 is None else b64.detach().abs())
    (scale_values,) = torch.autograd.grad(x64.detach().abs() @ dense(ones).T, ones, dy64.abs())
    scales = [dy64.abs() @ w_abs, scale_values, dy64.abs().sum(0)]
    assert_close(y, y64, scale_y, dtype, "y")
    for name, g, e, scale in zip(("dx", "dvalues", "dbias"), got, expected, scales):
        assert_close(g, e, scale, dtype, name)


# format -> W [m, k] in it from a dense tensor (Blocked-ELL: 16 x 16 blocks, kept where any
# entry is nonzero, so a random pattern keeps most blocks and zeros inside them).
FORMATS = {"csr": CSR.from_dense, "bell": lambda dense: BlockedELL.from_dense(dense, 16)}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_linear_with_empty_rows_and_block_rows(device_backend, fmt):
    """Rows 0-15 and 36 of W empty (empty CSR rows, an empty block-row), x transposed, the
    bias strided. (Every layout of x and bias, for every op: tests/test_contract.py; every
    pair of them on CuPy: tests/test_cupy.py.)"""
    device, backend = device_backend
    w = FORMATS[fmt](random_sparse(37, 40, 0.3, torch.float32, device, empty_rows=(*range(16), 36)))
    x = laid_out_x(6, 40, "transposed", torch.float32, device)
    check_linear(w, x, laid_out_bias(37, "strided", torch.float32, device), backend)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("density", [0.0, 0.5])
def test_linear_one_or_no_row_and_all_zero_weight(device_backend, fmt, rows, density):
    device, backend = device_backend
    w = FORMATS[fmt](random_sparse(20, 35, density, torch.float64, device))
    check_linear(w, laid_out_x(rows, 35, "contiguous", torch.float64, device),
                 laid_out_bias(20, "contiguous", torch.float64, device), backend)

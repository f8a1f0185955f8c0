"""The checks the CSR and Blocked-ELL op tests share: ``sparqle.linear(x, w, bias)`` is
x @ W^T + bias with the bias fused into the op, and its gradients in x, the stored values
and the bias are float64 autograd's through the dense W, for x and bias in any layout."""
import copy

import torch

import sparqle

from ._oracle import assert_close

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

"""sparqle.spmm / sparqle.linear on Blocked-ELL weights, and the ops behind them, on every
(device, backend) that can run here, against float64 dense oracles."""
import pytest
import torch

import sparqle
from sparqle import BlockedELL

from ._oracle import assert_close

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (m, k, n, block, block density): sizes off the block, one row, n of 1, all-zero, dense.
SHAPES = [
    (1, 1, 1, 16, 1.0),
    (37, 50, 19, 16, 0.5),
    (64, 33, 1, 16, 0.4),
    (40, 70, 21, 32, 0.5),
    (19, 21, 13, 16, 0.0),
    (48, 48, 17, 16, 1.0),
    (70, 130, 9, 64, 0.6),
]


def block_sparse(m, k, b, density, dtype=torch.float64, device="cpu", empty_block_rows=(0,)):
    """A dense [m, k] tensor whose b x b blocks are nonzero with probability ``density``,
    with the block-rows in ``empty_block_rows`` all zero."""
    rows, cols = -(-m // b), -(-k // b)
    keep = torch.rand(rows, cols) < density
    for r in empty_block_rows:
        if rows > 2:
            keep[r] = False
    mask = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:m, :k]
    return (torch.randn(m, k, dtype=torch.float64) * mask).to(device=device, dtype=dtype)


def _operands(m, k, b, density, dtype, device):
    w = block_sparse(m, k, b, density, dtype)
    a = BlockedELL.from_dense(w.to(device), block_size=b)
    return a, w.double()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spmm_and_linear_match_oracle(device_backend, shape, dtype):
    device, backend = device_backend
    m, k, n, b, density = shape
    a, w64 = _operands(m, k, b, density, dtype, device)
    rhs = torch.randn(k, n, dtype=dtype, device=device)
    x = torch.randn(n, k, dtype=dtype, device=device)
    with sparqle.use_backend(backend):
        c = sparqle.spmm(a, rhs)
        y = sparqle.linear(x, a)
    rhs64, x64 = rhs.double().cpu(), x.double().cpu()
    assert_close(c, w64 @ rhs64, w64.abs() @ rhs64.abs(), dtype, "C")
    assert c.is_contiguous()
    assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, dtype, "y")


@pytest.mark.parametrize("m,k,n", [(0, 20, 3), (20, 0, 3), (20, 17, 0)])
def test_empty_dimensions(device_backend, m, k, n):
    device, backend = device_backend
    a = BlockedELL.from_dense(torch.zeros(m, k, device=device), block_size=16)
    with sparqle.use_backend(backend):
        c = sparqle.spmm(a, torch.randn(k, n, device=device))
    assert c.shape == (m, n) and (c == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,b,density", [(1, 20, 1, 16, 1.0), (37, 50, 23, 16, 0.5),
                                             (40, 70, 9, 32, 0.6)])
def test_linear_gradients_match_oracle(device_backend, dtype, m, k, n, b, density):
    """y = x @ W^T + bias: dx, dvalues (zero at unused slots), dbias against float64 autograd."""
    device, backend = device_backend
    a, _ = _operands(m, k, b, density, dtype, device)
    a.values.requires_grad_(True)
    x = torch.randn(2, n, k, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(m, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(2, n, m, dtype=dtype, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, a, bias)
        y.backward(dy)

    values64 = a.values.detach().double().cpu().requires_grad_(True)
    w64 = BlockedELL._trusted(a.ell_cols.cpu(), values64, a.shape).to_dense()
    x64 = x.detach().double().cpu().requires_grad_(True)
    b64 = bias.detach().double().cpu().requires_grad_(True)
    y64 = x64 @ w64.T + b64
    dy64 = dy.double().cpu()
    y64.backward(dy64)
    assert_close(y, y64, x64.abs() @ w64.abs().T + b64.abs(), dtype, "y")
    assert_close(x.grad, x64.grad, dy64.abs() @ w64.abs(), dtype, "dx")
    unused = (a.ell_cols.cpu() < 0)[..., None, None]
    expected = values64.grad.masked_fill(unused, 0)
    scale = _blocks_at(dy64.abs().reshape(-1, m).T @ x64.abs().reshape(-1, k), a.ell_cols.cpu(), b)
    assert_close(a.values.grad, expected, scale, dtype, "dvalues")
    assert (a.values.grad.cpu()[unused.expand_as(a.values.grad.cpu())] == 0).all()
    assert_close(bias.grad, b64.grad, dy64.abs().sum((0, 1)), dtype, "dbias")


def _blocks_at(dense, ell_cols, b):
    """The b x b blocks of ``dense`` at the slots of ``ell_cols`` ([R, W, b, b], zero-padded)."""
    m, k = dense.shape
    rows, cols = -(-m // b), -(-k // b)
    padded = torch.nn.functional.pad(dense, (0, cols * b - k, 0, rows * b - m))
    blocks = padded.view(rows, b, cols, b).permute(0, 2, 1, 3)
    return blocks[torch.arange(rows)[:, None], ell_cols.clamp(min=0).long()]


def test_gradcheck_float64(device_backend):
    """fast_mode (random projections of the Jacobian): the interpreter is too slow for one
    forward per input element."""
    device, backend = device_backend
    a, _ = _operands(20, 35, 16, 0.6, torch.float64, device)
    x = torch.randn(3, 35, dtype=torch.float64, device=device, requires_grad=True)
    values = a.values.clone().requires_grad_(True)
    t = a.transposed_structure()

    def f(values, x):
        return sparqle.linear(x, BlockedELL._trusted(a.ell_cols, values, a.shape, t))

    with sparqle.use_backend(backend):
        assert torch.autograd.gradcheck(f, (values, x), fast_mode=True)


def test_unused_slots_are_skipped_whatever_they_hold(device_backend):
    device, backend = device_backend
    a, w64 = _operands(40, 50, 16, 0.5, torch.float32, device)
    garbage = a.values.clone()
    garbage[a.ell_cols < 0] = float("nan")
    poisoned = BlockedELL._trusted(a.ell_cols, garbage, a.shape)
    x = torch.randn(5, 50, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, poisoned)
    x64 = x.double().cpu()
    assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, torch.float32, "y")


def test_opcheck():
    a, _ = _operands(37, 50, 16, 0.5, torch.float64, "cpu")
    t_cols, t_slots = a.transposed_structure()
    x = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    values = a.values.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.sparqle.spmm_bell.default, (a.ell_cols, values, t_cols, t_slots, x, 37))
    dy = torch.randn(6, 37, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparqle.spmm_bell_t.default, (t_cols, t_slots, a.values, dy, 50))
    torch.library.opcheck(torch.ops.sparqle.sddmm_bell.default, (a.ell_cols, dy, x.detach(), 16))


def test_compile_fullgraph_linear_forward_and_backward():
    a, _ = _operands(40, 36, 16, 0.6, torch.float32, "cpu")
    a.values.requires_grad_(True)
    a.transposed_structure()

    def f(x):
        return torch.nn.functional.gelu(sparqle.linear(x, a)).sum()

    x = torch.randn(3, 36, requires_grad=True)
    expected = f(x)
    (dx_expected,) = torch.autograd.grad(expected, x)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x)
    (dx_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_got, dx_expected, rtol=1e-5, atol=1e-5)


def test_tf32_only_when_asked():
    """fp32 inputs keep full precision unless torch's matmul precision allows TF32."""
    from sparqle.kernels.triton._config import dot_meta
    assert dot_meta(torch.float32)["PRECISION"] == "ieee"
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert dot_meta(torch.float32)["PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)


class TestBadInput:
    def setup_method(self):
        self.a, _ = _operands(40, 50, 16, 0.5, torch.float32, "cpu")

    def test_shapes_dtypes_devices(self):
        with pytest.raises(ValueError, match="b must have a.shape"):
            sparqle.spmm(self.a, torch.randn(49, 3))
        with pytest.raises(ValueError, match="x must have w.shape"):
            sparqle.linear(torch.randn(2, 49), self.a)
        with pytest.raises(TypeError, match="x has dtype torch.float16"):
            sparqle.linear(torch.randn(2, 50, dtype=torch.float16), self.a)
        with pytest.raises(ValueError, match="x is on meta"):
            sparqle.linear(torch.randn(2, 50, device="meta"), self.a)

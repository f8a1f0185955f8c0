"""sparqle.spmm / sparqle.linear on Blocked-ELL weights, and the ops behind them, on every
(device, backend) that can run here, against float64 dense oracles: every block size at
shapes off the block, gradients, A^T's structure (exact and bound), unused slots, the
gradient ops' opcheck, TF32, bad input (the contract of bell_linear: gradcheck, opcheck,
compile, state_dict: tests/test_contract.py)."""
import pytest
import torch

import sparqle
from sparqle import BlockedELL
from sparqle.formats._checks import cdiv
from sparqle.formats.bell import transposed_structure
from sparqle.kernels import _derived

from ._oracle import assert_close
from .conftest import device_backends

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
    rows, cols = cdiv(m, b), cdiv(k, b)
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
    w64 = BlockedELL._trusted(ell_cols=a.ell_cols.cpu(), values=values64, shape=a.shape).to_dense()
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
    rows, cols = cdiv(m, b), cdiv(k, b)
    padded = torch.nn.functional.pad(dense, (0, cols * b - k, 0, rows * b - m))
    blocks = padded.view(rows, b, cols, b).permute(0, 2, 1, 3)
    return blocks[torch.arange(rows)[:, None], ell_cols.clamp(min=0).long()]


def test_transposed_structure_exact_when_eager_and_kept(device_backend):
    """Eager, the backward builds A^T's structure at its exact width once and keeps it (the
    format's transposed_structure()); the bound width, used where no host sync is allowed,
    holds the same slots first and unused ones after."""
    device, backend = device_backend
    a, _ = _operands(70, 40, 16, 0.4, torch.float32, device)
    x = torch.randn(3, 40, device=device, requires_grad=True)
    key = (id(a.ell_cols), "bell_transposed_exact")
    with sparqle.use_backend(backend):
        sparqle.linear(x, a).sum().backward()
        first = _derived._kept[key][2]
        sparqle.linear(x, a).sum().backward()
    assert _derived._kept[key][2] is first
    exact = a.transposed_structure()
    bound = transposed_structure(a.ell_cols, 3, exact=False)
    width = exact[0].shape[1]
    assert width < a.ell_cols.shape[0] and all(t.shape == (3, a.ell_cols.shape[0]) for t in bound)
    for kept, e, b in zip(first, exact, bound):
        assert torch.equal(kept, e) and torch.equal(b[:, :width], e) and (b[:, width:] == -1).all()


def test_captured_backward_takes_the_structure_kept_eagerly(monkeypatch):
    """While a CUDA graph is captured (no host read allowed) the backward takes the exact
    structure an eager call kept (a warm-up before capture), not a bound one rebuilt in the
    graph; with none kept, the bound one. (Capture is simulated: this is the CPU.)"""
    from sparqle.bindings.spmm_bell import _transposed
    from sparqle.kernels import _capture
    a, _ = _operands(70, 40, 16, 0.4, torch.float32, "cpu")
    fresh, _ = _operands(70, 40, 16, 0.4, torch.float32, "cpu")
    warm = _transposed(a.ell_cols, 40, 16)
    monkeypatch.setattr(_capture, "capturing", lambda: True)
    assert _transposed(a.ell_cols, 40, 16) is warm
    bound = _transposed(fresh.ell_cols, 40, 16)
    assert bound[0].shape == (3, fresh.ell_cols.shape[0])
    assert (id(fresh.ell_cols), "bell_transposed_bound") not in _derived._kept  # made in capture: not kept


def test_bound_width_gives_the_same_gradient(device_backend):
    """bell_matmul over the bound-width structure (as compiled or captured code gets it)
    equals the exact one's: the unused slots are skipped."""
    device, backend = device_backend
    a, w64 = _operands(70, 40, 16, 0.4, torch.float64, device)
    dy = torch.randn(5, 70, dtype=torch.float64, device=device)
    with sparqle.use_backend(backend):
        exact, bound = (torch.ops.sparqle.bell_matmul(dy, *transposed_structure(a.ell_cols, 3, e), a.values, 40)
                        for e in (True, False))
    torch.testing.assert_close(bound, exact, rtol=0, atol=0)
    dy64 = dy.double().cpu()
    assert_close(exact, dy64 @ w64, dy64.abs() @ w64.abs(), torch.float64, "dy @ A")


def test_unused_slots_are_skipped_whatever_they_hold(device_backend):
    device, backend = device_backend
    a, w64 = _operands(40, 50, 16, 0.5, torch.float32, device)
    garbage = a.values.clone()
    garbage[a.ell_cols < 0] = float("nan")
    poisoned = BlockedELL._trusted(ell_cols=a.ell_cols, values=garbage, shape=a.shape)
    x = torch.randn(5, 50, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, poisoned)
    x64 = x.double().cpu()
    assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, torch.float32, "y")


def test_holes_and_rows_of_every_width_match_the_oracle_and_the_schedule_is_kept(device_backend):
    """Block-rows of 0 to W stored blocks, some with unused slots before used ones (a
    layout from_dense never makes, which the constructor accepts): each block-row's loop
    runs to its last used slot, in the schedule derived once per ell_cols and kept; with
    a bias, forward and dx (A^T's structure, at its exact and bound widths)."""
    device, backend = device_backend
    b, k = 16, 90
    ell_cols = torch.tensor([[-1, 4, -1, 0], [-1, -1, -1, -1], [0, 1, 2, 5], [3, -1, -1, -1], [-1, -1, -1, 2]],
                            dtype=torch.int32)
    a = BlockedELL(ell_cols, torch.randn(5, 4, b, b, dtype=torch.float64), (70, k)).to(device)
    w64 = a.to_dense().cpu()
    x, bias = torch.randn(9, k, dtype=torch.float64, device=device), torch.randn(70, dtype=torch.float64, device=device)
    dy = torch.randn(9, 70, dtype=torch.float64, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, a, bias)
        again = sparqle.linear(x, a, bias)
        dx = [torch.ops.sparqle.bell_matmul(dy, *transposed_structure(a.ell_cols, cdiv(k, b), e), a.values, k)
              for e in (True, False)]
    x64, b64, dy64 = x.cpu(), bias.cpu(), dy.cpu()
    assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), torch.float64, "y")
    torch.testing.assert_close(again, y, rtol=0, atol=0)
    for d in dx:
        assert_close(d, dy64 @ w64, dy64.abs() @ w64.abs(), torch.float64, "dx")
    kept = _derived.kept("bell_row_schedule", a.ell_cols)
    assert (kept is not None) == (backend == "triton")
    if kept is not None:
        assert kept[1].tolist() == [4, 0, 4, 1, 4] and kept[0].tolist() == [0, 2, 4, 3, 1]


@pytest.mark.parametrize("device", [device for device, backend in device_backends() if backend == "triton"])
def test_tile_counter_is_left_zero_for_the_next_call(device):
    """The persistent kernel (Triton's) takes its tiles from one counter per stream, zero
    between calls with no memset (the program drawing the last ticket resets it): calls of
    different tile counts and grids in turn, the forward and dx, each right, the counter
    zero after each."""
    backend = "triton"
    from sparqle.kernels.triton.spmm_bell import _tile_counter
    for m, k, n, b in [(37, 50, 19, 16), (70, 130, 1, 64), (20, 17, 40, 16), (37, 50, 19, 16)]:
        a, w64 = _operands(m, k, b, 0.6, torch.float32, device)
        x, dy = torch.randn(n, k, device=device), torch.randn(n, m, device=device)
        with sparqle.use_backend(backend):
            y = sparqle.linear(x, a)
            assert _tile_counter(torch.device(device)).item() == 0
            dx = torch.ops.sparqle.bell_matmul(dy, *a.transposed_structure(), a.values, k)
            assert _tile_counter(torch.device(device)).item() == 0
        x64, dy64 = x.double().cpu(), dy.double().cpu()
        assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, torch.float32, "y")
        assert_close(dx, dy64 @ w64, dy64.abs() @ w64.abs(), torch.float32, "dx")


def test_tile_counter_made_in_capture_is_not_kept(monkeypatch):
    """While a CUDA graph is captured, a stream's first counter is made for that call
    only (it would live in the graph's pool); one kept by an eager call is reused.
    (Capture is simulated: this is the CPU.)"""
    from sparqle.kernels.triton import spmm_bell
    monkeypatch.setattr(spmm_bell, "_TILE_COUNTERS", {})
    monkeypatch.setattr(spmm_bell, "capturing", lambda: True)
    cpu = torch.device("cpu")
    made = spmm_bell._tile_counter(cpu)
    assert made.tolist() == [0] and spmm_bell._TILE_COUNTERS == {}
    monkeypatch.setattr(spmm_bell, "capturing", lambda: False)
    kept = spmm_bell._tile_counter(cpu)
    assert kept is not made and spmm_bell._tile_counter(cpu) is kept
    monkeypatch.setattr(spmm_bell, "capturing", lambda: True)
    assert spmm_bell._tile_counter(cpu) is kept


def test_opcheck_gradient_ops():
    """(bell_linear itself: tests/test_contract.py, with every other contract check.)"""
    a, _ = _operands(37, 50, 16, 0.5, torch.float64, "cpu")
    t_cols, t_slots = a.transposed_structure()
    x, dy = torch.randn(6, 50, dtype=torch.float64), torch.randn(6, 37, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparqle.bell_matmul.default, (dy, t_cols, t_slots, a.values, 50))
    torch.library.opcheck(torch.ops.sparqle.sddmm_bell.default, (a.ell_cols, dy, x, 16))


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

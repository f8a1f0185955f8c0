"""No host synchronisation in any op a user would capture in a CUDA graph (issue 13), forward
and backward, checked on the CPU: capture is simulated (``sparqle.kernels._capture.capturing``
returns True) and, while the op runs, every Tensor method or torch function that reads
tensor values on the host raises ``HostRead``: item, tolist, bool / int / float / index of a
tensor, cpu, numpy, equal, nonzero, unique, masked_select, bincount, boolean-mask indexing,
repeat_interleave without output_size, torch.cuda.synchronize.

Triton runs interpreted, through the launchers and bindings that CUDA tensors take; the torch
path is checked in float64, the dtype for which ``auto`` takes it on CUDA (CSR and
Blocked-ELL run Triton in every dtype). Formats and modules are built before the simulated
capture, as a user builds them before capturing; the results must equal an eager run's.
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

import sparqle
from sparqle import CSR, BlockedELL, FP8Weight, Int4Weight, Int8Weight, SemiStructured
from sparqle.kernels import _capture
from sparqle.nn import FP8Linear, Int4Linear, Int8Linear, SparseLinear, SparseWindowBlock, WindowAttention

from sparqle.bench import swin_reference as swin

from .test_window_modules import reference_block

# Tensor methods, and torch functions, whose result is read on the host.
HOST_READ_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
                     "equal", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount")
HOST_READ_FUNCTIONS = ("equal", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount")


class HostRead(AssertionError):
    """A read of tensor values on the host: a device synchronisation, which capture forbids."""


def _refuse(name):
    def refuse(*args, **kwargs):
        raise HostRead(name)
    return refuse


def _mask_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts)


@pytest.fixture
def no_host_reads(monkeypatch):
    """A context manager: inside it capture is simulated and every host read raises HostRead."""

    # Dynamo maps torch's functions to its rules once, on first use, by name: were that done
    # while they are patched here, a later torch.compile would refuse the real ones.
    torch._dynamo.trace_rules.get_torch_obj_rule_map()

    @contextlib.contextmanager
    def guard():
        getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__
        repeat, repeat_method = torch.repeat_interleave, torch.Tensor.repeat_interleave

        def checked_getitem(t, index):
            if _mask_index(index):
                raise HostRead("boolean-mask indexing")
            return getitem(t, index)

        def checked_setitem(t, index, value):
            if _mask_index(index):
                raise HostRead("boolean-mask assignment")
            return setitem(t, index, value)

        def checked_repeat(original):
            def call(t, repeats=None, *args, **kwargs):
                if (repeats is None or isinstance(repeats, torch.Tensor)) and kwargs.get("output_size") is None:
                    raise HostRead("repeat_interleave without output_size")
                return original(t, repeats, *args, **kwargs)
            return call

        with monkeypatch.context() as patch:
            patch.setattr(_capture, "capturing", lambda: True)
            for name in HOST_READ_METHODS:
                patch.setattr(torch.Tensor, name, _refuse(f"Tensor.{name}"))
            for name in HOST_READ_FUNCTIONS:
                patch.setattr(torch, name, _refuse(f"torch.{name}"))
            patch.setattr(torch.Tensor, "__getitem__", checked_getitem)
            patch.setattr(torch.Tensor, "__setitem__", checked_setitem)
            patch.setattr(torch, "repeat_interleave", checked_repeat(repeat))
            patch.setattr(torch.Tensor, "repeat_interleave", checked_repeat(repeat_method))
            patch.setattr(torch.cuda, "synchronize", _refuse("torch.cuda.synchronize"))
            yield

    return guard


def test_the_guard_catches_host_reads(no_host_reads):
    t = torch.tensor([1, 2, 0])
    reads = [lambda: bool(t[0]), lambda: t.sum().item(), lambda: int(t[0]), lambda: float(t[1]),
             lambda: t.tolist(), lambda: t[t > 0], lambda: t.nonzero(), lambda: torch.unique(t),
             lambda: torch.repeat_interleave(t, t), lambda: t.repeat_interleave(t), lambda: list(range(t[1])),
             lambda: torch.bincount(t), lambda: torch.equal(t, t), lambda: t.cpu()]
    with no_host_reads():
        assert _capture.capturing()
        for read in reads:
            with pytest.raises(HostRead):
                read()
        torch.repeat_interleave(t, t, output_size=3)  # sized: no read
        t[torch.tensor([0, 2])]  # an integer index: no read
    assert bool(t[0]) and not _capture.capturing()


# ---- the ops: each case(dtype) builds its operands (a user does before capture) and returns
# (run, leaves): run() is the call a user would capture, leaves what gets a gradient.

def _x(rows, k, dtype):
    return torch.randn(rows, k, dtype=dtype, requires_grad=True)


def _weight_case(make):
    """linear(x, W) for W = make(dense weight [24, 48])."""
    def case(dtype):
        w, x = make(torch.randn(24, 48, dtype=dtype)), _x(20, 48, dtype)
        return (lambda: sparqle.linear(x, w)), [x]
    return case


def _spmm_case(make):
    """spmm(A, b) for A = make(dense [24, 48])."""
    def case(dtype):
        a, b = make(torch.randn(24, 48, dtype=dtype)), _x(48, 6, dtype)
        return (lambda: sparqle.spmm(a, b)), [b]
    return case


def _training_case(make):
    """linear(x, W, bias) for W = make(dense weight [24, 48]), with gradients in x, W's
    values and bias (the backward derives W^T's structure, during the capture)."""
    def case(dtype):
        w, x = make(torch.randn(24, 48, dtype=dtype)), _x(20, 48, dtype)
        w.values.requires_grad_(True)
        bias = torch.randn(24, dtype=dtype, requires_grad=True)
        return (lambda: sparqle.linear(x, w, bias)), [x, w.values, bias]
    return case


def _module_case(make):
    """module(x) for module = make(nn.Linear(48, 24)) in dtype."""
    def case(dtype):
        module, x = make(nn.Linear(48, 24).to(dtype)), _x(20, 48, dtype)
        return (lambda: module(x)), [x] + [p for p in module.parameters() if p.requires_grad]
    return case


def _csr(w):
    return CSR.from_dense(w * (torch.rand(w.shape) < 0.3))


def _bell(w):
    return BlockedELL.from_dense(w * (torch.rand(w.shape) < 0.5), 16)


def _window_attention(dtype):
    q, k, v = (torch.randn(4, 2, 9, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 9, 9, dtype=dtype, requires_grad=True)
    mask, mask_index = torch.randn(3, 9, 9, dtype=dtype), torch.tensor([2, 0, 1, 2])
    return (lambda: sparqle.window_attention(q, k, v, bias=bias, mask=mask, mask_index=mask_index)), [q, k, v, bias]


def _window_partition(dtype):
    x, index = torch.randn(2, 6, 6, 4, dtype=dtype, requires_grad=True), torch.tensor([[3, 1], [0, 2]])
    return (lambda: sparqle.window_partition(x, 3, 1, index)), [x]


def _window_merge(dtype):
    x, index = torch.randn(2, 6, 6, 4, dtype=dtype, requires_grad=True), torch.tensor([[3, 1], [0, 2]])
    windows = torch.randn(4, 9, 4, dtype=dtype, requires_grad=True)
    return (lambda: sparqle.window_merge(windows, x, 3, 1, index)), [windows, x]


def _window_module(dtype):
    module = WindowAttention.from_module(swin.WindowAttention(16, 2, (3, 3)).to(dtype))
    x = torch.randn(4, 9, 16, dtype=dtype, requires_grad=True)
    mask, mask_index = torch.zeros(3, 9, 9, dtype=dtype), torch.tensor([2, 0, 1, 2])
    return (lambda: module(x, mask, mask_index)), [x] + list(module.parameters())


def _sparse_window_block(dtype):
    block = SparseWindowBlock.from_block(copy.deepcopy(reference_block(7, 8, 3, 1)).to(dtype), 0.5)
    x = torch.randn(2, 7, 8, 16, dtype=dtype, requires_grad=True)
    return (lambda: block(x)), [x] + list(block.parameters())


def _int8_weight_only(dtype):
    w, x = Int8Weight.from_float(torch.randn(24, 48, dtype=dtype)), _x(20, 48, dtype)
    return (lambda: sparqle.int8_linear(x, w, activation=None)), [x]


def _int8_quantize_rows(dtype):
    x = _x(20, 48, dtype)
    return (lambda: sparqle.quantize_rows(x)[0]), []


def _fp8_weight_only(dtype):
    w, x = FP8Weight.from_float(torch.randn(24, 48, dtype=dtype)), _x(5, 48, dtype)  # M <= 16
    return (lambda: sparqle.linear(x, w)), [x]


def _fp8_quantize_rows(dtype):
    x = _x(20, 48, dtype)
    return (lambda: sparqle.fp8_quantize_rows(x)[0].float()), []


# Cases whose torch path auto takes on CUDA in float64 (CSR and Blocked-ELL run Triton in every dtype).
TORCH_ON_CUDA = {
    "int4.linear": _weight_case(lambda w: Int4Weight.from_float(w, 32)),
    "int8.linear": _weight_case(Int8Weight.from_float),
    "int8.w8a16": _int8_weight_only,
    "int8.quantize_rows": _int8_quantize_rows,
    "nm.linear": _weight_case(SemiStructured.from_dense),
    "nm.spmm": _spmm_case(SemiStructured.from_dense),
    "fp8.linear": _weight_case(FP8Weight.from_float),
    "fp8.linear.weight_only": _fp8_weight_only,
    "fp8.quantize_rows": _fp8_quantize_rows,
    "window_attention": _window_attention,
    "window_partition": _window_partition,
    "window_merge": _window_merge,
    "SparseLinear.2:4": _module_case(lambda lin: SparseLinear.from_linear(lin, format="2:4")),
    "Int4Linear": _module_case(lambda lin: Int4Linear.from_linear(lin, 32)),
    "Int8Linear": _module_case(Int8Linear.from_linear),
    "FP8Linear": _module_case(FP8Linear.from_linear),
    # FP8Linear.training: its forward is sparqle.functional.fp8_training_linear
    "FP8Linear.training": _module_case(lambda lin: FP8Linear.from_linear(lin, training=True)),
    "WindowAttention": _window_module,
    "SparseWindowBlock": _sparse_window_block,
}
CASES = {
    **TORCH_ON_CUDA,
    "csr.linear": _weight_case(_csr),
    "csr.linear.training": _training_case(_csr),
    "csr.spmm": _spmm_case(_csr),
    "bell.linear": _weight_case(_bell),
    "bell.linear.training": _training_case(_bell),
    "bell.spmm": _spmm_case(_bell),
    "SparseLinear.csr": _module_case(lambda lin: SparseLinear.from_linear(lin, 0.7)),
    "SparseLinear.bell": _module_case(lambda lin: SparseLinear.from_linear(lin, 0.5, format="bell", block_size=16)),
}
RUNS = ([("triton", torch.float32, name) for name in sorted(CASES)]
        + [("torch", torch.float64, name) for name in sorted(TORCH_ON_CUDA)])


def _forward_backward(run, leaves):
    out = run()
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True) if leaves else ()
    return out.detach(), grads


@pytest.mark.parametrize("backend,dtype,case", RUNS, ids=lambda v: str(v).replace("torch.", ""))
def test_no_host_sync_during_capture(no_host_reads, backend, dtype, case):
    run, leaves = CASES[case](dtype)
    with sparqle.use_backend(backend):
        with no_host_reads():  # first, so that nothing is cached yet (as in a capture without warm-up)
            out, grads = _forward_backward(run, leaves)
        expected, expected_grads = _forward_backward(run, leaves)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_indices_fail_on_the_device_during_capture(no_host_reads):
    """Where the eager checks would read the indices on the host, capture asserts them on the
    device: a bad index stops the replay (here, on the CPU, at once) instead of being used."""
    q, mask, x = torch.randn(2, 1, 4, 8), torch.zeros(2, 4, 4), torch.randn(1, 4, 4, 2)
    with no_host_reads():
        with pytest.raises(RuntimeError, match=r"mask_index holds values outside \[0, 2\)"):
            sparqle.window_attention(q, q, q, mask=mask, mask_index=torch.tensor([0, 2]))
        with pytest.raises(RuntimeError, match="index names a window twice"):
            sparqle.window_partition(x, 2, 0, torch.tensor([[1, 1]]))


def test_nothing_made_during_capture_is_kept(no_host_reads):
    """A tensor made during capture holds its values only once the graph replays: the CSR
    transposed structure the backward derives, SparseWindowBlock's shift mask and derived
    tensors made then are not kept; one kept before capture is used."""
    from sparqle.kernels._derived import _kept, derived
    a, x = _csr(torch.randn(24, 48)), _x(3, 48, torch.float32)
    block = SparseWindowBlock.from_block(reference_block(7, 8, 3, 1), 0.5)
    source = torch.randn(4)
    with no_host_reads():
        sparqle.linear(x, a).sum().backward()
        block._mask(7, 8, source)
        derived("t", lambda: source + 1, source)
    assert (id(a.col_indices), "csr_transposed") not in _kept and block._masks == {}
    sparqle.linear(x, a).sum().backward()
    assert (id(a.col_indices), "csr_transposed") in _kept  # built eagerly: kept
    kept = derived("t", lambda: source + 1, source)
    with no_host_reads():
        assert derived("t", lambda: source + 2, source) is kept

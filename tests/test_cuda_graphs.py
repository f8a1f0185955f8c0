"""Every op's forward captured in a CUDA graph (by hand, and under
torch.compile(mode="reduce-overhead")) and replayed on new inputs gives what an eager call
on those inputs gives, on every CUDA backend (marked ``gpu``). Decode runs under graphs
(torch.compile mode="reduce-overhead", static KV caches), so an op that cannot be captured
(a host synchronisation, an allocation that depends on values, timing or autotuning during
capture) fails here: that is a finding, never a skip.

The first call of each op runs outside capture, as a user's warm-up does: it autotunes and
measures dispatch."""
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import sparqle
from sparqle.bench import swin_reference as swin
from sparqle.nn import SparseWindowBlock

from ._oracle import RTOL


Case = Tuple[Callable[..., object], List[torch.Tensor]]


def _weight(out_features: int, in_features: int, dtype, device) -> torch.Tensor:
    return torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features ** 0.5


def _linear_case(make_weight: Callable[[torch.Tensor], object]):
    def build(rows: int, dtype, device) -> Case:
        w = make_weight(_weight(96, 80, dtype, device))
        x = torch.randn(rows, 80, device=device, dtype=dtype)
        bias = torch.randn(96, device=device, dtype=dtype)
        return (lambda x, bias: sparqle.linear(x, w, bias)), [x, bias]
    return build


def _spmm_case(make_weight: Callable[[torch.Tensor], object]):
    def build(rows: int, dtype, device) -> Case:
        a = make_weight(_weight(96, 80, dtype, device))
        b = torch.randn(80, rows, device=device, dtype=dtype)
        return (lambda b: sparqle.spmm(a, b)), [b]
    return build


def _int8_w8a16(rows: int, dtype, device) -> Case:
    w = sparqle.Int8Weight.from_float(_weight(96, 80, dtype, device))
    x = torch.randn(rows, 80, device=device, dtype=dtype)
    return (lambda x: sparqle.int8_linear(x, w, activation=None)), [x]


def _rows_case(quantize: Callable[[torch.Tensor], object]):
    def build(rows: int, dtype, device) -> Case:
        return quantize, [torch.randn(rows, 80, device=device, dtype=dtype)]
    return build


def _fp8_training(rows: int, dtype, device) -> Case:
    weight = _weight(96, 80, dtype, device)
    x = torch.randn(rows, 80, device=device, dtype=dtype)
    return (lambda x: sparqle.functional.fp8_training_linear(x, weight)), [x]


def _window_attention(rows: int, dtype, device) -> Case:
    windows, heads, n, d = 4 * rows, 3, 49, 32
    q, k, v = (torch.randn(windows, heads, n, d, device=device, dtype=dtype) for _ in range(3))
    bias = torch.randn(heads, n, n, device=device, dtype=dtype)
    mask = torch.where(torch.rand(4, n, n, device=device) < 0.2, -100.0, 0.0).to(dtype)
    return (lambda q, k, v: sparqle.window_attention(q, k, v, bias=bias, mask=mask)), [q, k, v]


def _window_partition(rows: int, dtype, device) -> Case:
    x = torch.randn(rows, 14, 14, 16, device=device, dtype=dtype)
    index = torch.stack([torch.randperm(4, device=device)[:3] for _ in range(rows)])
    return (lambda x: sparqle.window_partition(x, 7, shift=3, index=index)), [x]


def _window_merge(rows: int, dtype, device) -> Case:
    x = torch.randn(rows, 14, 14, 16, device=device, dtype=dtype)
    windows = torch.randn(rows * 4, 49, 16, device=device, dtype=dtype)
    return (lambda windows, x: sparqle.window_merge(windows, x, 7, shift=3)), [windows, x]


def _sparse_window_block(rows: int, dtype, device) -> Case:
    """A shifted Swin block with SparseViT pruning: shift mask, window scores, partition of
    the kept windows, fused attention, merge."""
    block = swin.SwinTransformerBlock(32, (14, 14), 2, 7, 3).eval()
    sparse = SparseWindowBlock.from_block(block, keep_ratio=0.5).to(device, dtype)
    return sparse, [torch.randn(rows, 14, 14, 32, device=device, dtype=dtype)]


FP8 = {"fp8_linear", "fp8_quantize_rows", "fp8_training_linear"}
CASES: Dict[str, Callable[[int, torch.dtype, str], Case]] = {
    "csr_linear": _linear_case(lambda w: sparqle.CSR.from_dense(w * (torch.rand_like(w) < 0.2))),
    "csr_spmm": _spmm_case(lambda w: sparqle.CSR.from_dense(w * (torch.rand_like(w) < 0.2))),
    "bell_linear": _linear_case(lambda w: sparqle.BlockedELL.from_dense(w, 16, mask=sparqle.prune.magnitude(w, 0.5, block=16))),
    "bell_spmm": _spmm_case(lambda w: sparqle.BlockedELL.from_dense(w, 16, mask=sparqle.prune.magnitude(w, 0.5, block=16))),
    "nm_linear": _linear_case(lambda w: sparqle.SemiStructured.from_dense(w, 2, 4)),
    "nm_spmm": _spmm_case(lambda w: sparqle.SemiStructured.from_dense(w, 2, 4)),
    "int4_linear": _linear_case(lambda w: sparqle.Int4Weight.from_float(w, group_size=32)),
    "int8_linear": _linear_case(sparqle.Int8Weight.from_float),
    "int8_linear_w8a16": _int8_w8a16,
    "int8_quantize_rows": _rows_case(sparqle.quantize_rows),
    "fp8_linear": _linear_case(sparqle.FP8Weight.from_float),
    "fp8_quantize_rows": _rows_case(sparqle.fp8_quantize_rows),
    "fp8_training_linear": _fp8_training,
    "window_attention": _window_attention,
    "window_partition": _window_partition,
    "window_merge": _window_merge,
    "sparse_window_block": _sparse_window_block,
}


def _tensors(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 37])  # the small-M (split-K) and tiled paths
@pytest.mark.parametrize("op", sorted(CASES))
def test_capture_and_replay_matches_eager(op, rows, dtype, backend):
    if op in FP8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89 or newer")
    fn, inputs = CASES[op](rows, dtype, "cuda")
    with sparqle.use_backend(backend), torch.no_grad():
        fn(*inputs)  # warm-up outside capture: autotuning and dispatch measurement happen here
        static = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _tensors(fn(*static))
        for _ in range(2):  # new values in the captured inputs, then replay
            for t in static:
                t.copy_(torch.randn_like(t) if t.is_floating_point() else t)
            graph.replay()
            torch.cuda.synchronize()
            expected = _tensors(fn(*[t.clone() for t in static]))
            for got, want in zip(captured, expected):
                if not want.is_floating_point() or want.dtype.itemsize == 1:  # int8, fp8 values
                    got, want = got.float(), want.float()
                scale = want.abs().max().clamp(min=1).item()
                torch.testing.assert_close(got, want, rtol=0, atol=RTOL.get(want.dtype, 1e-5) * scale,
                                           msg=lambda m: f"{op} replay differs from eager: {m}")


@pytest.mark.parametrize("op", sorted(CASES))
def test_cases_run_eagerly_on_the_cpu(op):
    """The cases above are valid calls (checked where no GPU is present)."""
    fn, inputs = CASES[op](2, torch.float32, "cpu")
    with sparqle.use_backend("torch"), torch.no_grad():
        assert all(t.float().isfinite().all() for t in _tensors(fn(*inputs)))


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(CASES))
def test_reduce_overhead_compile_matches_eager(op):
    """Every op's forward under torch.compile(mode="reduce-overhead") (Inductor's CUDA graph
    trees: warm-up, record, replays) gives what an eager call on the same inputs gives."""
    if op in FP8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89 or newer")
    fn, inputs = CASES[op](1, torch.bfloat16, "cuda")
    compiled = torch.compile(fn, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, then a replay on new values
            fresh = [torch.randn_like(t) if t.is_floating_point() else t for t in inputs]
            got = [t.clone() for t in _tensors(compiled(*fresh))]
            want = _tensors(fn(*fresh))
            for g, w in zip(got, want):
                if not w.is_floating_point() or w.dtype.itemsize == 1:
                    g, w = g.float(), w.float()
                scale = w.abs().max().clamp(min=1).item()
                torch.testing.assert_close(g, w, rtol=0, atol=RTOL.get(w.dtype, 1e-5) * scale,
                                           msg=lambda m: f"{op} under reduce-overhead differs from eager: {m}")

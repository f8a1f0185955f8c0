"""FP8 linear, y [M, N] = x [M, K] @ W^T: sparqle's e4m3 layer with row-wise and with
tensor-wise weight scales (per-token activation quantization included in the time; M <= 16
runs weight-only) against the dense layer in the activations' dtype (cuBLAS on a GPU) and,
on CUDA, ``torch._scaled_mm`` tensor-wise and row-wise with the activation quantization
done in torch ops (M padded to a multiple of 16, as cuBLASLt's FP8 GEMM needs).

FLOPs: 2 M N K. Bytes: the FP8 weight and its scales, x once, y once (dense: the full weight).
"""
import itertools
from typing import Iterator, List

import torch

import sparqle

from .harness import Case, Impl, device, inputs, linear_grid, no_grad, plot_speedups

OP = "fp8"
KEYS = ("tokens", "out_features", "in_features", "dtype")
SIZES = [4096, 8192, 14336]
MS = [1, 16, 128, 1024, 4096, 8192]
E4M3_MAX = 448.0
# torch._scaled_mm runs on CUDA (sm_89+) only.
IMPLS = ("sparqle", "sparqle-tensor", "dense") + (
    ("torch._scaled_mm-tensor", "torch._scaled_mm-row") if torch.cuda.is_available() else ())


def grid(quick: bool) -> Iterator[dict]:
    return linear_grid(quick, MS, list(itertools.product(SIZES, SIZES)), [(4096, 4096)])


def _scaled_mm_linear(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor,
                      row: bool) -> torch.Tensor:
    """torch ops only: e4m3 quantization of x (per row, or per tensor), then torch._scaled_mm
    with ``qweight_t`` [K, N] (column-major) and its scale [1, N] (row) or [] (tensor)."""
    m = x.shape[0]
    amax = x.abs().amax(dim=1, keepdim=True) if row else x.abs().amax()
    scale = (amax.float() / E4M3_MAX).clamp(min=1e-12)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    pad = -m % 16
    if pad:
        q = torch.nn.functional.pad(q.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
        if row:
            scale = torch.nn.functional.pad(scale, (0, 0, 0, pad), value=1.0)
    y = torch._scaled_mm(q, qweight_t, scale_a=scale, scale_b=w_scale, out_dtype=x.dtype)
    return y[:m]


def make_case(tokens: int, out_features: int, in_features: int, dtype: str) -> Case:
    m, n, k = tokens, out_features, in_features  # y [m, n] = x [m, k] @ W^T
    dev, dt = device(), getattr(torch, dtype)
    weight = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    row = sparqle.FP8Weight.from_float(weight, torch.float8_e4m3fn, "row")
    tensor = sparqle.FP8Weight.from_float(weight, torch.float8_e4m3fn, "tensor")
    x = inputs(lambda: torch.randn(m, k, device=dev, dtype=dt))
    size = dt.itemsize
    io_bytes = (m * k + m * n) * size
    fp8_bytes = n * k + 4 * n + io_bytes
    impls = [
        Impl("sparqle", lambda i: no_grad(lambda xi=x(i): sparqle.linear(xi, row)), fp8_bytes),
        Impl("sparqle-tensor", lambda i: no_grad(lambda xi=x(i): sparqle.linear(xi, tensor)), fp8_bytes),
        Impl("dense", lambda i: no_grad(lambda xi=x(i): torch.nn.functional.linear(xi, weight)),
             n * k * size + io_bytes),
    ]
    if "torch._scaled_mm-row" in IMPLS:
        qt_row, qt_tensor = row.qweight.t(), tensor.qweight.t()  # [K, N], column-major
        row_scale, tensor_scale = row.scales[None, :], tensor.scales
        impls += [
            Impl("torch._scaled_mm-tensor", lambda i: no_grad(
                lambda xi=x(i): _scaled_mm_linear(xi, qt_tensor, tensor_scale, False)), fp8_bytes),
            Impl("torch._scaled_mm-row", lambda i: no_grad(
                lambda xi=x(i): _scaled_mm_linear(xi, qt_row, row_scale, True)), fp8_bytes),
        ]
    return Case(OP, {"tokens": m, "out_features": n, "in_features": k, "dtype": dtype}, flops=2.0 * m * n * k,
                input_bytes=fp8_bytes, impls=impls)


def cases(quick: bool) -> List[Case]:
    return [make_case(**p) for p in grid(quick)]


def plot(report: dict, path: str) -> None:
    plot_speedups(report, path, ("out_features", "in_features", "dtype"), "FP8 linear (e4m3)", x_key="tokens",
                  log_x=True)

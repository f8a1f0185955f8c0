"""int8 linear, y [M, N] = x [M, K] @ W^T: sparqle's W8A8 (per-token activation
quantization included in the time) and W8A16 against the dense layer in the activations'
dtype (cuBLAS on a GPU) and ``torch._int_mm`` with the same quantization and scaling done
in torch ops (M padded to 32 on CUDA, where _int_mm needs M > 16, as torchao does).

FLOPs: 2 M N K. Bytes: int8 weight and its scales, x once, y once (dense: the full weight).
"""
import itertools
from typing import Iterator, List

import torch

import sparqle

from .harness import Case, Impl, device, inputs, linear_grid, no_grad, plot_speedups

OP = "int8"
KEYS = ("tokens", "out_features", "in_features", "dtype")
IMPLS = ("sparqle", "sparqle-w8a16", "dense", "torch._int_mm")
SIZES = [4096, 8192, 14336]
MS = [1, 16, 128, 1024, 4096, 8192]


def grid(quick: bool) -> Iterator[dict]:
    return linear_grid(quick, MS, list(itertools.product(SIZES, SIZES)), [(4096, 4096)])


def _int_mm_linear(x: torch.Tensor, qweight_t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """torch ops only: per-row quantization, torch._int_mm, then both scales."""
    m = x.shape[0]
    scale = (x.abs().amax(dim=1, keepdim=True).float() / 127).clamp(min=1e-12)
    q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    if x.is_cuda and m <= 16:
        q = torch.nn.functional.pad(q, (0, 0, 0, 32 - m))
    y = torch._int_mm(q, qweight_t)[:m]
    return (y.float() * scale * scales.float()[None, :]).to(x.dtype)


def make_case(tokens: int, out_features: int, in_features: int, dtype: str) -> Case:
    m, n, k = tokens, out_features, in_features  # y [m, n] = x [m, k] @ W^T
    dev, dt = device(), getattr(torch, dtype)
    weight = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    qw = sparqle.Int8Weight.from_float(weight)
    qweight_t = qw.qweight.t().contiguous()
    x = inputs(lambda: torch.randn(m, k, device=dev, dtype=dt))
    size = dt.itemsize
    io_bytes = (m * k + m * n) * size
    int8_bytes = n * k + n * size + io_bytes
    return Case(OP, {"tokens": m, "out_features": n, "in_features": k, "dtype": dtype}, flops=2.0 * m * n * k,
                input_bytes=int8_bytes, impls=[
                    Impl("sparqle", lambda i: no_grad(lambda xi=x(i): sparqle.linear(xi, qw)), int8_bytes),
                    Impl("sparqle-w8a16", lambda i: no_grad(
                        lambda xi=x(i): sparqle.int8_linear(xi, qw, activation=None)), int8_bytes),
                    Impl("dense", lambda i: no_grad(lambda xi=x(i): torch.nn.functional.linear(xi, weight)),
                         n * k * size + io_bytes),
                    Impl("torch._int_mm", lambda i: no_grad(
                        lambda xi=x(i): _int_mm_linear(xi, qweight_t, qw.scales)), int8_bytes),
                ])


def cases(quick: bool) -> List[Case]:
    return [make_case(**p) for p in grid(quick)]


def plot(report: dict, path: str) -> None:
    plot_speedups(report, path, ("out_features", "in_features", "dtype"), "int8 linear", x_key="tokens",
                  log_x=True)

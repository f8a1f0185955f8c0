"""int4 weight-only linear (W4A16), y [M, N] = x [M, K] @ dequant(W)^T: sparqle.linear on an
Int4Weight (group 128) against the dense layer in the activations' dtype (cuBLAS on a GPU)
and, where it is installed and runs, torchao's int4 weight-only quantization.

At small M a linear layer is bound by reading its weight: the achieved GB/s against the
device's is the measure. FLOPs: 2 M N K. Bytes: the packed weight (N K / 2, K padded to a
multiple of 128), scales and zeros, x once, y once (dense: the full weight).
"""
import importlib.util
from typing import Iterator, List

import torch

import sparqle

from .harness import Case, Impl, device, inputs, linear_grid, no_grad, plot_speedups

OP = "int4"
KEYS = ("tokens", "out_features", "in_features", "dtype")
GROUP = 128
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]


def _torchao_linear(weight: torch.Tensor) -> torch.nn.Module:
    """torchao's int4 weight-only layer (group 128) for ``weight``, on CUDA."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                            device=weight.device, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    quantize_(layer, Int4WeightOnlyConfig(group_size=GROUP))
    return layer


# torchao's int4 layer runs on CUDA only.
IMPLS = ("sparqle", "dense") + (
    ("torchao",) if importlib.util.find_spec("torchao") and torch.cuda.is_available() else ())


def grid(quick: bool) -> Iterator[dict]:
    return linear_grid(quick, MS, SHAPES, SHAPES[:2])


def make_case(tokens: int, out_features: int, in_features: int, dtype: str) -> Case:
    m, n, k = tokens, out_features, in_features  # y [m, n] = x [m, k] @ W^T
    dev, dt = device(), getattr(torch, dtype)
    weight = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    qw = sparqle.Int4Weight.from_float(weight, GROUP)
    x = inputs(lambda: torch.randn(m, k, device=dev, dtype=dt))
    size = dt.itemsize
    io_bytes = (m * k + m * n) * size
    int4_bytes = qw.packed.numel() + 2 * qw.scales.numel() * size + io_bytes
    dense_bytes = n * k * size + io_bytes
    impls = [
        Impl("sparqle", lambda i: no_grad(lambda xi=x(i): sparqle.linear(xi, qw)), int4_bytes),
        Impl("dense", lambda i: no_grad(lambda xi=x(i): torch.nn.functional.linear(xi, weight)), dense_bytes),
    ]
    if "torchao" in IMPLS:
        torchao = _torchao_linear(weight)
        impls.append(Impl("torchao", lambda i: no_grad(lambda xi=x(i): torchao(xi)), int4_bytes))
    return Case(OP, {"tokens": m, "out_features": n, "in_features": k, "dtype": dtype}, flops=2.0 * m * n * k,
                input_bytes=int4_bytes, impls=impls)


def cases(quick: bool) -> List[Case]:
    return [make_case(**p) for p in grid(quick)]


def plot(report: dict, path: str) -> None:
    plot_speedups(report, path, ("out_features", "in_features", "dtype"), "int4 weight-only linear", x_key="tokens",
                  log_x=True)

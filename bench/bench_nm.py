"""2:4 semi-structured sparse linear, y [M, N] = x [M, K] @ W^T: sparqle.linear on a
SemiStructured weight (``sparqle``: auto's dispatch, which on CUDA runs whichever of the
Triton kernel, cuBLAS on the expanded weight and cuSPARSELt it measured fastest) against
the dense layer on the same (pruned) weight in the activations' dtype (cuBLAS on a GPU)
and, on CUDA, the Triton kernel alone (``sparqle-triton``),
torch.sparse.to_sparse_semi_structured through both of its backends (cuSPARSELt and
CUTLASS), and sparqle's CuPy mma.sp kernel where CuPy is installed.

At small M the layer is bound by reading its weight: N K / 2 values plus 2 bits of
metadata a value (0.5625x of the dense fp16 bytes). FLOPs: 2 M N K (the dense count).
"""
import importlib.util
import itertools
from typing import Iterator, List

import torch

import sparqle

from .harness import Case, Impl, device, inputs, no_grad, plot_speedups

OP = "nm"
KEYS = ("tokens", "out_features", "in_features", "dtype")
MS = [1, 2, 4, 8, 16, 64, 256, 1024, 2048, 4096, 8192]
# (out, in) of Llama-like and ViT-like layers.
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (768, 3072), (3072, 768)]


def _torch_backends() -> tuple:
    """to_sparse_semi_structured's backends that can run here (CUDA only)."""
    if not torch.cuda.is_available():
        return ()
    cusparselt = torch.backends.cusparselt.is_available()
    return (("torch-cusparselt",) if cusparselt else ()) + ("torch-cutlass",)


_CUPY = importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()
_CUDA = torch.cuda.is_available()
IMPLS = (("sparqle", "dense") + (("sparqle-triton",) if _CUDA else ()) + _torch_backends()
         + (("cupy",) if _CUPY else ()))


def grid(quick: bool) -> Iterator[dict]:
    on_gpu = device().type == "cuda"
    if quick:
        ms, shapes, dtypes = [1, 16], [(3072, 768)], ["float16" if on_gpu else "float32"]
    elif on_gpu:
        ms, shapes, dtypes = MS, SHAPES, ["float16", "bfloat16"]
    else:
        ms, shapes, dtypes = [1, 16, 256], SHAPES[3:], ["float32"]
    for m, (n, k), dtype in itertools.product(ms, shapes, dtypes):
        yield {"tokens": m, "out_features": n, "in_features": k, "dtype": dtype}


def _semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "torch-cusparselt" else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(weight)


def _forced(backend: str, x: torch.Tensor, w: sparqle.SemiStructured) -> torch.Tensor:
    with sparqle.use_backend(backend):
        return sparqle.linear(x, w)


def make_case(tokens: int, out_features: int, in_features: int, dtype: str) -> Case:
    m, n, k = tokens, out_features, in_features  # y [m, n] = x [m, k] @ W^T
    dev, dt = device(), getattr(torch, dtype)
    w = sparqle.SemiStructured.from_dense(torch.randn(n, k, device=dev, dtype=dt) * 0.02)
    weight = w.to_dense()
    x = inputs(lambda: torch.randn(m, k, device=dev, dtype=dt))
    size = dt.itemsize
    io_bytes = (m * k + m * n) * size
    sparse_bytes = w.values.numel() * size + w.meta.numel() * 4 + io_bytes
    impls = [
        Impl("sparqle", lambda i: no_grad(lambda xi=x(i): sparqle.linear(xi, w)), sparse_bytes),
        Impl("dense", lambda i: no_grad(lambda xi=x(i): torch.nn.functional.linear(xi, weight)),
             n * k * size + io_bytes),
    ]
    if _CUDA:
        impls.append(Impl("sparqle-triton", lambda i: no_grad(lambda xi=x(i): _forced("triton", xi, w)),
                          sparse_bytes))
    if _CUPY:
        impls.append(Impl("cupy", lambda i: no_grad(lambda xi=x(i): _forced("cupy", xi, w)), sparse_bytes))
    for backend in _torch_backends():
        ws = _semi_structured(weight, backend)
        impls.append(Impl(backend, lambda i, ws=ws: no_grad(
            lambda xi=x(i): torch.nn.functional.linear(xi, ws)), sparse_bytes))
    return Case(OP, {"tokens": m, "out_features": n, "in_features": k, "dtype": dtype}, flops=2.0 * m * n * k,
                input_bytes=sparse_bytes, impls=impls)


def cases(quick: bool) -> List[Case]:
    return [make_case(**p) for p in grid(quick)]


def plot(report: dict, path: str) -> None:
    plot_speedups(report, path, ("out_features", "in_features", "dtype"), "2:4 sparse linear", x_key="tokens",
                  log_x=True)

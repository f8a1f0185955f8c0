"""CSR SpMM, C [m, n] = A [m, k] @ B [k, n]: sparqle.spmm against dense torch.matmul
(cuBLAS on a GPU) and torch.sparse CSR (cuSPARSE on a GPU, MKL on the CPU); where CuPy and
a GPU are present, also sparqle's CuPy kernel (``cupy``, the backend forced).

A is a transformer weight [out, in] magnitude-pruned to the given sparsity, B holds the
n tokens as columns: sparqle.spmm runs the op of ``sparqle.linear`` (sparqle::csr_linear,
x @ A^T) on x = B^T, read through its strides, and transposes the result back.
FLOPs: 2 nnz n. Bytes: values and column indices, row pointers, B once, C once; sparqle's
kernels read 16-bit column indices where sparqle.formats.csr.reads_u16_col_indices says so.
"""
import importlib.util
import itertools
from typing import Iterator, List

import torch

import sparqle
from sparqle.formats.csr import reads_u16_col_indices

from .harness import Case, Impl, device, inputs, no_grad, plot_speedups

OP = "spmm_csr"
KEYS = ("out_features", "in_features", "tokens", "sparsity", "dtype")
# The CuPy kernel runs on CUDA with CuPy installed only.
IMPLS = ("sparqle", "dense", "torch.sparse") + (
    ("cupy",) if importlib.util.find_spec("cupy") and torch.cuda.is_available() else ())
SHAPES = [(4096, 1024), (1024, 4096)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]


def grid(quick: bool) -> Iterator[dict]:
    on_gpu = device().type == "cuda"
    dtype = "float16" if on_gpu else "float32"
    if quick:
        shapes, ns, sparsities = SHAPES[:1], [1, 64, 256], [0.9, 0.98]
    else:
        shapes, sparsities = SHAPES, SPARSITIES
        ns = [1, 16, 64, 256, 1024, 4096] if on_gpu else [1, 16, 64, 256]
    for (m, k), n, s in itertools.product(shapes, ns, sparsities):
        yield {"out_features": m, "in_features": k, "tokens": n, "sparsity": s, "dtype": dtype}


def _cupy_spmm(a: sparqle.CSR, b: torch.Tensor) -> torch.Tensor:
    with sparqle.use_backend("cupy"):
        return sparqle.spmm(a, b)


def make_case(out_features: int, in_features: int, tokens: int, sparsity: float, dtype: str) -> Case:
    m, k, n = out_features, in_features, tokens  # C [m, n] = A [m, k] @ B [k, n]
    dev, dt = device(), getattr(torch, dtype)
    weight = torch.randn(m, k, device=dev, dtype=dt)
    a = sparqle.CSR.from_dense(weight, mask=sparqle.prune.magnitude(weight, sparsity))
    dense, a_torch = a.to_dense(), a.to_sparse_csr()
    b = inputs(lambda: torch.randn(k, n, device=dev, dtype=dt))
    size = dt.itemsize
    sparse_bytes = a.nnz * (size + 4) + (m + 1) * 4 + (k * n + m * n) * size
    sparqle_bytes = sparse_bytes - (2 * a.nnz if reads_u16_col_indices(dt, k) else 0)
    dense_bytes = (m * k + k * n + m * n) * size
    impls = [
        Impl("sparqle", lambda i, b=b: no_grad(lambda bi=b(i): sparqle.spmm(a, bi)), sparqle_bytes),
        Impl("dense", lambda i, b=b: no_grad(lambda bi=b(i): dense @ bi), dense_bytes),
        Impl("torch.sparse", lambda i, b=b: no_grad(lambda bi=b(i): a_torch @ bi), sparse_bytes),
    ]
    if "cupy" in IMPLS:
        impls.append(Impl("cupy", lambda i, b=b: no_grad(lambda bi=b(i): _cupy_spmm(a, bi)), sparqle_bytes))
    return Case(OP, {"out_features": m, "in_features": k, "tokens": n, "sparsity": sparsity, "dtype": dtype},
                flops=2.0 * a.nnz * n, input_bytes=sparse_bytes, impls=impls)


def cases(quick: bool) -> List[Case]:
    return [make_case(**p) for p in grid(quick)]


def plot(report: dict, path: str) -> None:
    plot_speedups(report, path, ("out_features", "in_features", "tokens"), "CSR SpMM")

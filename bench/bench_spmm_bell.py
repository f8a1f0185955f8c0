"""Blocked-ELL linear, y [n, m] = x [n, k] @ W^T, W [m, k] block-pruned: sparqle.linear
against dense ``x @ W^T`` (cuBLAS on a GPU) and torch's BSR path (``W.to_sparse_bsr``,
then ``(W_bsr @ x^T)^T``; its CUDA kernels are Triton, the CPU's MKL).

FLOPs: 2 (stored blocks) b^2 n. Bytes: stored blocks and their column indices, x once, y once.
"""
import itertools
from typing import Iterator, List

import torch

import sparqle

from .harness import Case, Impl, device, inputs, no_grad, plot_speedups

OP = "spmm_bell"
KEYS = ("out_features", "in_features", "tokens", "block", "sparsity", "dtype")
IMPLS = ("sparqle", "dense", "torch.bsr")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SPARSITIES = [0.5, 0.75, 0.9, 0.95]


def grid(quick: bool) -> Iterator[dict]:
    on_gpu = device().type == "cuda"
    if quick:
        shapes, ns, blocks, sparsities = [(4096, 1024)], [64], [32], [0.75, 0.9]
        dtypes = ["float16"] if on_gpu else ["float32"]
    elif on_gpu:
        shapes, ns, blocks, sparsities = SHAPES, [16, 128, 512, 2048, 8192], [16, 32, 64], SPARSITIES
        dtypes = ["float16", "bfloat16"]
    else:
        shapes, ns, blocks, sparsities = [(4096, 1024)], [16, 64, 256], [16, 32, 64], SPARSITIES
        dtypes = ["float32"]
    for (m, k), n, b, s, dt in itertools.product(shapes, ns, blocks, sparsities, dtypes):
        yield {"out_features": m, "in_features": k, "tokens": n, "block": b, "sparsity": s, "dtype": dt}


def make_case(out_features: int, in_features: int, tokens: int, block: int, sparsity: float, dtype: str) -> Case:
    m, k, n = out_features, in_features, tokens  # y [n, m] = x [n, k] @ W^T
    dev, dt = device(), getattr(torch, dtype)
    weight = torch.randn(m, k, device=dev, dtype=dt)
    w = sparqle.BlockedELL.from_dense(
        weight, block, mask=sparqle.prune.magnitude(weight, sparsity, block=block))
    dense = w.to_dense()
    bsr = dense.to_sparse_bsr((block, block))
    x = inputs(lambda: torch.randn(n, k, device=dev, dtype=dt))
    size, stored = dt.itemsize, w.nnz_blocks * block * block
    sparse_bytes = stored * size + w.ell_cols.numel() * 4 + (n * k + n * m) * size
    dense_bytes = (m * k + n * k + n * m) * size
    return Case(OP, {"out_features": m, "in_features": k, "tokens": n, "block": block, "sparsity": sparsity,
                     "dtype": dtype},
                flops=2.0 * stored * n, input_bytes=sparse_bytes, impls=[
                    Impl("sparqle", lambda i: no_grad(lambda xi=x(i): sparqle.linear(xi, w)), sparse_bytes),
                    Impl("dense", lambda i: no_grad(lambda xi=x(i): xi @ dense.T), dense_bytes),
                    Impl("torch.bsr", lambda i: no_grad(lambda xi=x(i): (bsr @ xi.T).T), sparse_bytes),
                ])


def cases(quick: bool) -> List[Case]:
    return [make_case(**p) for p in grid(quick)]


def plot(report: dict, path: str) -> None:
    plot_speedups(report, path, ("block", "tokens", "dtype"), "Blocked-ELL linear")

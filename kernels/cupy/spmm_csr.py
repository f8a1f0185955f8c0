"""CSR linear and SDDMM in CUDA C (spmm_csr.cu), Sputnik-style; see the .cu for the tiling.

Linear: y [M, m] = x [M, k] @ A^T + bias, A [m, k] in CSR (crow [m+1], col [nnz], values
[nnz]), rows of A taken in ``row_order``, the bias added in the kernel's epilogue.
SDDMM: out[i] = x[row_i] . y[col_i] for x [m, n], y [k, n].
fp32, fp16 and bf16, accumulated in fp32. For fp16/bf16 with k <= 65536 the linear reads
16-bit column indices: a narrowed copy of ``col`` made on first use and kept while ``col``
lives and is not modified in place (sparqle.kernels._derived.csr_col_indices, shared with
the Triton kernel).
"""
from typing import Optional

import numpy as np
import torch

from sparqle.formats._checks import cdiv

from .. import _alloc
from .._derived import csr_col_indices
from ._module import i32, i64, launch, ptr

_FILE = "spmm_csr.cu"
_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_THREADS = 128
_SPARSE_VEC = 4


def _vec(dtype: torch.dtype) -> int:
    """Elements in a 16-byte load."""
    return 16 // dtype.itemsize


def _subwarp(n: int, vec: int) -> int:
    """Threads per row: enough to cover n columns with vec-wide loads, from 4 to 32."""
    lanes = cdiv(n, vec)
    return min(32, max(4, 1 << (lanes - 1).bit_length()))


def _aligned(t: torch.Tensor, elements: int) -> bool:
    return t.data_ptr() % (elements * t.element_size()) == 0


def _rows_vectorizable(t: torch.Tensor, vec: int) -> bool:
    """Whether every row of 2-D ``t`` can be read with vec-wide aligned loads."""
    return t.stride(1) == 1 and t.stride(0) % vec == 0 and _aligned(t, vec)


def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               row_order: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [M, m] = x [M, k] @ A^T + bias for A [m, k] in CSR (m = crow.numel() - 1), bias [m]
    or None. The kernel computes y^T = A @ x^T: x^T is staged contiguously (one copy of x),
    so that its rows take 16-byte vector loads; y^T is written through y's strides."""
    (rows, k), m, nnz = x.shape, crow.numel() - 1, col.numel()
    y = _alloc.empty((rows, m), x.dtype, x.device)
    if m == 0 or rows == 0:
        return y
    b = x.t().contiguous()  # x^T [k, rows]
    vec = _vec(x.dtype)
    col = csr_col_indices(col, k, x.dtype)
    index = "u16" if col.dtype == torch.int16 else "i32"
    if (rows % vec == 0 and _rows_vectorizable(b, vec)
            and _aligned(values, _SPARSE_VEC) and _aligned(col, _SPARSE_VEC)):
        subwarp, variant = _subwarp(rows, vec), "vec"
    else:
        subwarp, variant, vec = 32, "scalar", 1
    per_block = _THREADS // subwarp
    launch(_FILE, f"csr_linear_{_NAMES[x.dtype]}_{index}_s{subwarp}_{variant}",
           (cdiv(m, per_block), cdiv(rows, subwarp * vec)), (subwarp, per_block),
           (ptr(crow), ptr(col), ptr(values), ptr(row_order), ptr(b),
            np.uint64(0) if bias is None else ptr(bias), ptr(y),
            i32(m), i32(rows), i32(nnz), i64(b.stride(0)), i64(b.stride(1)),
            i64(y.stride(1)), i64(y.stride(0)), i64(0 if bias is None else bias.stride(0))), x)
    return y


def sddmm_csr(crow: torch.Tensor, col: torch.Tensor,
              x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out [nnz]: out[i] = x[row_i] . y[col_i] for x [m, n], y [k, n] and a CSR pattern."""
    m, nnz, n = crow.numel() - 1, col.numel(), x.shape[1]
    out = _alloc.empty((nnz,), x.dtype, x.device)
    if nnz == 0:
        return out
    vec = _vec(x.dtype)
    if _rows_vectorizable(x, vec) and _rows_vectorizable(y, vec):
        subwarp, variant = _subwarp(n, vec), "vec"
    else:
        subwarp, variant = 32, "scalar"
    rows = _THREADS // subwarp
    launch(_FILE, f"sddmm_csr_{_NAMES[x.dtype]}_s{subwarp}_{variant}",
           (cdiv(nnz, rows),), (subwarp, rows),
           (ptr(crow), ptr(col), ptr(x), ptr(y), ptr(out), i32(m), i32(nnz), i32(n),
            i64(x.stride(0)), i64(x.stride(1)), i64(y.stride(0)), i64(y.stride(1))), x)
    return out

"""CSR SpMM and SDDMM in CUDA C (spmm_csr.cu), Sputnik-style; see the .cu for the tiling.

SpMM: C [m, n] = A [m, k] @ B [k, n], A in CSR (crow [m+1], col [nnz], values [nnz]), rows
taken in ``row_order``. SDDMM: out[i] = x[row_i] . y[col_i] for x [m, n], y [k, n].
fp32, fp16 and bf16, accumulated in fp32. For fp16/bf16 with k <= 65536 the SpMM reads
16-bit column indices: a narrowed copy of ``col`` made on first use and kept while ``col``
lives and is not modified in place.
"""
import torch

from .. import _alloc
from .._derived import derived
from ._module import i32, i64, launch, ptr

_FILE = "spmm_csr.cu"
_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_THREADS = 128
_SPARSE_VEC = 4
_MAX_U16_K = 1 << 16


def _vec(dtype: torch.dtype) -> int:
    """Elements in a 16-byte load."""
    return 16 // dtype.itemsize


def _subwarp(n: int, vec: int) -> int:
    """Threads per row: enough to cover n columns with vec-wide loads, from 4 to 32."""
    lanes = -(-n // vec)
    return min(32, max(4, 1 << (lanes - 1).bit_length()))


def _aligned(t: torch.Tensor, elements: int) -> bool:
    return t.data_ptr() % (elements * t.element_size()) == 0


def _rows_vectorizable(t: torch.Tensor, vec: int) -> bool:
    """Whether every row of 2-D ``t`` can be read with vec-wide aligned loads."""
    return t.stride(1) == 1 and t.stride(0) % vec == 0 and _aligned(t, vec)


def _u16_columns(col: torch.Tensor) -> torch.Tensor:
    """``col`` (int32, entries < 65536) as 16-bit unsigned bit patterns, kept per tensor."""
    # The low halves of little-endian int32: exact for 0 <= col < 65536.
    return derived("u16", lambda: col.contiguous().view(torch.int16).view(-1, 2)[:, 0].contiguous(), col)


def spmm_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
             row_order: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C [m, n] = A @ b for A in CSR (m = crow.numel() - 1) and dense b [k, n]."""
    m, (k, n), nnz = crow.numel() - 1, b.shape, col.numel()
    c = _alloc.empty((m, n), b.dtype, b.device)
    if m == 0 or n == 0:
        return c
    vec = _vec(b.dtype)
    index = "i32"
    if b.dtype != torch.float32 and k <= _MAX_U16_K:
        col, index = _u16_columns(col), "u16"
    if (n % vec == 0 and _rows_vectorizable(b, vec)
            and _aligned(values, _SPARSE_VEC) and _aligned(col, _SPARSE_VEC)):
        subwarp, variant = _subwarp(n, vec), "vec"
    else:
        subwarp, variant, vec = 32, "scalar", 1
    rows = _THREADS // subwarp
    launch(_FILE, f"spmm_csr_{_NAMES[b.dtype]}_{index}_s{subwarp}_{variant}",
           (-(-m // rows), -(-n // (subwarp * vec))), (subwarp, rows),
           (ptr(crow), ptr(col), ptr(values), ptr(row_order), ptr(b), ptr(c),
            i32(m), i32(n), i32(nnz), i64(b.stride(0)), i64(b.stride(1))), b)
    return c


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
           (-(-nnz // rows),), (subwarp, rows),
           (ptr(crow), ptr(col), ptr(x), ptr(y), ptr(out), i32(m), i32(nnz), i32(n),
            i64(x.stride(0)), i64(x.stride(1)), i64(y.stride(0)), i64(y.stride(1))), x)
    return out

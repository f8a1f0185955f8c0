"""CSR SpMM and SDDMM in plain PyTorch (see kernels/triton/spmm_csr.py for the maths).

SpMM goes through ``torch.sparse`` CSR (MKL on the CPU, cuSPARSE on CUDA); fp16 and
bf16 are computed in fp32, as the Triton kernel accumulates. SDDMM gathers rows in
chunks so that no [nnz, n] temporary exceeds a few million elements.
"""
import torch

from ._dtypes import compute_dtype
from ._sparse import csr_matrix

from .. import _alloc

_SDDMM_CHUNK_ELEMENTS = 1 << 22


def spmm_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
             row_order: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C [m, n] = A @ b for A in CSR (m = crow.numel() - 1) and dense b [k, n]."""
    del row_order  # the library kernel balances its own load
    m, k, n = crow.numel() - 1, b.shape[0], b.shape[1]
    if m == 0 or n == 0 or col.numel() == 0:
        return torch.zeros((m, n), dtype=b.dtype, device=b.device)
    cdt = compute_dtype(b.dtype)
    a = csr_matrix(crow, col, values.to(cdt), (m, k))
    return (a @ b.to(cdt)).to(b.dtype)


def sddmm_csr(crow: torch.Tensor, col: torch.Tensor,
              x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out [nnz]: out[i] = x[row_i] . y[col_i] for x [m, n], y [k, n] and a CSR pattern."""
    nnz, n = col.numel(), x.shape[1]
    out = _alloc.empty((nnz,), x.dtype, x.device)
    rows = torch.repeat_interleave(
        torch.arange(crow.numel() - 1, device=crow.device), crow[1:] - crow[:-1],
        output_size=nnz)
    cdt = compute_dtype(x.dtype)
    step = max(1, _SDDMM_CHUNK_ELEMENTS // max(1, n))
    for lo in range(0, nnz, step):
        hi = min(nnz, lo + step)
        out[lo:hi] = (x[rows[lo:hi]].to(cdt) * y[col[lo:hi]].to(cdt)).sum(dim=1)
    return out

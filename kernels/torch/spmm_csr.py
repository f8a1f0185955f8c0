"""CSR linear and SDDMM in plain PyTorch (see kernels/triton/spmm_csr.py for the maths).

csr_linear computes y^T = A @ x^T + bias[:, None] through ``torch.sparse`` CSR (MKL on the
CPU, cuSPARSE on CUDA), as addmm does: the product and the bias in fp32 (fp64 for fp64;
fp16 and bf16 are computed in fp32, as the Triton kernel accumulates), one rounding to x's
dtype. SDDMM gathers rows in chunks so that no [nnz, n] temporary exceeds a few million
elements.
"""
from typing import Optional

import torch

from sparqle.formats._checks import compute_dtype
from sparqle.formats._sparse import csr_matrix
from sparqle.formats.csr import entry_rows

from .. import _alloc

_SDDMM_CHUNK_ELEMENTS = 1 << 22


def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               row_order: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [M, m] = x [M, k] @ A^T + bias for A [m, k] in CSR (m = crow.numel() - 1), bias [m]
    or None."""
    del row_order  # the library kernel balances its own load
    (rows, k), m = x.shape, crow.numel() - 1
    cdt = compute_dtype(x.dtype)
    if m == 0 or rows == 0 or col.numel() == 0:
        y_t = torch.zeros((m, rows), dtype=cdt, device=x.device)
    else:
        y_t = csr_matrix(crow, col, values.to(cdt), (m, k)) @ x.to(cdt).t()
    if bias is not None:
        y_t += bias.to(cdt)[:, None]
    return torch.empty((rows, m), dtype=x.dtype, device=x.device).copy_(y_t.t())


def sddmm_csr(crow: torch.Tensor, col: torch.Tensor,
              x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out [nnz]: out[i] = x[row_i] . y[col_i] for x [m, n], y [k, n] and a CSR pattern."""
    nnz, n = col.numel(), x.shape[1]
    out = _alloc.empty((nnz,), x.dtype, x.device)
    rows = entry_rows(crow, nnz)
    cdt = compute_dtype(x.dtype)
    step = max(1, _SDDMM_CHUNK_ELEMENTS // max(1, n))
    for lo in range(0, nnz, step):
        hi = min(nnz, lo + step)
        out[lo:hi] = (x[rows[lo:hi]].to(cdt) * y[col[lo:hi]].to(cdt)).sum(dim=1)
    return out

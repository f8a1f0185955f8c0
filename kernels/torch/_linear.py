"""x @ W^T for a weight decoded a block of rows at a time, shared by the torch paths of
the weight formats (int4, N:M): each block is multiplied while it is still in cache, which
on a CPU beats decoding the whole weight first (measured in those modules)."""
from typing import Callable, Optional

import torch

from ._dtypes import compute_dtype

_ROWS_ELEMENTS = 1 << 18


def linear_by_row_blocks(x: torch.Tensor, out_features: int,
                         weight_rows: Callable[[int, int], torch.Tensor],
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [M, out_features] = x [M, K] @ W^T (+ bias) in x's dtype, computed in fp32 (fp64
    for fp64); ``weight_rows(lo, hi)`` gives rows lo..hi of W [out_features, K]."""
    rows, k = x.shape
    cdt = compute_dtype(x.dtype)
    xc = x.to(cdt)
    y = torch.empty(rows, out_features, dtype=cdt, device=x.device)
    step = max(1, _ROWS_ELEMENTS // max(1, k))
    for lo in range(0, out_features, step):
        hi = min(out_features, lo + step)
        torch.matmul(xc, weight_rows(lo, hi).to(cdt).t(), out=y[:, lo:hi])
    if bias is not None:
        y += bias.to(cdt)
    return y.to(x.dtype)

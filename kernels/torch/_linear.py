"""Weights decoded a block of rows at a time, shared by the torch paths of the weight
formats (int4, int8, FP8, N:M): x @ W^T with each block multiplied while it is still in
cache, which on a CPU beats decoding the whole weight first (measured in those modules),
and W itself built block by block (sparqle.formats._row_blocks), so that decoding never
holds more than W and one block."""
from typing import Callable, Optional

import torch

from sparqle.formats._checks import compute_dtype
from sparqle.formats._row_blocks import row_blocks


def linear_by_row_blocks(x: torch.Tensor, out_features: int,
                         weight_rows: Callable[[int, int], torch.Tensor],
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [M, out_features] = x [M, K] @ W^T (+ bias) in x's dtype, computed in fp32 (fp64
    for fp64); ``weight_rows(lo, hi)`` gives rows lo..hi of W [out_features, K]."""
    rows, k = x.shape
    cdt = compute_dtype(x.dtype)
    xc = x.to(cdt)
    y = torch.empty(rows, out_features, dtype=cdt, device=x.device)
    for lo, hi in row_blocks(out_features, k):
        torch.matmul(xc, weight_rows(lo, hi).to(cdt).t(), out=y[:, lo:hi])
    if bias is not None:
        y += bias.to(cdt)
    return y.to(x.dtype)

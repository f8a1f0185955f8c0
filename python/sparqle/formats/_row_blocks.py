"""Dense weights decoded a block of rows at a time (the formats' codecs and the torch
paths): each block is small enough to stay in cache while it is used, and decoding the
whole W never holds more than W and one block."""
from typing import Callable, Iterator, Tuple

import torch

from ._checks import compute_dtype

_ROWS_ELEMENTS = 1 << 18


def row_blocks(rows: int, k: int) -> Iterator[Tuple[int, int]]:
    """(lo, hi) covering range(rows) in blocks of about _ROWS_ELEMENTS elements of K."""
    step = max(1, _ROWS_ELEMENTS // max(1, k))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def dense_by_row_blocks(out_features: int, k: int, weight_rows: Callable[[int, int], torch.Tensor],
                        dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """W [out_features, k] in ``dtype`` (contiguous) from ``weight_rows(lo, hi)``, one block
    of rows at a time."""
    w = torch.empty(out_features, k, dtype=dtype, device=device)
    for lo, hi in row_blocks(out_features, k):
        w[lo:hi] = weight_rows(lo, hi)
    return w


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] = q * scale in ``dtype``, computed in fp32 (fp64 for fp64): q int8 or FP8
    [N, K], scales [N] (per row) or [1] (per tensor)."""
    n, k = q.shape
    cdt = compute_dtype(dtype)
    scales = scales.to(cdt).expand(n)
    return dense_by_row_blocks(n, k, lambda lo, hi: q[lo:hi].to(cdt) * scales[lo:hi, None], dtype, q.device)

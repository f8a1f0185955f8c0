"""int4 weight-only linear in plain PyTorch. The weight is dequantized a block of rows at a
time, (q - zero) * scale in fp32 (fp64 for fp64) rounded to x's dtype as the Triton kernel
does, and multiplied while the block is still in cache: on a 2-core CPU this is 12x faster
than dequantizing the whole weight first (measured at 4096 x 4096, M = 1). ``dequantize``
builds the whole W block by block too: its transient is W and one block (unpacking the
whole weight at once held about 16x the packed bytes)."""
import torch

from ._dtypes import compute_dtype
from ._linear import dense_by_row_blocks, linear_by_row_blocks


def _dequantize_rows(packed, scales, zeros, group_width: int, k: int, dtype: torch.dtype):
    """Rows of W = (q - zero) * scale in ``dtype``, computed in fp32 (fp64 for fp64)."""
    rows, groups = scales.shape
    cdt = compute_dtype(dtype)
    q = torch.stack([packed & 15, packed >> 4], dim=-1).view(rows, 2 * packed.shape[1])[:, :k]
    q = torch.nn.functional.pad(q, (0, groups * group_width - k)).view(rows, groups, group_width)
    w = (q.to(cdt) - zeros.to(cdt)[..., None]) * scales.to(cdt)[..., None]
    return w.view(rows, groups * group_width)[:, :k].to(dtype)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_width: int, k: int) -> torch.Tensor:
    """W [N, K] = (q - zero) * scale in the scales' dtype (contiguous)."""
    return dense_by_row_blocks(packed.shape[0], k, lambda lo, hi: _dequantize_rows(
        packed[lo:hi], scales[lo:hi], zeros[lo:hi], group_width, k, scales.dtype), scales.dtype, packed.device)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bias, group_width: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(W)^T (+ bias [N]) for an int4 W [N, K]."""
    k = x.shape[1]
    return linear_by_row_blocks(x, packed.shape[0], lambda lo, hi: _dequantize_rows(
        packed[lo:hi], scales[lo:hi], zeros[lo:hi], group_width, k, x.dtype), bias)

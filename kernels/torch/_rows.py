"""Per-row symmetric quantization shared by the int8 and FP8 torch paths, and the
recomputation of the rows a quantized x cannot carry (see kernels/triton/_rows.py for the
rules on NaN and Inf, the same here)."""
from typing import Optional, Tuple

import torch

from sparqle.formats._checks import compute_dtype

from .. import _capture
from ._linear import linear_by_row_blocks


def scaled_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor],
                qmax: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(v [M, K], scale [M]) for float x [M, K], both in fp32 (fp64 for fp64 x, whose
    range fp32 does not hold): scale = max|x[m]| / qmax (1 for an all-zero row, NaN for a
    row holding a NaN, +Inf for one holding ±Inf) or ``static_scale`` (NaN for a row holding
    a NaN), and v = x / scale (x / static_scale) with NaN replaced by 0 (contiguous, as the
    quantized q made from it must be), to be clamped to [-qmax, qmax] and rounded."""
    cdt = compute_dtype(x.dtype)
    xc = x.to(cdt)
    if static_scale is None:
        scale = xc.abs().amax(dim=1) / qmax if x.shape[1] else xc.new_zeros(x.shape[0])
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        v = xc / scale[:, None]
    else:
        static = static_scale.to(cdt).reshape(1)
        v = xc / static
        scale = torch.where(xc.isnan().any(dim=1), float("nan"), static.expand(x.shape[0]))
    return torch.where(v.isnan(), torch.zeros_like(v), v).contiguous(), scale


def redo_infinite_rows(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """y [M, N] with each row m whose x_scale[m] is +Inf (x[m] holds ±Inf) recomputed as
    x[m] @ (w * w_scale)^T + bias, whose NaN/Inf pattern is F.linear's; w [N, K] int8 or
    FP8, w_scale [N] or [1]. Eagerly the rows are found on the host and y is modified in
    place; while a CUDA graph is captured, where nothing may be read, every row is
    recomputed and the infinite ones chosen on the device (a second, float, product)."""
    n, cdt = w.shape[0], compute_dtype(x.dtype)
    scales = w_scale.to(cdt).expand(n)

    def recomputed(rows: torch.Tensor) -> torch.Tensor:
        return linear_by_row_blocks(
            rows, n, lambda lo, hi: w[lo:hi].to(cdt) * scales[lo:hi, None], bias).to(y.dtype)

    infinite = torch.isinf(x_scale)
    if _capture.capturing():
        return torch.where(infinite[:, None], recomputed(x), y)
    rows = infinite.nonzero().flatten()
    if rows.numel():
        y[rows] = recomputed(x[rows])
    return y

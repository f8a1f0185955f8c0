"""int8 linear layers in plain PyTorch (see kernels/triton/int8_linear.py for the maths).
The weight is converted a block of rows at a time (the transient is one block, never a
float copy of the weight). W8A8's product is exact: int8 x int8 sums are integers far
below 2^53, so float64 blocks compute them exactly on any device, for any K."""
from typing import Optional, Tuple

import torch

from sparqle.formats._checks import compute_dtype

from ._linear import linear_by_row_blocks
from ._rows import redo_infinite_rows, scaled_rows


def quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [M, K], scale [M] fp32, fp64 for fp64 x) for float x [M, K]."""
    v, scale = scaled_rows(x, static_scale, 127)
    return torch.round(torch.clamp(v, -127, 127)).to(torch.int8), scale


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias,
                quantize_activation: bool, smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (q_w * scale_w)^T + bias (W8A8 when ``quantize_activation``,
    of x / smoothing, divided in fp32 (fp64 for fp64 x), when given)."""
    n, cdt = qweight.shape[0], compute_dtype(x.dtype)
    if not quantize_activation:
        return linear_by_row_blocks(
            x, n, lambda lo, hi: qweight[lo:hi].to(cdt) * scales[lo:hi, None].to(cdt), bias)
    xs = x if smoothing is None else x.to(cdt) / smoothing.to(cdt)
    q, x_scale = quantize_rows(xs, None)
    y = linear_by_row_blocks(q.double(), n, lambda lo, hi: qweight[lo:hi], None)
    y = y * x_scale.double()[:, None] * scales.double()[None, :]
    if bias is not None:
        y += bias.double()
    return redo_infinite_rows(xs, x_scale, qweight, scales, bias, y.to(x.dtype))

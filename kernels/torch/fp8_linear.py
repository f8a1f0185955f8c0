"""FP8 scaled GEMM and per-row FP8 quantization in plain PyTorch (see
kernels/triton/fp8_linear.py for the maths). The product goes through the FP8 values in
fp32 (fp64 for fp64 outputs): every product of two FP8 values is exact there, so the
result equals the GPU's fp32-accumulated one to rounding. b is converted a block of rows
at a time (never a whole float copy)."""
from typing import Optional, Tuple

import torch

from sparqle.formats._checks import compute_dtype

from ._linear import linear_by_row_blocks
from ._rows import redo_infinite_rows, scaled_rows


def quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor],
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] in FP8 ``dtype``, scale [M] fp32, fp64 for fp64 x) for float x [M, K]."""
    fmax = float(torch.finfo(dtype).max)
    v, scale = scaled_rows(x, static_scale, fmax)
    return torch.clamp(v, -fmax, fmax).to(dtype), scale


def scaled_mm(a: torch.Tensor, a_scale: Optional[torch.Tensor], b: torch.Tensor,
              b_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] = (a [M, K] @ b [N, K]^T) * a_scale * b_scale + bias in ``out_dtype``; a FP8
    with a_scale [M] or [1], or float with a_scale None (weight-only); b FP8, b_scale [N] or [1]."""
    cdt = compute_dtype(out_dtype)
    y = linear_by_row_blocks(a.to(cdt), b.shape[0], lambda lo, hi: b[lo:hi], None)
    y = y * b_scale.to(cdt)[None, :]
    if a_scale is not None:
        y = y * a_scale.to(cdt)[:, None]
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(out_dtype)


def redo_rows(x: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """y [M, N] with the rows of x [M, K] that hold ±Inf (x_scale +Inf) recomputed from x as
    x @ (q_w * w_scale)^T + bias (see _rows.py); qweight FP8 [N, K]."""
    return redo_infinite_rows(x, x_scale, qweight, w_scale, bias, y)

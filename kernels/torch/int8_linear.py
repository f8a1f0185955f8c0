"""int8 linear layers in plain PyTorch (see kernels/triton/int8_linear.py for the maths).
The int8 product is exact: int8 x int8 sums are integers far below 2^53, so a float64
matmul computes them exactly on any device."""
from typing import Optional, Tuple

import torch

from ._dtypes import compute_dtype


def quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [M, K], scale fp32 [M]) for float x [M, K]."""
    xf = x.float()
    if static_scale is None:
        scale = xf.abs().amax(dim=1) / 127 if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        scale = static_scale.float().reshape(1).expand(x.shape[0]).clone()
    q = torch.round(torch.clamp(xf / scale[:, None], -127, 127))
    return q.to(torch.int8), scale


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias,
                quantize_activation: bool) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (q_w * scale_w)^T + bias (W8A8 when ``quantize_activation``)."""
    cdt = compute_dtype(x.dtype)
    if quantize_activation:
        q, x_scale = quantize_rows(x, None)
        y = ((q.double() @ qweight.double().t()) * x_scale.double()[:, None]).to(cdt)
    else:
        y = x.to(cdt) @ qweight.to(x.dtype).to(cdt).t()
    y = y * scales.to(cdt)[None, :]
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype)

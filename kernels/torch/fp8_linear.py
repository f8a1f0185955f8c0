"""FP8 scaled GEMM and per-row FP8 quantization in plain PyTorch (see
kernels/triton/fp8_linear.py for the maths). The product goes through the FP8 values in
fp32 (fp64 for fp64 outputs): every product of two FP8 values is exact there, so the
result equals the GPU's fp32-accumulated one to rounding."""
from typing import Optional, Tuple

import torch

from ._dtypes import compute_dtype


def quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor],
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] in FP8 ``dtype``, scale fp32 [M]) for float x [M, K]."""
    fmax = float(torch.finfo(dtype).max)
    xf = x.float()
    if static_scale is None:
        scale = xf.abs().amax(dim=1) / fmax if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        scale = static_scale.float().reshape(1).expand(x.shape[0]).clone()
    q = torch.clamp(xf / scale[:, None], -fmax, fmax).to(dtype)
    return q.contiguous(), scale


def scaled_mm(a: torch.Tensor, a_scale: Optional[torch.Tensor], b: torch.Tensor,
              b_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] = (a [M, K] @ b [N, K]^T) * a_scale * b_scale + bias in ``out_dtype``; a FP8
    with a_scale [M] or [1], or float with a_scale None (weight-only); b FP8, b_scale [N] or [1]."""
    cdt = compute_dtype(out_dtype)
    y = a.to(cdt) @ b.to(cdt).t()
    y = y * b_scale.to(cdt)[None, :]
    if a_scale is not None:
        y = y * a_scale.to(cdt)[:, None]
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(out_dtype)

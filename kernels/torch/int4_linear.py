"""int4 weight-only linear in plain PyTorch: the weight is dequantized to x's dtype (as the
Triton kernel does in registers) and multiplied in fp32 (fp64 for fp64)."""
import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_width: int, k: int) -> torch.Tensor:
    """W [N, K] = (q - zero) * scale in the scales' dtype, computed in fp32 (fp64 for fp64)."""
    n, cdt = packed.shape[0], _compute_dtype(scales.dtype)
    q = torch.stack([packed & 15, packed >> 4], dim=-1).view(n, 2 * packed.shape[1])[:, :k].to(cdt)
    s = scales.to(cdt).repeat_interleave(group_width, dim=1)[:, :k]
    z = zeros.to(cdt).repeat_interleave(group_width, dim=1)[:, :k]
    return ((q - z) * s).to(scales.dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bias, group_width: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(W)^T (+ bias [N]) for an int4 W [N, K]."""
    cdt = _compute_dtype(x.dtype)
    w = dequantize(packed, scales, zeros, group_width, x.shape[1]).to(x.dtype)
    y = x.to(cdt) @ w.to(cdt).t()
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype)

"""The dtype the torch path computes in: fp32 for fp16, bf16 and fp32 inputs (as the Triton
kernels accumulate), fp64 for fp64."""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32

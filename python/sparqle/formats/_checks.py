"""Helpers shared by the formats, and by the kernels and bindings that import them:
constructor checks (errors name the format and the argument), ceil division and the
dtype the decoding and the torch paths compute in."""
import operator
from typing import Dict, Tuple

import torch

INT32_MAX = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for ``dtype`` data: fp64 for fp64, else fp32 (fp16, bf16 and
    fp32 inputs, as the Triton kernels accumulate; also the dtype of the per-row scales and
    the log-sum-exp the ops return)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_shape(fmt: str, shape) -> Tuple[int, int]:
    """``shape`` as a pair (m, k) of ints >= 0; a size that is not an int (2.7, "2", True)
    is refused, not truncated."""
    try:
        sizes = tuple(shape)
    except TypeError:
        raise ValueError(f"{fmt}: shape must be a pair (m, k), got {shape!r}") from None
    try:
        if any(isinstance(s, bool) for s in sizes):
            raise TypeError
        sizes = tuple(operator.index(s) for s in sizes)
    except TypeError:
        raise TypeError(f"{fmt}: shape must hold ints, got {shape!r}") from None
    if len(sizes) != 2 or min(sizes) < 0:
        raise ValueError(f"{fmt}: shape must be 2-D with sizes >= 0, got {sizes}")
    return sizes


def check_tensors(fmt: str, indices: Dict[str, torch.Tensor], values: torch.Tensor) -> None:
    """Integer ``indices`` and floating ``values``, all tensors on values' device."""
    for name, t in (*indices.items(), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fmt}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in indices.items():
        if t.device != values.device:
            raise ValueError(f"{fmt}: {name} is on {t.device} but values is on {values.device}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{fmt}: {name} must hold integers, got {t.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"{fmt}: values must be floating point, got {values.dtype}")


def check_int32(fmt: str, name: str, largest: int) -> None:
    """Indices whose ``largest`` value fits the int32 that sparqle keeps them in (a cast
    would wrap a larger one silently)."""
    if largest > INT32_MAX:
        raise ValueError(f"{fmt}: {name} reaches {largest}, past the int32 indices sparqle keeps "
                         f"(at most 2**31 - 1 = {INT32_MAX}); split the matrix along that dimension")


def check_scales(fmt: str, scales: torch.Tensor) -> None:
    """Scales that are finite and > 0: a scale of 0, below 0, NaN or Inf dequantizes every
    weight it covers to 0, a flipped sign, NaN or Inf."""
    if scales.numel() and not bool(((scales > 0) & torch.isfinite(scales)).all()):
        bad = scales[~((scales > 0) & torch.isfinite(scales))].flatten()[0]
        raise ValueError(f"{fmt}: scales must be finite and > 0, got {float(bad)}")


def dense_and_mask(where: str, t, mask):
    """The mask of the entries ``from_dense`` keeps: ``mask`` (checked), else ``t != 0``."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{where}: t must be a 2-D tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if mask is None:
        return t != 0
    if not isinstance(mask, torch.Tensor) or mask.shape != t.shape or mask.dtype != torch.bool:
        raise ValueError(f"{where}: mask must be a bool tensor of shape {tuple(t.shape)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    return mask


def check_float_weight(w) -> None:
    """A 2-D, finite, floating-point weight [out, in], as the quantizers need."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w holds NaN or Inf: it cannot be quantized")

"""The ops users call: ``spmm`` (sparse x dense) and ``linear`` (x @ W^T + bias), each
dispatching on the weight format to its op in sparqle.registry. Arguments are checked here,
with errors that name them."""
from typing import Optional

import torch
import torch.nn.functional as F

from sparqle.kernels._capture import check_values

from . import registry
from .formats import FP8Weight, Int8Weight
from .formats.fp8 import fp8_dtype


def _check_tensor(name: str, t, dims: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_matches(name: str, t: torch.Tensor, fmt_name: str, fmt) -> None:
    if t.dtype != fmt.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {fmt_name} has {fmt.dtype}; they must match")
    if t.device != fmt.device:
        raise ValueError(f"{name} is on {t.device} but {fmt_name} is on {fmt.device}")


def _check_static_scale(static_scale, x: torch.Tensor) -> None:
    """A static activation scale: a 1-element real tensor on x's device whose value, in the
    fp32 the kernels use, is finite and > 0 (read as window's index checks are)."""
    if static_scale is None:
        return
    if not isinstance(static_scale, torch.Tensor) or static_scale.numel() != 1:
        raise ValueError("static_scale must be a 1-element tensor")
    if static_scale.dtype == torch.bool or static_scale.is_complex():
        raise TypeError(f"static_scale must hold a real number, got {static_scale.dtype}")
    if static_scale.device != x.device:
        raise ValueError(f"static_scale is on {static_scale.device} but x is on {x.device}")
    scale = static_scale.float()
    check_values(lambda: (torch.isfinite(scale) & (scale > 0)).all(),
                 "static_scale must be finite and > 0 (in fp32)")


def spmm(a, b: torch.Tensor) -> torch.Tensor:
    """C [m, n] = a @ b for a sparse weight format ``a`` [m, k] and dense ``b`` [k, n].

    Differentiable in ``b`` and in the format's values (its pattern is fixed). Computed as
    (b^T @ a^T)^T by the format's linear op, which reads b^T through strides.
    """
    entry = registry.weight_op(a, "a", sparse_only=True)
    _check_tensor("b", b, dims=2)
    if b.shape[0] != a.shape[1]:
        raise ValueError(f"b must have a.shape[1] = {a.shape[1]} rows, got shape {tuple(b.shape)}")
    _check_matches("b", b, "a", a)
    return entry.linear(b.t(), a, None).t().contiguous()


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., k] as a 2-D [rows, k] (x itself when 2-D, else a view where strides allow),
    k = 0 included."""
    return x if x.dim() == 2 else x.reshape(x.shape[:-1].numel(), k)


def _unrows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y [rows, n] computed from ``_rows(x)`` as [..., n] with x's leading dimensions (y
    itself when x is 2-D)."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor] = None):
    """(q int8 [M, K], scale [M] fp32, fp64 for fp64 x): x [M, K] quantized per row,
    symmetric, to int8: scale = max|x[m]| / 127 (or ``static_scale``),
    q = clamp(round(x / scale), -127, 127); see docs/int8.md for NaN and Inf."""
    _check_tensor("x", x, dims=2)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    _check_static_scale(static_scale, x)
    return torch.ops.sparqle.int8_quantize_rows(x, static_scale)


def _check_linear(x: torch.Tensor, w, bias: Optional[torch.Tensor]) -> None:
    out_features, in_features = w.shape
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have w.shape[1] = {in_features} features in its last "
                         f"dimension, got shape {tuple(x.shape)}")
    _check_matches("x", x, "w", w)
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        _check_matches("bias", bias, "w", w)


def linear(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., out] = x [..., in] @ W^T + bias, W [out, in] a weight format (or a dense
    tensor, which goes to ``torch.nn.functional.linear``); y has x's dtype. An Int8Weight
    runs W8A8 (see :func:`int8_linear` for W8A16)."""
    _check_tensor("x", x)
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    entry = registry.BY_FORMAT.get(type(w))
    if entry is None:
        raise TypeError(f"w must be a torch.Tensor or one of the formats "
                        f"{[f.__name__ for f in registry.BY_FORMAT]}, got {type(w).__name__}")
    _check_linear(x, w, bias)
    return _unrows(entry.linear(_rows(x, w.shape[1]), w, bias), x)


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: Optional[torch.Tensor] = None,
                activation: Optional[str] = "dynamic", smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., out] = x [..., in] @ dequant(W)^T + bias for an Int8Weight W: x quantized per
    token to int8 (``activation="dynamic"``, W8A8) or kept in its float dtype
    (``activation=None``, W8A16). ``smoothing`` (W8A8; fp32 [in], > 0: SmoothQuant's s,
    sparqle.quantize.smoothquant_scale): x / s is quantized instead, the division fused
    into the quantizer: y = (x / s) @ dequant(W)^T + bias."""
    _check_tensor("x", x)
    if not isinstance(w, Int8Weight):
        raise TypeError(f"w must be a sparqle.Int8Weight, got {type(w).__name__}")
    if activation not in ("dynamic", None):
        raise ValueError(f"activation must be 'dynamic' or None, got {activation!r}")
    if smoothing is not None and not isinstance(smoothing, torch.Tensor):
        raise TypeError(f"smoothing must be a torch.Tensor or None, got {type(smoothing).__name__}")
    _check_linear(x, w, bias)
    return _unrows(registry.BY_FORMAT[Int8Weight].call(_rows(x, w.shape[1]), (w.qweight, w.scales), bias,
                                                       (activation == "dynamic", smoothing)), x)


def fp8_linear(x: torch.Tensor, w: FP8Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., out] = x [..., in] @ dequant(W)^T + bias for an FP8Weight W, y in x's dtype.
    With more than 16 tokens (rows of x) each is quantized to e4m3 with its own scale and
    the product runs FP8 x FP8 with fp32 accumulation (W8A8); with 16 or fewer x stays in
    its float dtype (weight-only), as the GEMM is then bound by reading the weight."""
    _check_tensor("x", x)
    if not isinstance(w, FP8Weight):
        raise TypeError(f"w must be a sparqle.FP8Weight, got {type(w).__name__}")
    _check_linear(x, w, bias)
    return _unrows(registry.BY_FORMAT[FP8Weight].linear(_rows(x, w.shape[1]), w, bias), x)


def fp8_quantize_rows(x: torch.Tensor, dtype="e4m3", static_scale: Optional[torch.Tensor] = None):
    """(q [M, K] in FP8 ``dtype``, scale [M] fp32, fp64 for fp64 x): x [M, K] quantized per
    row, symmetric: scale = max|x[m]| / the dtype's max (or ``static_scale``),
    q = fp8(clamp(x / scale)); see docs/fp8.md for NaN and Inf."""
    _check_tensor("x", x, dims=2)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    target = fp8_dtype(dtype)
    _check_static_scale(static_scale, x)
    return torch.ops.sparqle.fp8_quantize_rows(x, static_scale, target)


def fp8_training_linear(x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., out] = x [..., in] @ weight^T + bias with the forward GEMM and both backward
    GEMMs in FP8 (e4m3 x and weight, e5m2 gradient, dynamic per-row scales along each
    GEMM's non-reduced axes); ``weight`` [out, in] is a float tensor (the master weight).
    The dtypes may differ (bf16 x with an fp32 master weight): y and dx take x's dtype, dW
    the weight's, dbias the bias's."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(name, t)
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
            if t.device != weight.device:
                raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have weight.shape[1] = {weight.shape[1]} features in its last "
                         f"dimension, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    fp8_dtype("e4m3", "fp8_training_linear")
    return _unrows(torch.ops.sparqle.fp8_training_linear(_rows(x, weight.shape[1]), weight, bias), x)


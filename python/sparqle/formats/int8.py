"""int8 weights, symmetric, one scale per output channel.

For W [N, K]: scale[n] = max|W[n]| / 127 (1 for an all-zero row), and
q = clamp(round(W / scale), -127, 127) with round half to even. ``qweight`` is int8 [N, K]
in [-127, 127] (-128 has no positive twin in a symmetric code: it is refused);
``scales`` [N], finite and > 0, are fp32 (fp64 for an fp64 weight), whatever the layer's
float ``dtype``: an fp16 scale would underflow for rows below about 1e-5 (max / 127 under
fp16's smallest subnormal); W ~= q * scale.
"""
from typing import Optional

import torch

from ._base import WeightFormat
from ._checks import check_float_weight, check_scales, compute_dtype


class Int8Weight(WeightFormat):
    """A [N, K] weight in int8 with a scale per output channel (see the module doc).
    Attributes: ``qweight`` (int8 [N, K]), ``scales`` ([N], float), ``dtype`` (the float
    dtype of the layer's x, bias and y; default the scales' dtype), ``shape``.
    ``to(dtype=)`` sets ``dtype`` and casts ``scales`` to its compute dtype (fp32, fp64 for
    fp64), through the checked constructor (a scale that fp32 cannot hold is refused);
    ``qweight`` stays int8."""

    tensor_names = ("qweight", "scales")
    setting_names = ("dtype",)
    dtype_follows = {"scales": compute_dtype}
    checked_to = True

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: Optional[torch.dtype] = None):
        for name, t in (("qweight", qweight), ("scales", scales)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Int8Weight: {name} must be a torch.Tensor, got {type(t).__name__}")
        if qweight.dtype != torch.int8:
            raise TypeError(f"Int8Weight: qweight must be int8, got {qweight.dtype}")
        if not scales.is_floating_point():
            raise TypeError(f"Int8Weight: scales must be floating point, got {scales.dtype}")
        if qweight.dim() != 2 or tuple(scales.shape) != (qweight.shape[0],):
            raise ValueError(f"Int8Weight: qweight must be 2-D [N, K] and scales [N], got "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
        if qweight.device != scales.device:
            raise ValueError(f"Int8Weight: qweight is on {qweight.device} but scales is on {scales.device}")
        if qweight.numel() and bool((qweight == -128).any()):
            raise ValueError("Int8Weight: qweight holds -128; the symmetric code is [-127, 127]")
        check_scales("Int8Weight", scales)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Int8Weight: dtype must be a floating-point torch.dtype, got {dtype!r}")
        self._fill(qweight=qweight, scales=scales, dtype=scales.dtype if dtype is None else dtype)

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Weight":
        """Quantize a 2-D float weight [N, K] (see the module doc)."""
        check_float_weight(w)
        wc = w.detach().to(compute_dtype(w.dtype))
        amax = wc.abs().amax(dim=1) if w.shape[1] else wc.new_zeros(w.shape[0])
        scales = amax / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.clamp(torch.round(wc / scales[:, None]), -127, 127)
        return cls(q.to(torch.int8), scales, w.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def dequantize(self) -> torch.Tensor:
        """q * scale, [N, K] in ``dtype`` (computed in fp32, fp64 for fp64)."""
        cdt = compute_dtype(self.dtype)
        return (self.qweight.to(cdt) * self.scales.to(cdt)[:, None]).to(self.dtype)

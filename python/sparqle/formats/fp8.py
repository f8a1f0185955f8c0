"""FP8 weights (e4m3fn or e5m2), one fp32 scale per output row or per tensor.

For W [N, K] and the FP8 dtype's largest finite value ``fmax`` (448 for e4m3fn, 57344 for
e5m2): scale = amax / fmax in fp32, where amax is max|W[n]| (``granularity="row"``, scales
[N]) or max|W| (``granularity="tensor"``, a 0-dim scale); an all-zero row or tensor gets
scale 1, and hand-built scales must be finite and > 0; a row (tensor) whose scale fp32
cannot hold (an fp64 weight beyond fp32's range) is refused. q = fp8(clamp(W / scale,
-fmax, fmax)), the division in fp32 (fp64 for fp64 weights) and the cast round to nearest
even; the clamp comes first because torch's cast of an out-of-range value to e4m3fn is NaN.
W ~= q * scale.
"""

import torch

from ._base import WeightFormat
from ._checks import check_float_weight, check_scales, compute_dtype

GRANULARITIES = ("row", "tensor")
_NAMES = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2",
          "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}
_LAYER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fp8_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """``dtype`` (torch.float8_e4m3fn, torch.float8_e5m2, or the strings "e4m3", "e5m2",
    "float8_e4m3fn", "float8_e5m2") as a torch dtype; the error names argument ``name``."""
    key = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if key not in _NAMES:
        raise ValueError(f"{name} must be torch.float8_e4m3fn, torch.float8_e5m2, 'e4m3' or "
                         f"'e5m2', got {dtype!r}")
    found = getattr(torch, _NAMES[key], None)
    if found is None:
        raise TypeError(f"{name}={dtype!r}: this torch ({torch.__version__}) has no float8 dtypes; "
                        f"FP8 needs torch >= 2.1")
    return found


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def check_granularity(granularity, name: str = "granularity") -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"{name} must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


class FP8Weight(WeightFormat):
    """A [N, K] weight in FP8 with fp32 scales (see the module doc).
    Attributes: ``qweight`` (float8_e4m3fn or float8_e5m2 [N, K]), ``scales`` (fp32 [N] for
    row-wise, 0-dim for tensor-wise), ``dtype`` (the float dtype of the layer: fp16, bf16,
    fp32 or fp64), ``shape``, ``granularity``. ``to(dtype=)`` sets ``dtype`` only (checked:
    one of those four); the FP8 values and the fp32 scales stay as they are."""

    tensor_names = ("qweight", "scales")
    setting_names = ("dtype",)
    checked_to = True
    repr_names = ("fp8_dtype", "granularity")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
        for name, t in (("qweight", qweight), ("scales", scales)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"FP8Weight: {name} must be a torch.Tensor, got {type(t).__name__}")
        fp8_dtype(qweight.dtype, "FP8Weight: qweight.dtype")
        if scales.dtype != torch.float32:
            raise TypeError(f"FP8Weight: scales must be float32, got {scales.dtype}")
        if dtype not in _LAYER_DTYPES:
            raise TypeError(f"FP8Weight: dtype must be one of {[str(d) for d in _LAYER_DTYPES]}, got {dtype!r}")
        if qweight.dim() != 2 or tuple(scales.shape) not in ((qweight.shape[0],), ()):
            raise ValueError(f"FP8Weight: qweight must be 2-D [N, K] and scales [N] (row-wise) or "
                             f"0-dim (tensor-wise), got {tuple(qweight.shape)} and {tuple(scales.shape)}")
        if qweight.device != scales.device:
            raise ValueError(f"FP8Weight: qweight is on {qweight.device} but scales is on {scales.device}")
        check_scales("FP8Weight", scales)
        self._fill(qweight=qweight, scales=scales, dtype=dtype)

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype="e4m3", granularity: str = "row") -> "FP8Weight":
        """Quantize a 2-D float weight [N, K] to FP8 ``dtype`` (torch.float8_e4m3fn or
        torch.float8_e5m2, or "e4m3" / "e5m2") with ``granularity`` "row" or "tensor"."""
        target = fp8_dtype(dtype)
        check_granularity(granularity)
        check_float_weight(w)
        w = w.detach()
        fmax = fp8_max(target)
        if granularity == "row":
            amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
        else:
            amax = w.abs().amax() if w.numel() else w.new_zeros(())
        scales = amax.float() / fmax
        if bool((~torch.isfinite(scales) | ((scales == 0) & (amax > 0))).any()):
            raise ValueError(f"FP8Weight.from_float: max|w| / {fmax:g} lies outside float32's range for "
                             f"some {granularity}s (|w| up to {float(amax.max()):g}, down to "
                             f"{float(amax[amax > 0].min()):g}): the scales are fp32; rescale w")
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        cdt = compute_dtype(w.dtype)
        column = scales.to(cdt)[:, None] if granularity == "row" else scales.to(cdt)
        q = torch.clamp(w.to(cdt) / column, -fmax, fmax).to(target)
        return cls(q, scales, w.dtype)

    @property
    def granularity(self) -> str:
        return "tensor" if self.scales.dim() == 0 else "row"

    @property
    def fp8_dtype(self) -> torch.dtype:
        return self.qweight.dtype

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def dequantize(self) -> torch.Tensor:
        """q * scale, [N, K] in ``dtype`` (computed in fp32, fp64 for fp64)."""
        cdt = compute_dtype(self.dtype)
        scales = self.scales.to(cdt)
        return (self.qweight.to(cdt) * (scales[:, None] if scales.dim() else scales)).to(self.dtype)

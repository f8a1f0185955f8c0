"""Int8Linear: W8A8 (dynamic per-token activation scales) or weight-only W8A16."""
from typing import Optional

import torch
from torch import nn

from ..calibrate import INT8_METHODS, InputStats, check_method
from ..formats import Int8Weight
from ..formats._checks import compute_dtype
from ..functional import int8_linear
from ..quantize import gptq_int8, smoothquant_scale
from ._load import ConvertedLinear, bias_parameter

_ACTIVATIONS = ("dynamic", None)


class Int8Linear(ConvertedLinear):
    """A linear layer with an int8 weight, one scale per output channel.

    ``activation="dynamic"`` (default) quantizes each token (row) of x to int8 with its own
    scale and multiplies on int8 tensor cores (W8A8); ``activation=None`` keeps x in its
    float dtype (W8A16). ``qweight`` and ``scales`` are buffers (frozen; state_dict and
    weights_only loads work, the activation mode travels in the state_dict, and a load is
    checked as Int8Weight's constructor checks its arguments; ``scales`` stay fp32 through
    ``model.half()``, see sparqle.formats.int8); the layer runs in x's float dtype; the bias
    stays a Parameter; gradients reach x through the dequantized weight.

    ``smoothing`` (W8A8 only; ``method="smoothquant"`` sets it): s [in] > 0, float32, a
    buffer. The layer then holds W diag(s) in ``weight`` and computes
    y = quantize(x / s) (W diag(s))^T + bias: the same product, with the activations'
    outlier channels divided down before they are rounded (sparqle.quantize,
    docs/calibration.md). The division is fused into the activations' quantizer (no extra
    op or pass over x), in fp32 (fp64 for fp64 x).
    """

    def __init__(self, weight: Int8Weight, bias: Optional[torch.Tensor] = None,
                 activation: Optional[str] = "dynamic", smoothing: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(weight, Int8Weight):
            raise TypeError(f"weight must be a sparqle.Int8Weight, got {type(weight).__name__}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.out_features, self.in_features = weight.shape
        self.activation = activation
        self._register_format_tensors(weight)
        self.bias = bias_parameter(bias, self.out_features)
        if smoothing is not None:
            _check_smoothing(smoothing, self.in_features, activation)
            smoothing = smoothing.detach().to(weight.qweight.device, torch.float32).contiguous()
        self.register_buffer("smoothing", smoothing)

    @classmethod
    def from_linear(cls, linear_: nn.Linear, activation: Optional[str] = "dynamic", *,
                    method: Optional[str] = None, stats: Optional[InputStats] = None) -> "Int8Linear":
        """Quantize ``linear_``'s weight: ``method`` ``"absmax"`` (the default without
        ``stats``) as :meth:`sparqle.Int8Weight.from_float`, ``"gptq"`` (the default with
        ``stats``, the layer's calibration inputs, see sparqle.calibrate) as
        :func:`sparqle.quantize.gptq_int8`, the same grid with GPTQ rounding, or
        ``"smoothquant"`` (W8A8 only; needs ``stats.abs_max``): W diag(s) by absmax, s =
        :func:`sparqle.quantize.smoothquant_scale`, kept as ``smoothing``."""
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear_).__name__}")
        method = check_method(method, stats, INT8_METHODS, linear_)
        w = linear_.weight.detach()
        if method == "smoothquant":
            if activation != "dynamic":
                raise ValueError("method='smoothquant' scales the activations that W8A8 quantizes; "
                                 "with activation=None they stay float: use 'absmax' or 'gptq'")
            if stats.abs_max is None:
                raise ValueError("method='smoothquant' needs stats.abs_max (the largest |x| of each "
                                 "input feature), which sparqle.calibrate.collect records")
            s = smoothquant_scale(w, stats.abs_max)
            scaled = w.to(compute_dtype(w.dtype)) * s.to(compute_dtype(w.dtype))
            weight = Int8Weight.from_float(scaled).to(dtype=w.dtype)
            return cls(weight, linear_.bias, activation, s)._follow(linear_, None)
        weight = gptq_int8(w, stats.xtx) if method == "gptq" else Int8Weight.from_float(w)
        return cls(weight, linear_.bias, activation)._follow(linear_, None)

    @property
    def weight(self) -> Int8Weight:
        """The weight over this module's buffers (no copy, no checks: they were checked when
        built or loaded)."""
        return self._weight(self.scales.dtype)

    def settings(self):
        settings = {"format": "int8", "activation": self.activation,
                    "out_features": self.out_features, "in_features": self.in_features}
        if self.smoothing is not None:  # absent, not False: checkpoints from before it load
            settings["smoothed"] = True
        return settings

    @classmethod
    def _from_state(cls, settings, tensors):
        weight = Int8Weight(tensors["qweight"], tensors["scales"])
        cls._check_recorded_shape(weight.shape, settings, "qweight")
        smoothing = tensors["smoothing"] if settings.get("smoothed") else None
        return cls(weight, tensors.get("bias"), settings["activation"], smoothing)

    def _check_state(self, tensors):
        weight = Int8Weight(tensors["qweight"], tensors["scales"])
        if "smoothing" in tensors:
            _check_smoothing(tensors["smoothing"], weight.shape[1], self.activation)

    def _apply(self, fn, recurse=True):
        """As nn.Module's, but ``scales`` keeps its dtype through ``model.half()`` or
        ``model.to(dtype)`` (an fp16 scale underflows for small rows): it follows the
        device only."""
        kept = {name: getattr(self, name) for name in ("scales", "smoothing") if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            if getattr(self, name).dtype != before.dtype:
                setattr(self, name, before.to(getattr(self, name).device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        return int8_linear(x, self._weight(x.dtype), self.bias, self.activation, self.smoothing)

    def _weight(self, dtype: torch.dtype) -> Int8Weight:
        """The weight over this module's buffers for layer float dtype ``dtype`` (no copy, no
        checks: they were checked when built or loaded)."""
        return Int8Weight._trusted(**self._held(Int8Weight.tensor_names), dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation}, bias={self.bias is not None}"
                + (", smoothed" if self.smoothing is not None else ""))


def _check_smoothing(smoothing, in_features: int, activation: Optional[str]) -> None:
    """SmoothQuant's s: a finite, positive floating-point [in_features] tensor, with W8A8."""
    if not isinstance(smoothing, torch.Tensor) or not smoothing.is_floating_point():
        raise TypeError(f"smoothing must be a floating-point tensor, got "
                        f"{smoothing.dtype if isinstance(smoothing, torch.Tensor) else type(smoothing).__name__}")
    if tuple(smoothing.shape) != (in_features,):
        raise ValueError(f"smoothing must have shape ({in_features},) (one scale per input feature), "
                         f"got {tuple(smoothing.shape)}")
    if not bool(torch.isfinite(smoothing).all()) or not bool((smoothing > 0).all()):
        raise ValueError("smoothing must be finite and > 0")
    if activation != "dynamic":
        raise ValueError("smoothing scales the activations that W8A8 quantizes: it needs "
                         "activation='dynamic'")

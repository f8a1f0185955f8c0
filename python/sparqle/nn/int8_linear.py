"""Int8Linear: W8A8 (dynamic per-token activation scales) or weight-only W8A16."""
from typing import Optional

import torch
from torch import nn

from ..calibrate import INT8_METHODS, InputStats, check_method
from ..formats import Int8Weight
from ..functional import int8_linear
from ..quantize import gptq_int8
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
    """

    def __init__(self, weight: Int8Weight, bias: Optional[torch.Tensor] = None,
                 activation: Optional[str] = "dynamic"):
        super().__init__()
        if not isinstance(weight, Int8Weight):
            raise TypeError(f"weight must be a sparqle.Int8Weight, got {type(weight).__name__}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.out_features, self.in_features = weight.shape
        self.activation = activation
        self._register_format_tensors(weight)
        self.bias = bias_parameter(bias, self.out_features)

    @classmethod
    def from_linear(cls, linear_: nn.Linear, activation: Optional[str] = "dynamic", *,
                    method: Optional[str] = None, stats: Optional[InputStats] = None) -> "Int8Linear":
        """Quantize ``linear_``'s weight: ``method`` ``"absmax"`` (the default without
        ``stats``) as :meth:`sparqle.Int8Weight.from_float`, or ``"gptq"`` (the default with
        ``stats``, the layer's calibration inputs, see sparqle.calibrate) as
        :func:`sparqle.quantize.gptq_int8`, the same grid with GPTQ rounding."""
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear_).__name__}")
        method = check_method(method, stats, INT8_METHODS, linear_)
        w = linear_.weight.detach()
        weight = gptq_int8(w, stats.xtx) if method == "gptq" else Int8Weight.from_float(w)
        return cls(weight, linear_.bias, activation)._follow(linear_, None)

    @property
    def weight(self) -> Int8Weight:
        """The weight over this module's buffers (no copy, no checks: they were checked when
        built or loaded)."""
        return self._weight(self.scales.dtype)

    def settings(self):
        return {"format": "int8", "activation": self.activation,
                "out_features": self.out_features, "in_features": self.in_features}

    @classmethod
    def _from_state(cls, settings, tensors):
        weight = Int8Weight(tensors["qweight"], tensors["scales"])
        cls._check_recorded_shape(weight.shape, settings, "qweight")
        return cls(weight, tensors.get("bias"), settings["activation"])

    def _check_state(self, tensors):
        Int8Weight(tensors["qweight"], tensors["scales"])

    def _apply(self, fn, recurse=True):
        """As nn.Module's, but ``scales`` keeps its dtype through ``model.half()`` or
        ``model.to(dtype)`` (an fp16 scale underflows for small rows): it follows the
        device only."""
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        return int8_linear(x, self._weight(x.dtype), self.bias, self.activation)

    def _weight(self, dtype: torch.dtype) -> Int8Weight:
        """The weight over this module's buffers for layer float dtype ``dtype`` (no copy, no
        checks: they were checked when built or loaded)."""
        return Int8Weight._trusted(**self._held(Int8Weight.tensor_names), dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation}, bias={self.bias is not None}")

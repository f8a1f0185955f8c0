"""FP8Linear: W8A8 FP8 inference with a frozen FP8 weight, or FP8 training with a master weight."""
from typing import Optional

import torch
from torch import nn

from ..formats import FP8Weight
from ..formats.fp8 import check_granularity, fp8_dtype
from ..functional import fp8_linear, fp8_training_linear
from ._load import ConvertedLinear, bias_parameter


class FP8Linear(ConvertedLinear):
    """A linear layer whose GEMMs run in FP8.

    Inference (``training=False``): the weight is an FP8Weight (e4m3 or e5m2, a scale per
    output row or per tensor), kept as buffers: ``qweight`` holds the FP8 bits as uint8 (so
    that ``model.half()`` or ``model.to(dtype)`` leave them alone) and ``scales`` fp32 (which
    those keep fp32 too).
    Each token of x is quantized to e4m3 with its own scale (see
    :func:`sparqle.fp8_linear`); gradients reach x through the dequantized weight and the
    bias, the FP8 weight is frozen.

    Training (``training=True``): ``weight`` is the high-precision master weight, an
    nn.Parameter; every call quantizes x and the weight to e4m3 and the backward runs
    dgrad and wgrad in FP8 with an e5m2 gradient (see
    :func:`sparqle.functional.fp8_training_linear`).

    The mode, FP8 dtype and granularity travel in the state_dict; a load is checked as
    FP8Weight's constructor checks its arguments.
    """

    def __init__(self, weight, bias: Optional[torch.Tensor] = None, training: bool = False):
        super().__init__()
        self.fp8_training = bool(training)
        if self.fp8_training:
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
                raise TypeError("weight must be a 2-D floating-point tensor (the master weight) "
                                f"when training=True, got {type(weight).__name__}")
            fp8_dtype("e4m3", "training")
            self.out_features, self.in_features = weight.shape
            self.weight = nn.Parameter(weight.detach().clone())
            self.fp8_dtype, self.granularity = None, None
        else:
            if not isinstance(weight, FP8Weight):
                raise TypeError(f"weight must be a sparqle.FP8Weight, got {type(weight).__name__}")
            self.out_features, self.in_features = weight.shape
            self.fp8_dtype, self.granularity = weight.fp8_dtype, weight.granularity
            self._register_format_tensors(weight)
            self.qweight = self.qweight.view(torch.uint8)
        self.bias = bias_parameter(bias, self.out_features)

    @classmethod
    def from_linear(cls, linear_: nn.Linear, dtype="e4m3", granularity: str = "row",
                    training: bool = False) -> "FP8Linear":
        """From an nn.Linear: its weight quantized to FP8 ``dtype`` with ``granularity``
        ("row" or "tensor"), or kept as the master weight with ``training=True``."""
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear_).__name__}")
        if training:
            if fp8_dtype(dtype) != torch.float8_e4m3fn or check_granularity(granularity) != "row":
                raise ValueError("training=True runs the fixed recipe (e4m3 forward, e5m2 gradients, "
                                 f"row-wise scales): dtype must be 'e4m3' and granularity 'row', got "
                                 f"{dtype!r} and {granularity!r}")
            return cls(linear_.weight.detach(), linear_.bias, training=True)._follow(linear_, "weight")
        weight = FP8Weight.from_float(linear_.weight.detach(), dtype, granularity)
        return cls(weight, linear_.bias)._follow(linear_, None)

    def quantized_weight(self, dtype: torch.dtype) -> FP8Weight:
        """The inference weight as an FP8Weight for activations of ``dtype`` (over this
        module's buffers: no copy, no checks, as they were checked when built or loaded)."""
        tensors = self._held(FP8Weight.tensor_names)
        tensors["qweight"] = tensors["qweight"].view(self.fp8_dtype)
        return FP8Weight._trusted(**tensors, dtype=dtype)

    def settings(self):
        return {"format": "fp8", "training": self.fp8_training,
                "fp8_dtype": None if self.fp8_dtype is None else str(self.fp8_dtype).replace("torch.", ""),
                "granularity": self.granularity,
                "out_features": self.out_features, "in_features": self.in_features}

    @classmethod
    def _from_state(cls, settings, tensors):
        if settings["training"]:
            weight = tensors["weight"]
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                cls._check_recorded_shape(weight.shape, settings, "weight")
            return cls(weight, tensors.get("bias"), training=True)
        qweight = tensors["qweight"]
        if qweight.dtype != torch.uint8:
            raise TypeError(f"qweight must hold the FP8 bits as uint8, got {qweight.dtype}")
        weight = FP8Weight(qweight.view(fp8_dtype(settings["fp8_dtype"], "fp8_dtype")), tensors["scales"])
        cls._check_recorded_shape(weight.shape, settings, "qweight")
        return cls(weight, tensors.get("bias"))

    def _check_state(self, tensors):
        if not self.fp8_training:
            FP8Weight(tensors["qweight"].view(self.fp8_dtype), tensors["scales"])

    def _apply(self, fn, recurse=True):
        """As nn.Module's, but ``scales`` keeps fp32 through ``model.half()`` or
        ``model.to(dtype)`` (a scale rounded to fp16 loses bits, or underflows to 0): it
        follows the device only."""
        scales = None if self.fp8_training else self.scales
        super()._apply(fn, recurse)
        if scales is not None and self.scales.dtype != torch.float32:
            self.scales = scales.to(self.scales.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_training:
            return fp8_training_linear(x, self.weight, self.bias)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.bias is not None and x.dtype != self.bias.dtype:
            raise TypeError(f"x has dtype {x.dtype} but this FP8Linear is in {self.bias.dtype} "
                            f"(its bias); pass x in {self.bias.dtype}, or convert the layer with "
                            f".to({x.dtype})")
        return fp8_linear(x, self.quantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        kind = ("training=True" if self.fp8_training
                else f"fp8_dtype={self.fp8_dtype}, granularity={self.granularity}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"bias={self.bias is not None}")

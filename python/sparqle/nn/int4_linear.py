"""Int4Linear: y = x @ dequant(W)^T + b with W in 4 bits and group-wise scales (W4A16)."""
from typing import Optional

import torch
from torch import nn

from ..calibrate import INT4_METHODS, InputStats, check_method
from ..formats import Int4Weight
from ..formats.int4 import PACKING, from_k_order
from ..functional import linear
from ..quantize import gptq_int4
from ._load import ConvertedLinear, bias_parameter


class Int4Linear(ConvertedLinear):
    """A linear layer whose weight is an :class:`~sparqle.Int4Weight`.

    The packed weight, scales and zeros are buffers (frozen; ``state_dict()`` round-trips
    and ``torch.save`` loads with weights_only; group size and symmetry travel in it, and a
    load is checked as Int4Weight's constructor checks its arguments); the bias stays a
    Parameter. Gradients flow to the input through the dequantized weight, so adapters
    (QLoRA-style) train on top.
    """

    def __init__(self, weight: Int4Weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(weight, Int4Weight):
            raise TypeError(f"weight must be a sparqle.Int4Weight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.group_size, self.symmetric = weight.group_size, weight.symmetric
        self._register_format_tensors(weight)
        self.bias = bias_parameter(bias, self.out_features)

    @classmethod
    def from_linear(cls, linear_: nn.Linear, group_size: int = 128, *, method: Optional[str] = None,
                    symmetric: bool = False, stats: Optional[InputStats] = None) -> "Int4Linear":
        """Quantize ``linear_``'s weight: ``method`` ``"minmax"`` (the default without
        ``stats``), ``"mse"`` or ``"hqq"`` as :meth:`sparqle.Int4Weight.from_float`; ``"gptq"``
        (the default with ``stats``, the layer's calibration inputs, see sparqle.calibrate)
        as :func:`sparqle.quantize.gptq_int4`. ``"awq"`` rescales the layers that feed this
        one, so it is a whole model's: ``sparqle.convert(model, "int4", calibrate=run,
        method="awq")`` (sparqle.awq)."""
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear_).__name__}")
        method = check_method(method, stats, INT4_METHODS, linear_)
        if method == "awq":
            raise ValueError("method='awq' folds its scales into the layers that feed this one: "
                             "use sparqle.convert(model, 'int4', calibrate=run, method='awq')")
        w = linear_.weight.detach()
        if method == "gptq":
            weight = gptq_int4(w, stats.xtx, group_size, symmetric=symmetric)
        else:
            weight = Int4Weight.from_float(w, group_size, symmetric=symmetric, method=method)
        return cls(weight, linear_.bias)._follow(linear_, None)

    @property
    def weight(self) -> Int4Weight:
        """The weight over this module's buffers (no copy, no checks: they were checked when
        built or loaded)."""
        return Int4Weight._trusted(**self._held(Int4Weight.tensor_names),
                                   shape=(self.out_features, self.in_features),
                                   group_size=self.group_size, symmetric=self.symmetric)

    def settings(self):
        return {"format": "int4", "group_size": self.group_size, "symmetric": self.symmetric,
                "out_features": self.out_features, "in_features": self.in_features, "packing": PACKING}

    @classmethod
    def upgrade_state(cls, state, prefix):
        """A state_dict whose settings lack ``packing`` was saved before the interleaved
        tiles: its ``packed`` holds K-order rows [N, ceil(K / 2)], repacked here
        (sparqle.formats.int4.from_k_order), and its settings gain the layout's name.
        Entries that are not what that version saved are left for the load's checks to
        refuse."""
        settings = state.get(prefix + "_extra_state")
        rows, zeros = state.get(prefix + "packed"), state.get(prefix + "zeros")
        if not isinstance(settings, dict) or "packing" in settings or settings.get("format") != "int4":
            return
        k = settings.get("in_features")
        if (isinstance(k, int) and isinstance(rows, torch.Tensor) and isinstance(zeros, torch.Tensor)
                and rows.dtype == torch.uint8 and rows.dim() == 2 and rows.shape[1] == -(-k // 2)
                and zeros.dim() == 2 and zeros.shape[0] == rows.shape[0] and (zeros.shape[1] or not k)):
            state[prefix + "packed"] = from_k_order(rows, zeros, k)
        state[prefix + "_extra_state"] = {**settings, "packing": PACKING}

    @classmethod
    def _from_state(cls, settings, tensors):
        weight = Int4Weight(tensors["packed"], tensors["scales"], tensors["zeros"],
                            (settings["out_features"], settings["in_features"]),
                            settings["group_size"], settings["symmetric"])
        return cls(weight, tensors.get("bias"))

    def _check_state(self, tensors):
        Int4Weight(tensors["packed"], tensors["scales"], tensors["zeros"],
                   (self.out_features, self.in_features), self.group_size, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")

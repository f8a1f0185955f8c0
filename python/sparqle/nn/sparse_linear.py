"""SparseLinear: y = x @ W^T + b with W [out, in] sparse, its pattern fixed and its
stored values trainable."""
from typing import Optional

import torch
from torch import nn

from .. import prune
from ..formats import CSR, BlockedELL
from ..functional import linear

_FORMATS = {"csr": CSR, "bell": BlockedELL}


class SparseLinear(nn.Module):
    """A linear layer with a sparse weight (CSR or Blocked-ELL).

    The stored values are the Parameter ``values``; the format's index tensors (the
    pattern, and the transposed structure the backward uses) are buffers, so
    ``state_dict()`` round-trips and ``torch.save`` loads with weights_only. Loading a
    state_dict whose pattern has other sizes (another pruning of the same layer) resizes
    them.
    """

    def __init__(self, weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        fmt = next((name for name, cls in _FORMATS.items() if isinstance(weight, cls)), None)
        if fmt is None:
            raise TypeError(f"weight must be one of {[c.__name__ for c in _FORMATS.values()]}, "
                            f"got {type(weight).__name__}")
        self.format = fmt
        self.out_features, self.in_features = weight.shape
        for name, tensor in weight.index_tensors().items():
            self.register_buffer(name, tensor)
        self.values = nn.Parameter(weight.values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear_: nn.Linear, sparsity: float, *, format: str = "csr",
                    block_size: Optional[int] = None) -> "SparseLinear":
        """Magnitude-prune ``linear_``'s weight to ``sparsity`` (the fraction of weights
        zeroed for ``"csr"``, of b x b blocks for ``"bell"``, b = ``block_size``, default 32)
        and keep the survivors in ``format``."""
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear_).__name__}")
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
        w = linear_.weight.detach()
        if format == "csr":
            if block_size is not None:
                raise ValueError("block_size applies to format='bell' only")
            weight = CSR.from_dense(w, mask=prune.magnitude(w, sparsity))
        else:
            block_size = 32 if block_size is None else block_size
            mask = prune.magnitude(w, sparsity, block=block_size)
            weight = BlockedELL.from_dense(w, block_size, mask=mask)
        return cls(weight, linear_.bias)

    @property
    def weight(self):
        """The weight in its format, over this module's tensors (no copy)."""
        tensors = dict(self.named_buffers(recurse=False))
        return _FORMATS[self.format].from_index_tensors(
            (self.out_features, self.in_features), self.values, tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, tensor in [*self._buffers.items(), ("values", self.values)]:
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != tensor.shape:
                resized = tensor.new_empty(incoming.shape)
                if name == "values":
                    self.values = nn.Parameter(resized, requires_grad=tensor.requires_grad)
                else:
                    self._buffers[name] = resized
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}, density={self.weight.density:.4f}, "
                f"bias={self.bias is not None}")

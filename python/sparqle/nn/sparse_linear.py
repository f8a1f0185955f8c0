"""SparseLinear: y = x @ W^T + b with W [out, in] sparse, its pattern fixed and its
stored values trainable."""
import functools
from typing import Optional

import torch
from torch import nn

from .. import prune
from ..formats import CSR, BlockedELL, SemiStructured
from ..formats.nm import PATTERNS
from ..functional import linear

# Format name -> builder of the weight from (shape, values, index tensors).
_FORMATS = {"csr": CSR.from_index_tensors, "bell": BlockedELL.from_index_tensors,
            **{f"{n}:{m}": functools.partial(SemiStructured.from_index_tensors, n=n, m=m)
               for n, m in PATTERNS}}


def _format_name(weight) -> str:
    if isinstance(weight, SemiStructured):
        return f"{weight.n}:{weight.m}"
    if isinstance(weight, CSR):
        return "csr"
    if isinstance(weight, BlockedELL):
        return "bell"
    raise TypeError(f"weight must be a CSR, BlockedELL or SemiStructured, got {type(weight).__name__}")


class SparseLinear(nn.Module):
    """A linear layer with a sparse weight (CSR, Blocked-ELL or N:M).

    The stored values are the Parameter ``values``; the format's index tensors (the
    pattern, and the transposed structure the backward uses) are buffers, so
    ``state_dict()`` round-trips and ``torch.save`` loads with weights_only. Loading a
    state_dict whose pattern has other sizes (another pruning of the same layer) resizes
    them.
    """

    def __init__(self, weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.format = _format_name(weight)
        self.out_features, self.in_features = weight.shape
        for name, tensor in weight.index_tensors().items():
            self.register_buffer(name, tensor)
        self.values = nn.Parameter(weight.values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear_: nn.Linear, sparsity: Optional[float] = None, *,
                    format: str = "csr", block_size: Optional[int] = None) -> "SparseLinear":
        """Magnitude-prune ``linear_``'s weight to ``sparsity`` (the fraction of weights
        zeroed for ``"csr"``, of b x b blocks for ``"bell"``, b = ``block_size``, default 32)
        and keep the survivors in ``format``; an N:M format (``"2:4"``, ``"1:4"``, ...)
        keeps the n largest of every m and takes no sparsity."""
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear_).__name__}")
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
        w = linear_.weight.detach()
        if ":" in format:
            if sparsity is not None or block_size is not None:
                raise ValueError(f"format={format!r} sets the sparsity: pass neither sparsity "
                                 f"nor block_size")
            n, m = (int(v) for v in format.split(":"))
            return cls(SemiStructured.from_dense(w, n, m), linear_.bias)
        if sparsity is None:
            raise ValueError(f"sparsity is required for format={format!r}")
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
        return _FORMATS[self.format]((self.out_features, self.in_features), self.values, tensors)

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

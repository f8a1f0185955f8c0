"""SparseLinear: y = x @ W^T + b with W [out, in] sparse, its pattern fixed and its
nonzero values trainable."""
from typing import Optional

import torch
from torch import nn

from .. import prune
from ..formats import CSR
from ..functional import linear

_FORMATS = ("csr",)


class SparseLinear(nn.Module):
    """A linear layer with a CSR weight.

    The nonzero values are the Parameter ``values``; the pattern (``crow_indices``,
    ``col_indices``), its row swizzle and the transposed structure the backward uses are
    buffers, so ``state_dict()`` round-trips and ``torch.save`` loads with weights_only.
    """

    def __init__(self, weight: CSR, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(weight, CSR):
            raise TypeError(f"weight must be a sparqle.CSR, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("crow_indices", weight.crow_indices)
        self.register_buffer("col_indices", weight.col_indices)
        self.register_buffer("row_order", weight.row_order)
        t_crow, t_col, t_perm, t_row_order = weight.transposed_structure()
        self.register_buffer("t_crow_indices", t_crow)
        self.register_buffer("t_col_indices", t_col)
        self.register_buffer("t_perm", t_perm)
        self.register_buffer("t_row_order", t_row_order)
        self.values = nn.Parameter(weight.values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear_: nn.Linear, sparsity: float, *, format: str = "csr") -> "SparseLinear":
        """Magnitude-prune ``linear_``'s weight to ``sparsity`` (fraction zeroed) and keep
        the survivors in ``format`` (``"csr"``)."""
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear_).__name__}")
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
        w = linear_.weight.detach()
        return cls(CSR.from_dense(w, mask=prune.magnitude(w, sparsity)), linear_.bias)

    @property
    def weight(self) -> CSR:
        """The weight as a CSR over this module's tensors (no copy)."""
        transposed = (self.t_crow_indices, self.t_col_indices, self.t_perm, self.t_row_order)
        return CSR._trusted(self.crow_indices, self.col_indices, self.values,
                            (self.out_features, self.in_features), self.row_order, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        density = self.values.numel() / max(1, self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format=csr, density={density:.4f}, bias={self.bias is not None}")

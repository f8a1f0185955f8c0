"""SparseLinear: y = x @ W^T + b with W [out, in] sparse, its pattern fixed and its
stored values trainable."""
from typing import Optional

import torch
from torch import nn

from .. import prune
from ..calibrate import SPARSE_METHODS, InputStats, check_method
from ..formats import CSR, BlockedELL, SemiStructured
from ..formats.bell import check_block_size
from ..formats.nm import PATTERNS
from ..functional import linear
from ._load import ConvertedLinear, bias_parameter

# Format name -> (its class, the settings the name gives besides the shape).
_FORMATS = {"csr": (CSR, {}), "bell": (BlockedELL, {}),
            **{f"{n}:{m}": (SemiStructured, {"n": n, "m": m}) for n, m in PATTERNS}}


# Format -> the index tensors that hold the pattern; a SparseLinear's other buffers (CSR's
# row order) are derived from them.
_PATTERN = {"csr": ("crow_indices", "col_indices"), "bell": ("ell_cols",),
            **{f"{n}:{m}": ("meta",) for n, m in PATTERNS}}

# Format -> the buffers of A^T's structure that SparseLinear kept before the backward
# derived it: a state_dict saved then holds them; a load accepts and drops them.
_LEGACY = {"csr": ("t_crow_indices", "t_col_indices", "t_perm", "t_row_order"),
           "bell": ("t_ell_cols", "t_slots")}


def _checked_weight(format: str, shape, block_size: Optional[int], tensors):
    """The ``format`` weight of ``shape`` over ``tensors`` (values and the pattern), built by
    the format's checked constructor; Blocked-ELL's blocks must be ``block_size`` wide."""
    if format == "csr":
        return CSR(tensors["crow_indices"], tensors["col_indices"], tensors["values"], shape)
    if format == "bell":
        weight = BlockedELL(tensors["ell_cols"], tensors["values"], shape)
        if weight.block_size != block_size:
            raise ValueError(f"values holds {weight.block_size} x {weight.block_size} blocks; "
                             f"this layer's block size is {block_size}")
        return weight
    n, m = (int(v) for v in format.split(":"))
    return SemiStructured(tensors["values"], tensors["meta"], shape, n, m)


def _format_name(weight) -> str:
    if isinstance(weight, SemiStructured):
        return f"{weight.n}:{weight.m}"
    if isinstance(weight, CSR):
        return "csr"
    if isinstance(weight, BlockedELL):
        return "bell"
    raise TypeError(f"weight must be a CSR, BlockedELL or SemiStructured, got {type(weight).__name__}")


class SparseLinear(ConvertedLinear):
    """A linear layer with a sparse weight (CSR, Blocked-ELL or N:M).

    The stored values are the Parameter ``values``; the format's index tensors (the
    pattern, and CSR's row order) are buffers, so ``state_dict()`` round-trips and
    ``torch.save`` loads with weights_only; the format (and Blocked-ELL's block size)
    travel in it as extra state. A load is checked as the format's constructor checks its
    arguments, and the row order must be the one the pattern gives. A^T's structure, which
    the backward reads, is derived from the pattern there (and kept), not held: the keys
    earlier versions saved for it (``t_crow_indices, t_col_indices, t_perm, t_row_order``
    for CSR, ``t_ell_cols, t_slots`` for Blocked-ELL) are accepted by a load and dropped.
    Loading a state_dict whose pattern has other sizes (another
    pruning of the same layer) resizes them; ``values`` stays the same Parameter, so an
    optimizer built before the load trains it (reset a stateful optimizer's state for it:
    its moments have the old size).
    """

    def __init__(self, weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.format = _format_name(weight)
        self.out_features, self.in_features = weight.shape
        self.block_size = weight.block_size if isinstance(weight, BlockedELL) else None
        self._register_format_tensors(weight, parameter="values")
        self.bias = bias_parameter(bias, self.out_features)

    @classmethod
    def from_linear(cls, linear_: nn.Linear, sparsity: Optional[float] = None, *,
                    format: str = "csr", block_size: Optional[int] = None,
                    method: Optional[str] = None, stats: Optional[InputStats] = None) -> "SparseLinear":
        """Prune ``linear_``'s weight to ``sparsity`` (the fraction of weights zeroed for
        ``"csr"``, of b x b blocks for ``"bell"``, b = ``block_size``, default 32) and keep
        the survivors in ``format``; an N:M format (``"2:4"``, ``"1:4"``, ...) keeps n of
        every m and takes no sparsity.

        ``method`` is the criterion of sparqle.prune: ``"magnitude"`` (the default without
        ``stats``), ``"wanda"``, ``"sparsegpt"`` (the default with them) or ``"admm"``, the
        last three computed from ``stats``, the layer's calibration inputs
        (sparqle.calibrate; what ``convert(..., calibrate=run)`` passes); sparsegpt and
        admm also update the kept weights."""
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear_).__name__}")
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
        method = check_method(method, stats, SPARSE_METHODS, linear_)
        w = linear_.weight.detach()
        if ":" in format:
            if sparsity is not None or block_size is not None:
                raise ValueError(f"format={format!r} sets the sparsity: pass neither sparsity "
                                 f"nor block_size")
            n, m = (int(v) for v in format.split(":"))
            pattern = {"n": n, "m": m}
        elif sparsity is None:
            raise ValueError(f"sparsity is required for format={format!r}")
        elif format == "csr":
            if block_size is not None:
                raise ValueError("block_size applies to format='bell' only")
            pattern = {"sparsity": sparsity}
        else:
            block_size = 32 if block_size is None else block_size
            check_block_size(block_size)
            pattern = {"sparsity": sparsity, "block": block_size}
        if method == "magnitude":
            mask = prune.magnitude(w, **pattern)
        elif method == "wanda":
            mask = prune.wanda(w, stats.x_norm, **pattern)
        else:
            w, mask = getattr(prune, method)(w, stats.xtx, **pattern)
        if ":" in format:
            weight = SemiStructured.from_mask(w, mask, pattern["n"], pattern["m"])
        elif format == "csr":
            weight = CSR.from_dense(w, mask=mask)
        else:
            weight = BlockedELL.from_dense(w, block_size, mask=mask)
        return cls(weight, linear_.bias)._follow(linear_, "values")

    @property
    def weight(self):
        """The weight in its format, over this module's tensors (no copy)."""
        cls, settings = _FORMATS[self.format]
        return cls._trusted(**self._held(cls.tensor_names),
                            shape=(self.out_features, self.in_features), **settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def settings(self):
        return {"format": self.format, "block_size": self.block_size,
                "out_features": self.out_features, "in_features": self.in_features}

    def derived(self):
        return tuple(name for name in self._buffers if name not in _PATTERN[self.format])

    def legacy_keys(self):
        return _LEGACY.get(self.format, ())

    @classmethod
    def _from_state(cls, settings, tensors):
        if settings["format"] not in _FORMATS:
            raise ValueError(f"_extra_state: format must be one of {sorted(_FORMATS)}, got "
                             f"{settings['format']!r}")
        return cls(_checked_weight(settings["format"], (settings["out_features"], settings["in_features"]),
                                   settings["block_size"], tensors), tensors.get("bias"))

    def _check_state(self, tensors):
        weight = _checked_weight(self.format, (self.out_features, self.in_features), self.block_size, tensors)
        for name, derived in weight.tensors().items():
            if name != "values" and not torch.equal(tensors[name], derived):
                raise ValueError(f"{name} is not the one the pattern gives (it is derived from "
                                 f"the other index tensors): the state_dict is corrupt")

    def _sized_by_format(self, name: str) -> bool:
        return name != "bias"

    def _resize(self, tensors):
        for name, t in tensors.items():
            current = self.values if name == "values" else self._buffers.get(name)
            if current is not None and t.shape != current.shape:
                if name == "values":  # the same Parameter: optimizers keep it
                    self.values.data = current.new_empty(t.shape)
                else:
                    self._buffers[name] = current.new_empty(t.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}, density={self.weight.density:.4f}, "
                f"bias={self.bias is not None}")

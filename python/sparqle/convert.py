"""``convert``: swap a model's nn.Linear layers for sparse or quantized ones, in place."""
from typing import Callable, Optional

from torch import nn

from .formats.nm import PATTERNS
from .nn import FP8Linear, Int4Linear, Int8Linear, SparseLinear
from .nn._replace import replace_modules
from .nn.window_attention import convert_sparse_windows, convert_window_attention

_CONVERTERS = {
    "csr": lambda linear, **options: SparseLinear.from_linear(linear, format="csr", **options),
    "bell": lambda linear, **options: SparseLinear.from_linear(linear, format="bell", **options),
    "fp8": FP8Linear.from_linear,
    "int4": Int4Linear.from_linear,
    "int8": Int8Linear.from_linear,
    **{f"{n}:{m}": lambda linear, n=n, m=m, **options: SparseLinear.from_linear(
        linear, format=f"{n}:{m}", **options) for n, m in PATTERNS},
}
# Formats that swap whole modules rather than nn.Linear layers.
_MODULE_CONVERTERS = {
    "window_attention": convert_window_attention,
    "sparse_windows": convert_sparse_windows,
}


def convert(model: nn.Module, fmt: str, *,
            filter: Optional[Callable[[str, nn.Module], bool]] = None, **options) -> nn.Module:
    """Replace every module of type exactly ``nn.Linear`` in ``model`` (subclasses such as
    MultiheadAttention's out_proj read ``.weight`` directly and are left alone) for which
    ``filter(name, module)`` is true with its ``fmt`` version, built with ``options``:
    ``convert(model, "csr", sparsity=0.9)``, ``convert(model, "bell", block_size=32,
    sparsity=0.8)``, ``convert(model, "int4", group_size=128)``, ``convert(model, "int8")``,
    ``convert(model, "fp8", granularity="row")``, ``convert(model, "2:4")`` (or another N:M
    pattern). Returns ``model``.

    A module reached at several names is converted once and the converted module put at
    every name; a weight or bias tied to another module (an lm_head tied to the embedding)
    is copied into the converted module, and a warning says that the tie breaks.

    Swin models: ``convert(model, "window_attention")`` swaps every Swin WindowAttention for
    :class:`sparqle.nn.WindowAttention`; ``convert(model, "sparse_windows", keep_ratio=0.5)``
    wraps every Swin block in :class:`sparqle.nn.SparseWindowBlock` (a float, or a list of
    one ratio per stage)."""
    if fmt not in _CONVERTERS and fmt not in _MODULE_CONVERTERS:
        raise ValueError(f"fmt must be one of {sorted([*_CONVERTERS, *_MODULE_CONVERTERS])}, got {fmt!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if fmt in _MODULE_CONVERTERS:
        return _MODULE_CONVERTERS[fmt](model, filter=filter, **options)
    return replace_modules(model, lambda m: type(m) is nn.Linear, filter,
                           lambda name, linear: _CONVERTERS[fmt](linear, **options),
                           root_hint="an nn.Linear: convert its parent, or use "
                                     "sparqle.nn.SparseLinear.from_linear", copies_parameters=True)

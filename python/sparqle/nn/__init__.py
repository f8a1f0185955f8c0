"""Drop-in modules that replace nn.Linear with sparse or quantized weights."""
from .int4_linear import Int4Linear
from .int8_linear import Int8Linear
from .fp8_linear import FP8Linear
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear", "Int4Linear", "Int8Linear", "FP8Linear"]

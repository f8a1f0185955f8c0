"""Drop-in modules that replace nn.Linear with sparse or quantized weights."""
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear"]

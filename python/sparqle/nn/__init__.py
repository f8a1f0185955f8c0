"""Drop-in modules: nn.Linear with sparse or quantized weights, and Swin window attention."""
from .fp8_linear import FP8Linear
from .int4_linear import Int4Linear
from .int8_linear import Int8Linear
from .sparse_linear import SparseLinear
from .window_attention import SparseWindowBlock, WindowAttention

__all__ = ["SparseLinear", "Int4Linear", "Int8Linear", "FP8Linear", "WindowAttention", "SparseWindowBlock"]

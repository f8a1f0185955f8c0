"""sparqle: GPU kernels for sparse and low-bit linear algebra, as drop-in PyTorch ops.

    w = sparqle.CSR.from_dense(dense_weight)
    y = sparqle.linear(x, w, bias)                 # x @ w^T + bias
    sparqle.convert(model, "csr", sparsity=0.9)    # every nn.Linear, in place
    sparqle.convert(model, "2:4", calibrate=lambda m: m(batch), method="sparsegpt")
    sparqle.save(model, "model.safetensors")       # later: sparqle.load(float_model, path)
"""
import importlib.metadata

from . import allocation, calibrate, nn, permutation, prune, quantize, registry  # registry: registers torch.ops.sparqle.*
from .backends import use_backend
from .checkpoint import load, save
from .convert import ConvertedLayer, ConvertSummary, convert
from .formats import CSR, BlockedELL, FP8Weight, Int4Weight, Int8Weight, SemiStructured
from .functional import fp8_linear, fp8_quantize_rows, int8_linear, linear, quantize_rows, spmm
from .info import info
from .window import window_attention, window_merge, window_partition

try:
    __version__ = importlib.metadata.version("sparqle")
except importlib.metadata.PackageNotFoundError:
    __version__ = "0+unknown"

__all__ = ["CSR", "BlockedELL", "SemiStructured", "Int4Weight", "Int8Weight", "FP8Weight", "spmm", "linear", "int8_linear", "quantize_rows", "fp8_linear", "fp8_quantize_rows", "window_attention", "window_partition", "window_merge", "convert", "ConvertSummary", "ConvertedLayer", "save", "load", "use_backend", "info", "nn", "prune", "calibrate", "allocation", "permutation", "quantize"]

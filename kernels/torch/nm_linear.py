"""N:M semi-structured sparse linear in plain PyTorch (the layout of ``values`` and ``meta``,
and its codec: sparqle.formats.nm).

``nm_linear`` is the CPU path and the fallback; ``to_dense`` is the codec's expansion
(the torch launcher of sparqle::nm_to_dense); ``cusparselt_linear`` runs 2:4 on sparse
tensor cores through torch's cuSPARSELt ops (CUDA only), on a weight that
``cusparselt_compress`` prepared.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from sparqle.formats.nm import to_dense

from ._linear import linear_by_row_blocks

# cuSPARSELt takes a 16-bit 2:4 operand whose rows and columns are multiples of 16, and a
# dense operand whose rows and columns are multiples of 8.
_SPARSE_TILE, _DENSE_TILE = 16, 8


def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              bias: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T (+ bias [N]), computed in fp32 (fp64 for fp64). W is
    expanded a block of rows at a time and multiplied while the block is in cache: 6x
    faster than expanding it whole on a 2-core CPU (measured at 4096 x 4096, M = 1)."""
    k = x.shape[1]
    return linear_by_row_blocks(
        x, values.shape[0], lambda lo, hi: to_dense(values[lo:hi], meta[lo:hi], n, m, k), bias)


def _padded(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """2-D ``t`` padded with zeros to multiples of ``rows`` and ``cols`` (``t`` itself if it is)."""
    pad_rows, pad_cols = -t.shape[0] % rows, -t.shape[1] % cols
    return F.pad(t, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else t


def cusparselt_compress(dense: torch.Tensor) -> torch.Tensor:
    """A 2:4 W [N, K] (fp16 or bf16, CUDA) in cuSPARSELt's compressed form, its rows and
    columns padded with zeros to multiples of 16 (about 0.56x of the dense bytes)."""
    return torch._cslt_compress(_padded(dense, _SPARSE_TILE, _SPARSE_TILE))


def cusparselt_linear(x: torch.Tensor, compressed: torch.Tensor, bias: Optional[torch.Tensor],
                      out_features: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T (+ bias [N]) for the 2:4 W that ``compressed`` holds, on
    sparse tensor cores: cuSPARSELt computes W x^T and writes it transposed."""
    rows = x.shape[0]
    dense = _padded(x.contiguous(), _DENSE_TILE, _SPARSE_TILE)
    if bias is not None:  # read at unit stride, padded to the tile
        bias = F.pad(bias, (0, -out_features % _SPARSE_TILE)) if out_features % _SPARSE_TILE else bias.contiguous()
    y = torch._cslt_sparse_mm(compressed, dense.t(), bias=bias, transpose_result=True)
    return y[:rows, :out_features].contiguous()

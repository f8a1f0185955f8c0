"""N:M semi-structured sparse linear in plain PyTorch (the layout of ``values`` and ``meta``,
and its codec: sparqle.formats.nm).

``nm_linear`` is the CPU path and the fallback; ``to_dense`` is the codec's expansion
(the torch launcher of sparqle::nm_to_dense); ``cusparselt_linear`` runs 2:4 on sparse
tensor cores through torch's cuSPARSELt ops (CUDA only), on a weight that
``cusparselt_compress`` prepared, with the algorithm cuSPARSELt's own search found fastest
for the problem (searched once per problem, then kept).
"""
from typing import Dict, Hashable, Optional

import torch
import torch.nn.functional as F

from sparqle.formats.nm import to_dense

from .._capture import host_reads_allowed
from ._linear import linear_by_row_blocks

# cuSPARSELt takes a 16-bit 2:4 operand whose rows and columns are multiples of 16, and a
# dense operand whose rows and columns are multiples of 8.
_SPARSE_TILE, _DENSE_TILE = 16, 8
# cuSPARSELt's algorithm per problem (``_problem``) -> its id, from
# torch._cslt_sparse_mm_search, which runs and times each algorithm on the call's operands.
_ALGORITHMS: Dict[Hashable, int] = {}


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
    y = torch._cslt_sparse_mm(compressed, dense.t(), bias=bias, transpose_result=True,
                              alg_id=_algorithm(compressed, dense, bias, out_features))
    return y[:rows, :out_features].contiguous()


def _problem(dense: torch.Tensor, bias: Optional[torch.Tensor], out_features: int) -> Hashable:
    """The key of a cuSPARSELt problem: device, dtype, the padded x's shape (M to a
    multiple of 8: M = 1 to 8 is one problem), the padded N and whether a bias is fused.
    An algorithm id is kept for its exact problem only: cuSPARSELt numbers the algorithms
    of each problem's plan, and does not promise the same count for another M."""
    return (dense.device, dense.dtype, tuple(dense.shape), -(-out_features // _SPARSE_TILE) * _SPARSE_TILE,
            bias is not None)


def _algorithm(compressed: torch.Tensor, dense: torch.Tensor, bias: Optional[torch.Tensor],
               out_features: int) -> int:
    """cuSPARSELt's fastest algorithm for this problem: searched at its first call (the
    search runs the product with each algorithm and synchronises), then kept. While a CUDA
    graph is captured or a graph traced, where nothing may synchronise, a problem not yet
    searched takes cuSPARSELt's default, 0, and is searched at its next eager call."""
    key = _problem(dense, bias, out_features)
    found = _ALGORITHMS.get(key)
    if found is None:
        if not host_reads_allowed():
            return 0
        found = _ALGORITHMS[key] = int(torch._cslt_sparse_mm_search(compressed, dense.t(), bias=bias,
                                                                      transpose_result=True))
    return found

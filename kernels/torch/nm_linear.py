"""N:M semi-structured sparse linear in plain PyTorch, and the metadata codec.

A weight W [N, K] in N:M keeps, in each group of M consecutive input columns (K padded
with zeros to Kp, a multiple of M), N values: ``values`` [N_rows, Kc], Kc = Kp * N / M, the
kept values of group g at columns [g*N, (g+1)*N) in increasing position. The position of
kept value j inside its group (0..M-1) is stored in ``meta`` int32 [N_rows, ceil(Kc / P)],
BITS = 2 bits each for M <= 4 and 4 bits for M = 8, P = 32 / BITS to a word, LSB first:
position(j) = (meta[:, j // P] >> (BITS * (j % P))) & (2**BITS - 1).
For 2:4 each group of 4 gets a nibble (its first position in the low 2 bits), eight
groups (32 dense columns) a word: the per-row metadata encoding of sparse tensor cores.

``nm_linear`` is the CPU path and the fallback; ``cusparselt_linear`` runs 2:4 on sparse
tensor cores through torch's cuSPARSELt ops (CUDA only), on a weight that
``cusparselt_compress`` prepared.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._linear import linear_by_row_blocks

# cuSPARSELt takes a 16-bit 2:4 operand whose rows and columns are multiples of 16, and a
# dense operand whose rows and columns are multiples of 8.
_SPARSE_TILE, _DENSE_TILE = 16, 8


def index_bits(m: int) -> int:
    """Bits per stored position for groups of ``m``."""
    return 2 if m <= 4 else 4


def pack_positions(positions: torch.Tensor, m: int) -> torch.Tensor:
    """meta int32 [R, ceil(Kc / P)] from positions [R, Kc] (integers in [0, m))."""
    bits = index_bits(m)
    per_word = 32 // bits
    rows, kc = positions.shape
    words = -(-kc // per_word)
    padded = torch.nn.functional.pad(positions.to(torch.int64), (0, words * per_word - kc))
    shifts = bits * torch.arange(per_word, device=positions.device)
    packed = (padded.view(rows, words, per_word) << shifts).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_positions(meta: torch.Tensor, m: int, kc: int) -> torch.Tensor:
    """positions int32 [R, kc]: the inverse of pack_positions."""
    bits = index_bits(m)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=meta.device)
    fields = (meta[..., None] >> shifts) & (2**bits - 1)  # the mask drops the sign's copies
    return fields.reshape(meta.shape[0], meta.shape[1] * shifts.numel())[:, :kc]


def columns(meta: torch.Tensor, n: int, m: int, kc: int) -> torch.Tensor:
    """The dense column (in [0, Kp)) of every stored value, int64 [R, kc]."""
    group = torch.arange(kc, dtype=torch.int32, device=meta.device) // n
    return (group * m + unpack_positions(meta, m, kc)).long()


def to_dense(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    """W [R, k] (contiguous, values' dtype) from the compressed form."""
    rows, kc = values.shape
    dense = values.new_zeros(rows, kc // n * m)
    dense.scatter_(1, columns(meta, n, m, kc), values)
    return dense[:, :k].contiguous()


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

"""Blocked-ELL products in plain PyTorch (see kernels/triton/spmm_bell.py for the maths).

The products go through torch.sparse BSR matrices built from the used slots on each call
(MKL on the CPU); the block SDDMM gathers, per block-row, the [n, W, b] slices of x its
slots name, with n chunked so that no temporary exceeds a few million elements.
fp16 and bf16 compute in fp32; bell_linear adds the bias in that precision, before the one
rounding to x's dtype.
"""
from typing import Optional

import torch

from sparqle.formats._checks import cdiv, compute_dtype

from sparqle.formats._sparse import bsr_matrix

_CHUNK_ELEMENTS = 1 << 23


def _blocks(x: torch.Tensor, nblocks: int, b: int, dtype: torch.dtype) -> torch.Tensor:
    """x [n, c] as [n, nblocks, b], zero-padded on the right."""
    pad = nblocks * b - x.shape[1]
    return torch.nn.functional.pad(x.to(dtype), (0, pad)).view(x.shape[0], nblocks, b)


def _chunks(n: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _mm(cols, slots, values, x, bias, out_features, transposed):
    """y [n, out_features] = x @ M^T + bias, M the block matrix whose block-row r holds the
    blocks ``values[slots[r, s]]`` (transposed when ``transposed``) at block-columns
    ``cols[r, s]``: a torch.sparse BSR matrix over the used slots (MKL on the CPU,
    cuSPARSE/Triton on CUDA)."""
    n, b = x.shape[0], values.shape[-1]
    rows = cols.shape[0]
    cdt = compute_dtype(x.dtype)
    nblocks_in = cdiv(x.shape[1], b)
    if n == 0 or rows == 0 or nblocks_in == 0 or not bool((cols >= 0).any()):
        y = torch.zeros(n, out_features, dtype=cdt, device=x.device)
    else:
        # Used slots of each block-row, by block-column (BSR order); unused slots sort last.
        key = torch.where(cols >= 0, cols, nblocks_in).long()
        key, order = torch.sort(key, dim=1)
        used = key < nblocks_in
        crow = torch.zeros(rows + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(used.sum(1), 0, out=crow[1:])
        blocks = values.reshape(-1, b, b)[torch.gather(slots.long(), 1, order)[used]]
        if transposed:
            blocks = blocks.transpose(-1, -2)
        matrix = bsr_matrix(crow, key[used], blocks.to(cdt), (rows * b, nblocks_in * b))
        x_t = torch.nn.functional.pad(x.to(cdt), (0, nblocks_in * b - x.shape[1])).t()
        y = (matrix @ x_t).t()[:, :out_features]
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype).contiguous()


def bell_linear(x: torch.Tensor, ell_cols: torch.Tensor, values: torch.Tensor,
                bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """y [n, m] = x [n, k] @ A^T + bias for A [m, k] in Blocked-ELL (m = ``out_features``),
    bias [m] or None."""
    slots = torch.arange(ell_cols.numel(), device=ell_cols.device).view(ell_cols.shape)
    return _mm(ell_cols, slots, values, x, bias, out_features, transposed=False)


def bell_matmul(x: torch.Tensor, t_ell_cols: torch.Tensor, t_slots: torch.Tensor,
                values: torch.Tensor, k: int) -> torch.Tensor:
    """y [n, k] = x [n, m] @ A for A [m, k] in Blocked-ELL, through A^T's structure."""
    return _mm(t_ell_cols, t_slots, values, x, None, k, transposed=True)


def sddmm_bell(ell_cols: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
               b: int) -> torch.Tensor:
    """dvalues [R, W, b, b]: dy [n, m]^T @ x [n, k] at A's stored blocks, zero where unused."""
    rows, width = ell_cols.shape
    cdt = compute_dtype(dy.dtype)
    out = torch.zeros(rows, width, b, b, dtype=cdt, device=dy.device)
    nblocks_in = max(1, cdiv(x.shape[1], b))
    cols = ell_cols.clamp(min=0).long()
    for lo, hi in _chunks(dy.shape[0], rows * width * b):
        dyb = _blocks(dy[lo:hi], rows, b, cdt)                           # [n, R, b]
        xb = _blocks(x[lo:hi], nblocks_in, b, cdt)[:, cols]               # [n, R, W, b]
        out += torch.einsum("nrp,nrsq->rspq", dyb, xb)
    return out.masked_fill((ell_cols < 0)[..., None, None], 0).to(dy.dtype)

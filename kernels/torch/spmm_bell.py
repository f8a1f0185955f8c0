"""Blocked-ELL products in plain PyTorch (see kernels/triton/spmm_bell.py for the maths).

Each gathers, per block-row, the [n, W, b] slices of x its slots name and contracts them
with the blocks in one batched matmul over block-rows; n is chunked so that no gathered
temporary exceeds a few million elements. fp16 and bf16 compute in fp32.
"""
import torch

_CHUNK_ELEMENTS = 1 << 23


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _blocks(x: torch.Tensor, nblocks: int, b: int, dtype: torch.dtype) -> torch.Tensor:
    """x [n, c] as [n, nblocks, b], zero-padded on the right."""
    pad = nblocks * b - x.shape[1]
    return torch.nn.functional.pad(x.to(dtype), (0, pad)).view(x.shape[0], nblocks, b)


def _chunks(n: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _mm(cols, slots, values, x, out_features, transposed):
    n, b = x.shape[0], values.shape[-1]
    rows, width = cols.shape
    cdt = _compute_dtype(x.dtype)
    valid = cols >= 0
    blocks = values.reshape(-1, b, b)[slots.clamp(min=0).long()].to(cdt)  # [R, W, b, b]
    blocks = torch.where(valid[..., None, None], blocks, 0)  # unused slots may hold anything
    if not transposed:
        blocks = blocks.transpose(-1, -2)
    # out[:, r] = sum_s x[:, block cols[r, s]] @ blocks[r, s]: [R, n, W*b] @ [R, W*b, b]
    rhs = blocks.reshape(rows, width * b, b)
    nblocks_in = max(1, -(-x.shape[1] // b))
    out = torch.empty(n, rows * b, dtype=cdt, device=x.device)
    for lo, hi in _chunks(n, rows * width * b):
        xb = _blocks(x[lo:hi], nblocks_in, b, cdt)[:, cols.clamp(min=0).long()]  # [n, R, W, b]
        out[lo:hi] = torch.bmm(xb.permute(1, 0, 2, 3).reshape(rows, hi - lo, width * b),
                               rhs).permute(1, 0, 2).reshape(hi - lo, rows * b)
    return out[:, :out_features].to(x.dtype).contiguous()


def spmm_bell(ell_cols: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
              m: int) -> torch.Tensor:
    """out [n, m] = x [n, k] @ A^T for A [m, k] in Blocked-ELL."""
    slots = torch.arange(ell_cols.numel(), device=ell_cols.device).view(ell_cols.shape)
    return _mm(ell_cols, slots, values, x, m, transposed=False)


def spmm_bell_t(t_ell_cols: torch.Tensor, t_slots: torch.Tensor, values: torch.Tensor,
                x: torch.Tensor, k: int) -> torch.Tensor:
    """out [n, k] = x [n, m] @ A for A [m, k] in Blocked-ELL, through A^T's structure."""
    return _mm(t_ell_cols, t_slots, values, x, k, transposed=True)


def sddmm_bell(ell_cols: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
               b: int) -> torch.Tensor:
    """dvalues [R, W, b, b]: dy [n, m]^T @ x [n, k] at A's stored blocks, zero where unused."""
    rows, width = ell_cols.shape
    cdt = _compute_dtype(dy.dtype)
    out = torch.zeros(rows, width, b, b, dtype=cdt, device=dy.device)
    nblocks_in = max(1, -(-x.shape[1] // b))
    cols = ell_cols.clamp(min=0).long()
    for lo, hi in _chunks(dy.shape[0], rows * width * b):
        dyb = _blocks(dy[lo:hi], rows, b, cdt)                           # [n, R, b]
        xb = _blocks(x[lo:hi], nblocks_in, b, cdt)[:, cols]               # [n, R, W, b]
        out += torch.einsum("nrp,nrsq->rspq", dyb, xb)
    return out.masked_fill((ell_cols < 0)[..., None, None], 0).to(dy.dtype)

"""CSR sparse x dense (SpMM) and dense x dense sampled at a CSR pattern (SDDMM).

SpMM: C[m, n] = A[m, k] @ B[k, n], A in CSR (crow [m+1], col [nnz], values [nnz]).
Sputnik-style 1-D tiling: one program owns one sparse row and a tile of BLOCK_N dense
columns, streams the row's nonzeros in chunks of BLOCK_NNZ, gathers the matching rows
of B and accumulates in fp32 (fp64 for fp64 inputs) on the CUDA cores. Programs take
rows in ``row_order`` (longest first), so long rows start early and short rows fill
the tail: the row swizzle that balances load.

SDDMM: out[i] = sum_n X[row_i, n] * Y[col_i, n] for every stored entry i of a CSR
pattern, X [m, n], Y [k, n]: the values of (X @ Y^T) at the pattern. One program owns
BLOCK_NNZ consecutive entries (in any rows), so every program does the same work.
"""
import torch
import triton
import triton.language as tl

from .. import _alloc
from ._autotune import Configs, autotune
from ._config import on_device_of

_SPMM_CONFIGS = Configs(
    [
        triton.Config({"BLOCK_N": bn, "BLOCK_NNZ": bk}, num_warps=w)
        # Narrow column tiles with long nonzero chunks for decode (n <= 16), wide ones for n in the hundreds.
        for bn, bk, w in [(16, 64, 2), (16, 128, 4), (32, 16, 1), (64, 16, 2), (64, 32, 2),
                          (128, 16, 4), (128, 32, 4), (256, 16, 4), (256, 32, 8)]
    ],
    triton.Config({"BLOCK_N": 16, "BLOCK_NNZ": 8}),
)

_SDDMM_CONFIGS = Configs(
    [
        triton.Config({"BLOCK_NNZ": bk, "BLOCK_N": bn}, num_warps=w)
        for bk, bn, w in [(16, 64, 2), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8)]
    ],
    triton.Config({"BLOCK_NNZ": 8, "BLOCK_N": 16}),
)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@autotune(_SPMM_CONFIGS, key=["N", "AVG_ROW_NNZ"], bucket=["N"])
@triton.jit
def _spmm_csr_kernel(
    crow_ptr, col_ptr, values_ptr, row_order_ptr, b_ptr, c_ptr,
    N,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    AVG_ROW_NNZ,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    row = tl.load(row_order_ptr + tl.program_id(0)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    # int64 bounds, counter and lanes: the last chunk's lanes pass 2^31 - 1 when nnz nears it
    # (the interpreter's counter is a Python int, hence the lanes' own cast).
    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for chunk in range(start, end, BLOCK_NNZ):
        offs_nz = chunk + tl.arange(0, BLOCK_NNZ).to(tl.int64)
        mask_nz = offs_nz < end
        cols = tl.load(col_ptr + offs_nz, mask=mask_nz, other=0).to(tl.int64)
        vals = tl.load(values_ptr + offs_nz, mask=mask_nz, other=0).to(ACC_DTYPE)
        b = tl.load(
            b_ptr + cols[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask_nz[:, None] & mask_n[None, :], other=0,
        ).to(ACC_DTYPE)
        acc += tl.sum(vals[:, None] * b, axis=0)
    tl.store(c_ptr + row * stride_cm + offs_n * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_n)


@autotune(_SDDMM_CONFIGS, key=["N"], bucket=["N"])
@triton.jit
def _sddmm_csr_kernel(
    row_ptr, col_ptr, x_ptr, y_ptr, out_ptr,
    NNZ, N,
    stride_xm, stride_xn,
    stride_ym, stride_yn,
    ACC_DTYPE: tl.constexpr,
    BLOCK_NNZ: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_nz = tl.program_id(0).to(tl.int64) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    mask_nz = offs_nz < NNZ
    rows = tl.load(row_ptr + offs_nz, mask=mask_nz, other=0).to(tl.int64)
    cols = tl.load(col_ptr + offs_nz, mask=mask_nz, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_NNZ], dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = mask_nz[:, None] & (offs_n < N)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                    mask=mask, other=0).to(ACC_DTYPE)
        y = tl.load(y_ptr + cols[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                    mask=mask, other=0).to(ACC_DTYPE)
        acc += tl.sum(x * y, axis=1)
    tl.store(out_ptr + offs_nz, acc.to(out_ptr.dtype.element_ty), mask=mask_nz)


def spmm_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
             row_order: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C [m, n] = A @ b for A in CSR (m = crow.numel() - 1) and dense b [k, n]."""
    m, n = crow.numel() - 1, b.shape[1]
    c = _alloc.empty((m, n), b.dtype, b.device)
    if m == 0 or n == 0:
        return c
    grid = lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    with on_device_of(b):
        _spmm_csr_kernel[grid](
            crow, col, values, row_order, b, c,
            n,
            b.stride(0), b.stride(1),
            c.stride(0), c.stride(1),
            triton.next_power_of_2(max(1, col.numel() // m)),
            ACC_DTYPE=_acc_dtype(b.dtype),
        )
    return c


def sddmm_csr(crow: torch.Tensor, col: torch.Tensor,
              x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out [nnz]: out[i] = x[row_i] . y[col_i] for x [m, n], y [k, n] and a CSR pattern."""
    nnz, n = col.numel(), x.shape[1]
    out = _alloc.empty((nnz,), x.dtype, x.device)
    if nnz == 0:
        return out
    counts = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(
        torch.arange(crow.numel() - 1, device=crow.device, dtype=crow.dtype),
        counts, output_size=nnz)
    grid = lambda meta: (triton.cdiv(nnz, meta["BLOCK_NNZ"]),)  # noqa: E731
    with on_device_of(x):
        _sddmm_csr_kernel[grid](
            rows, col, x, y, out,
            nnz, n,
            x.stride(0), x.stride(1),
            y.stride(0), y.stride(1),
            ACC_DTYPE=_acc_dtype(x.dtype),
        )
    return out

"""CSR linear (x @ A^T + bias) and dense x dense sampled at a CSR pattern (SDDMM).

csr_linear: y [M, m] = x [M, k] @ A^T + bias, A [m, k] in CSR (crow [m+1], col [nnz],
values [nnz]), bias [m] or none. The kernel computes y^T = A @ x^T + bias[:, None], reading
x^T and writing y^T through strides (no copy of either). Sputnik's 1-D tiling: one program
owns one sparse row of A (one output feature) and a tile of BLOCK_X_ROWS rows of x, streams
the row's nonzeros in chunks of BLOCK_NNZ, gathers the matching columns of x and accumulates
in fp32 (fp64 for fp64 inputs) on the CUDA cores; the bias is added in that precision
before the one rounding to y's dtype. Two ways to spread a chunk over the threads, a
config's choice (``NNZ_ACROSS_THREADS``), so the tuner picks per shape:

- across (decode, few rows of x): the chunk's nonzeros lie across the threads as a
  [BLOCK_NNZ, BLOCK_X_ROWS] tile, and each thread adds its products into its own partial
  sums (a [BLOCK_NNZ, BLOCK_X_ROWS] accumulator, BLOCK_NNZ * BLOCK_X_ROWS / threads
  registers each), summed over the nonzeros once, after the row's last chunk: the
  reduction across threads (shuffles and, past one warp, a barrier) is paid once per row,
  not once per chunk, and the main loop has no barrier;
- Sputnik's (many rows of x): each thread owns its rows of x (output columns) and walks the
  chunk's nonzeros one by one, unrolled BLOCK_NNZ times (the column and value of each a
  broadcast load, the BLOCK_NNZ gathers of x independent, in flight together); nothing is
  reduced across threads, so the main loop has no barrier.

Programs take rows in ``row_order`` (longest first), so long rows start early and short rows
fill the tail: the row swizzle that balances load. For fp16 and bf16 x with k <= 65536 the
column indices are read as 16-bit values (Sputnik's), half the bytes of the int32 stream:
a narrowed copy of ``col`` kept per index tensor (sparqle.kernels._derived.csr_col_indices,
the same copy the CuPy kernel reads).

SDDMM: out[i] = sum_n X[row_i, n] * Y[col_i, n] for every stored entry i of a CSR
pattern, X [m, n], Y [k, n] (any strides): the values of (X @ Y^T) at the pattern. One
program owns BLOCK_NNZ consecutive entries (in any rows), so every program does the same
work.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from sparqle.formats.csr import entry_rows

from .. import _alloc
from .._derived import csr_col_indices
from ._autotune import Configs, autotune
from ._config import dot_meta, on_device_of
from ._linear import dot_tile, store_tile, tile_of_y

_LINEAR_CONFIGS = Configs(
    [
        triton.Config({"BLOCK_X_ROWS": bx, "BLOCK_NNZ": bk, "NNZ_ACROSS_THREADS": across}, num_warps=w)
        # Narrow x tiles with long nonzero chunks across the threads for decode (M <= 16); wide
        # ones, each thread owning rows of x (Sputnik's), for M in the hundreds.
        for bx, bk, across, w in [(16, 64, True, 2), (16, 128, True, 4), (32, 16, True, 1),
                                  (64, 16, True, 2), (64, 32, True, 2), (128, 16, True, 4),
                                  # 8 rows of x per thread: 16-byte loads of x^T in half types
                                  (64, 8, False, 1), (128, 8, False, 1), (256, 8, False, 1),
                                  (256, 4, False, 1), (512, 8, False, 2), (512, 4, False, 2)]
    ],
    triton.Config({"BLOCK_X_ROWS": 16, "BLOCK_NNZ": 8, "NNZ_ACROSS_THREADS": True}),
)

# The tensor-core path rebuilds [BLOCK_N, BLOCK_K] tiles of A (BLOCK_K a multiple of the
# bitmap's 32 columns) and multiplies them by x's tiles: decode-sized and tiled token blocks.
_BITMAP_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
     for bm, bn, bk, w, st in [(16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 128, 4, 3),
                               (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}),
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


@triton.jit
def _columns(col):
    """Column indices as int64: int32 ones as they are, int16 ones as the unsigned 16-bit
    values they hold (columns < 65536)."""
    if col.dtype == tl.int16:
        col = col.to(tl.uint16, bitcast=True)
    return col.to(tl.int64)


@autotune(_LINEAR_CONFIGS, key=["X_ROWS", "AVG_ROW_NNZ"], bucket=["X_ROWS"])
@triton.jit
def _csr_linear_kernel(
    # pointers
    crow_ptr, col_ptr, values_ptr, row_order_ptr, x_ptr, bias_ptr, y_ptr,
    # sizes: the rows of x, the mean nonzeros per row of A (a power of two: a tuning key)
    X_ROWS, AVG_ROW_NNZ,
    # strides
    stride_xm, stride_xk,
    stride_ym, stride_yn,
    stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_X_ROWS: tl.constexpr, BLOCK_NNZ: tl.constexpr, NNZ_ACROSS_THREADS: tl.constexpr,
):
    row = tl.load(row_order_ptr + tl.program_id(0)).to(tl.int64)
    offs_x = (tl.program_id(1) * BLOCK_X_ROWS + tl.arange(0, BLOCK_X_ROWS)).to(tl.int64)
    mask_x = offs_x < X_ROWS
    # int64 bounds, counter and lanes: the last chunk's lanes pass 2^31 - 1 when nnz nears it
    # (the interpreter's counter is a Python int, hence the lanes' own cast).
    start = tl.load(crow_ptr + row).to(tl.int64)
    end = tl.load(crow_ptr + row + 1).to(tl.int64)
    if NNZ_ACROSS_THREADS:  # each lane's partial sums, summed over the nonzeros after the loop
        partial = tl.zeros([BLOCK_NNZ, BLOCK_X_ROWS], dtype=ACC_DTYPE)
    else:
        acc = tl.zeros([BLOCK_X_ROWS], dtype=ACC_DTYPE)
    for chunk in range(start, end, BLOCK_NNZ):
        if NNZ_ACROSS_THREADS:
            offs_nz = chunk + tl.arange(0, BLOCK_NNZ).to(tl.int64)
            mask_nz = offs_nz < end
            cols = _columns(tl.load(col_ptr + offs_nz, mask=mask_nz, other=0))
            vals = tl.load(values_ptr + offs_nz, mask=mask_nz, other=0).to(ACC_DTYPE)
            x = tl.load(  # x^T [cols, offs_x]
                x_ptr + cols[:, None] * stride_xk + offs_x[None, :] * stride_xm,
                mask=mask_nz[:, None] & mask_x[None, :], other=0,
            ).to(ACC_DTYPE)
            partial += vals[:, None] * x
        else:
            for j in tl.static_range(BLOCK_NNZ):
                nz = chunk + j
                in_row = nz < end
                col = _columns(tl.load(col_ptr + nz, mask=in_row, other=0))
                val = tl.load(values_ptr + nz, mask=in_row, other=0).to(ACC_DTYPE)
                x = tl.load(x_ptr + col * stride_xk + offs_x * stride_xm, mask=mask_x & in_row, other=0)
                acc += val * x.to(ACC_DTYPE)
    if NNZ_ACROSS_THREADS:
        acc = tl.sum(partial, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row * stride_bias).to(ACC_DTYPE)
    tl.store(y_ptr + offs_x * stride_ym + row * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_x)


@autotune(_BITMAP_CONFIGS, key=["M", "N", "K", "NNZ_PER_ROW"], bucket=["M"])
@triton.jit
def _csr_bitmap_linear_kernel(
    # pointers: A's bitmap words and row starts (sparqle.formats.csr.bitmap_structure), its
    # CSR values, x, bias, y
    words_ptr, starts_ptr, values_ptr, x_ptr, bias_ptr, y_ptr,
    # sizes: x's rows M, A [N, K], CHUNKS = ceil(K / 32) words a row, the mean stored
    # entries per row (a power of two: a tuning key)
    M, N, K, CHUNKS, NNZ_PER_ROW,
    # strides
    stride_xm, stride_xk,
    stride_ym, stride_yn,
    stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, _ = tile_of_y(M, N, BLOCK_M, BLOCK_N)
    WORDS: tl.constexpr = BLOCK_K // 32
    bit = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        chunk = k0 // 32 + tl.arange(0, WORDS)
        at = offs_n[:, None] * CHUNKS + chunk[None, :]
        in_a = mask_n[:, None] & (chunk < CHUNKS)[None, :]
        word = tl.load(words_ptr + at, mask=in_a, other=0)
        start = tl.load(starts_ptr + at, mask=in_a, other=0)
        stored = (word[:, :, None] >> bit[None, None, :]) & 1           # [BLOCK_N, WORDS, 32]
        rank = tl.cumsum(stored, axis=2) - stored                        # set bits below each
        w = tl.load(values_ptr + (start[:, :, None] + rank), mask=stored != 0, other=0)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0)
        acc = dot_tile(w.to(x.dtype), x, acc, ACC_DTYPE, PRECISION, UPCAST)
    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, 0, stride_ym, stride_yn,
               stride_bias, HAS_BIAS, ACC_DTYPE, 1)


@autotune(_SDDMM_CONFIGS, key=["N"], bucket=["N"])
@triton.jit
def _sddmm_csr_kernel(
    # pointers
    row_ptr, col_ptr, x_ptr, y_ptr, out_ptr,
    # sizes
    NNZ, N,
    # strides
    stride_xm, stride_xn,
    stride_ym, stride_yn,
    # meta-parameters
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


def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               row_order: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [M, m] = x [M, k] @ A^T + bias for A [m, k] in CSR (m = crow.numel() - 1), bias [m]
    or None; x and bias are read through their strides (an expanded bias has stride 0).
    ``col`` is int32; the kernel reads its 16-bit copy where csr_col_indices gives one."""
    (rows, k), m = x.shape, crow.numel() - 1
    y = _alloc.empty((rows, m), x.dtype, x.device)
    if m == 0 or rows == 0:
        return y
    col = csr_col_indices(col, k, x.dtype)
    grid = lambda meta: (m, triton.cdiv(rows, meta["BLOCK_X_ROWS"]))  # noqa: E731
    with on_device_of(x):
        _csr_linear_kernel[grid](
            crow, col, values, row_order, x, y if bias is None else bias, y,
            rows, triton.next_power_of_2(max(1, col.numel() // m)),
            x.stride(0), x.stride(1),
            y.stride(0), y.stride(1),
            0 if bias is None else bias.stride(0),
            HAS_BIAS=bias is not None, ACC_DTYPE=_acc_dtype(x.dtype),
        )
    return y


def csr_bitmap_linear(x: torch.Tensor, words: torch.Tensor, starts: torch.Tensor, values: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [M, m] = x [M, k] @ A^T + bias on tensor cores, for A [m, k] given by its bitmap
    structure (words, starts: int32 [m, ceil(k / 32)], sparqle.formats.csr.bitmap_structure)
    and its CSR ``values``: each program rebuilds dense [BLOCK_N, BLOCK_K] tiles of A in
    registers (the entry at a set bit is values[start + the set bits below it]; zero
    elsewhere, no load) and multiplies them with ``tl.dot``, fp32 accumulation, the bias in
    the epilogue. It reads A's values once per token block plus a quarter byte per dense
    entry of bitmap and starts, and does A's dense arithmetic: Flash-LLM's "load as sparse,
    compute as dense", for the moderate sparsity and few tokens where the CUDA-core kernel
    wastes the tensor cores. fp16, bf16, fp32 (TF32 when allowed)."""
    rows, k = x.shape
    m = words.shape[0]
    y = _alloc.empty((rows, m), x.dtype, x.device)
    if rows == 0 or m == 0:
        return y
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(m, meta["BLOCK_N"]), 1)  # noqa: E731
    with on_device_of(x):
        _csr_bitmap_linear_kernel[grid](
            words, starts, values, x, y if bias is None else bias, y,
            rows, m, k, words.shape[1], triton.next_power_of_2(max(1, values.numel() // m)),
            x.stride(0), x.stride(1),
            y.stride(0), y.stride(1),
            0 if bias is None else bias.stride(0),
            HAS_BIAS=bias is not None, **dot_meta(x.dtype),
        )
    return y


def sddmm_csr(crow: torch.Tensor, col: torch.Tensor,
              x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out [nnz]: out[i] = x[row_i] . y[col_i] for x [m, n], y [k, n] and a CSR pattern."""
    nnz, n = col.numel(), x.shape[1]
    out = _alloc.empty((nnz,), x.dtype, x.device)
    if nnz == 0:
        return out
    rows = entry_rows(crow, nnz, crow.dtype)
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

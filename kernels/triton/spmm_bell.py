"""Blocked-ELL sparse matrix products on tensor cores.

A [m, k] is stored as block-rows of b x b blocks: block-row r keeps W slots, slot s
holding the block at block-column ``ell_cols[r, s]`` (-1: unused) with entries
``values[r, s]`` [b, b], row-major. m and k need not be multiples of b (blocks are padded
with zeros; padded rows and columns are never read from x or written to out).

bell_linear:  y [n, m] = x [n, k] @ A^T + bias      (sparqle.linear's y = x W^T + b)
bell_matmul:  y [n, k] = x [n, m] @ A               (its input gradient, dy @ W), over
              A^T's block structure: block-row c of A^T lists the block-rows
              ``t_ell_cols[c, s]`` of A whose stored slot ``t_slots[c, s]`` (a flat index
              into values) sits in block-column c (formats/bell.py builds it).
sddmm_bell:   dvalues [R, W, b, b], dvalues[r, s] = dy[:, block r]^T @ x[:, block ell_cols[r, s]]
              (zero for unused slots): the gradient of the stored blocks.

A tile of y is [BLOCK_X_ROWS, b] (BLOCK_X_ROWS rows of x, one block-row of the sparse
operand): for each slot of its block-row it loads a [BLOCK_X_ROWS, b] tile of x and the
b x b block and feeds ``tl.dot`` (fp32 accumulation; fp32 inputs use TF32 only when
torch.get_float32_matmul_precision() allows it). The grid is persistent and takes the tiles
in width order: the block-rows in ``order`` (sparqle.formats.bell.row_schedule: the most
slots first), all x tiles of one block-row before the next. Each program takes its next
tile from a counter (an atomic add, issued as the current tile starts), so the longest
block-rows start first, the short ones fill the tail, and a program that finds none left
ends: the grid may exceed the programs an SM keeps resident. The counter is zero on entry
and the kernel leaves it zero: the P programs draw T + P tickets in all (T tiles, and one
past the end each), and the program that draws the last one, T + P - 1, after which no one
reads the counter, resets it. So one counter per stream is kept zeroed across calls and a
call is one launch, with no memset before it (``_tile_counter``). A block-row's loop visits only
its ``row_slots`` slots (up to its last used one), a trip count read at run time, so the
padding slots of the block-rows narrower than the widest cost nothing. The loop has no
branch, so its loads go through the software pipeline (cp.async, with wgmma kept in flight
on sm_90): an unused slot before the last used one (a hole) has its loads masked off
(nothing is read) and adds a zero product. The bias is added to the fp32 accumulator before
the one rounding to y's dtype. x, y and the bias are addressed through strides, so
transposed views cost no copy.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from sparqle.formats.bell import row_schedule

from .. import _alloc
from .._capture import capturing
from .._derived import derived
from ._autotune import Configs, autotune
from ._config import dot_meta, on_device_of
from ._rows import persistent_programs

# Three stages: with the loop's run-time trip count, sm_90's pipeliner gives four stages
# the same kernel as three (the kernel report: same shared memory, same cp.async count).
_MM_CONFIGS = Configs(
    [triton.Config({"BLOCK_X_ROWS": bx}, num_warps=w, num_stages=s)
     for bx, w, s in [(16, 4, 3), (32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 4, 3),
                      (128, 8, 3), (256, 8, 3), (256, 16, 3)]],
    triton.Config({"BLOCK_X_ROWS": 16}),
)
# Programs of the persistent grid per SM: at least the blocks of any config an SM keeps
# resident (1 to 12 on sm_90 for b = 16 to 128); those past the resident ones start once
# the tiles are taken, and end at once.
_PROGRAMS_PER_SM = 16
_SDDMM_CONFIGS = Configs(
    [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bk, w, s in [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3)]],
    triton.Config({"BLOCK_K": 16}),
)


@autotune(_MM_CONFIGS, key=["N", "WIDTH", "B"], bucket=["N"])
@triton.jit
def _bell_mm_kernel(
    # pointers
    cols_ptr, slots_ptr, values_ptr, order_ptr, row_slots_ptr, next_tile_ptr, x_ptr, bias_ptr, y_ptr,
    # sizes: N rows of x, K_X its columns, M_OUT y's columns, ROWS block-rows of WIDTH slots
    N, K_X, M_OUT, ROWS, WIDTH,
    # strides
    stride_xn, stride_xk,
    stride_yn, stride_ym,
    stride_bias,
    # meta-parameters
    B: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_X_ROWS: tl.constexpr,
):
    x_tiles = tl.cdiv(N, BLOCK_X_ROWS)
    offs_b = tl.arange(0, B)
    tiles = ROWS * x_tiles
    tile = tl.atomic_add(next_tile_ptr, 1, sem="relaxed")
    while tile < tiles:
        following = tl.atomic_add(next_tile_ptr, 1, sem="relaxed")  # taken now, its latency hidden by this tile
        block_row = tl.load(order_ptr + tile // x_tiles)
        offs_n = ((tile % x_tiles) * BLOCK_X_ROWS + tl.arange(0, BLOCK_X_ROWS)).to(tl.int64)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_X_ROWS, B], dtype=ACC_DTYPE)
        for s in range(tl.load(row_slots_ptr + block_row)):
            # Branchless, so that the loads can go through the software pipeline: an unused
            # slot (col = -1) loads nothing (masked to zeros) and adds a zero product.
            col = tl.load(cols_ptr + block_row * WIDTH + s)
            used = col >= 0
            if TRANSPOSED:
                slot = tl.load(slots_ptr + block_row * WIDTH + s, mask=used, other=0).to(tl.int64)
            else:
                slot = (block_row * WIDTH + s).to(tl.int64)
            offs_k = tl.maximum(col, 0).to(tl.int64) * B + offs_b
            x = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                        mask=(mask_n[:, None] & (offs_k < K_X)[None, :]) & used, other=0)
            w = tl.load(values_ptr + slot * B * B + offs_b[:, None] * B + offs_b[None, :], mask=used, other=0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if TRANSPOSED:
                acc = tl.dot(x, w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        offs_m = block_row.to(tl.int64) * B + offs_b
        mask_m = offs_m < M_OUT
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_m * stride_bias, mask=mask_m, other=0).to(ACC_DTYPE)[None, :]
        tl.store(y_ptr + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])
        tile = following
    # The last ticket drawn: every program has drawn its one past the end, so no one reads
    # the counter again in this launch, and the next launch finds it zero.
    if tile == tiles + tl.num_programs(0) - 1:
        tl.atomic_xchg(next_tile_ptr, 0, sem="relaxed")


@autotune(_SDDMM_CONFIGS, key=["N", "B"], bucket=["N"])
@triton.jit
def _sddmm_bell_kernel(
    # pointers
    cols_ptr, dy_ptr, x_ptr, out_ptr,
    # sizes
    N, M, K, WIDTH,
    # strides
    stride_dyn, stride_dym,
    stride_xn, stride_xk,
    # meta-parameters
    B: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    slot = tl.program_id(0)
    block_row = slot // WIDTH
    col = tl.load(cols_ptr + slot)
    offs_b = tl.arange(0, B)
    offs_m = block_row.to(tl.int64) * B + offs_b
    offs_k = col.to(tl.int64) * B + offs_b
    acc = tl.zeros([B, B], dtype=ACC_DTYPE)
    if col >= 0:
        for n0 in range(0, N, BLOCK_K):
            offs_n = (n0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_n = offs_n < N
            dy = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                         mask=mask_n[:, None] & (offs_m < M)[None, :], other=0)
            x = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                        mask=mask_n[:, None] & (offs_k < K)[None, :], other=0)
            if UPCAST:
                dy = dy.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    tl.store(out_ptr + slot.to(tl.int64) * B * B + offs_b[:, None] * B + offs_b[None, :],
             acc.to(out_ptr.dtype.element_ty))


# The persistent kernel's tile counter per (device, stream): zero between launches (the
# kernel resets it), so a launch needs no memset. Launches on one stream run one after
# another; each stream has its own counter, so kernels on two streams never share one.
_TILE_COUNTERS = {}


def _tile_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 [1] counter for ``_bell_mm_kernel`` on ``device``'s current stream,
    made once per stream and reused. While a CUDA graph is captured a counter not yet made
    is made for this call only (its zeroing is captured with the kernel): one made during
    capture lives in the graph's memory pool and cannot be kept for later calls."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    counter = _TILE_COUNTERS.get((device, stream))
    if counter is None:
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        if not capturing():
            _TILE_COUNTERS[(device, stream)] = counter
    return counter


def _launch_mm(cols, slots, values, x, bias, out_features, transposed):
    n, b = x.shape[0], values.shape[-1]
    rows, width = cols.shape
    y = _alloc.empty((n, out_features), x.dtype, x.device)
    if n == 0 or out_features == 0:
        return y
    order, row_slots = derived("bell_row_schedule", lambda: row_schedule(cols), cols)
    next_tile = _tile_counter(x.device)
    programs = persistent_programs(x.device, _PROGRAMS_PER_SM)
    grid = lambda meta: (min(rows * triton.cdiv(n, meta["BLOCK_X_ROWS"]), programs),)  # noqa: E731
    with on_device_of(x):
        _bell_mm_kernel[grid](
            cols.contiguous(), slots.contiguous(), values.contiguous(), order, row_slots, next_tile, x,
            y if bias is None else bias, y,
            n, x.shape[1], out_features, rows, width,
            x.stride(0), x.stride(1),
            y.stride(0), y.stride(1),
            0 if bias is None else bias.stride(0),
            B=b, TRANSPOSED=transposed, HAS_BIAS=bias is not None, **dot_meta(x.dtype),
        )
    return y


def bell_linear(x: torch.Tensor, ell_cols: torch.Tensor, values: torch.Tensor,
                bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """y [n, m] = x [n, k] @ A^T + bias for A [m, k] in Blocked-ELL (m = ``out_features``),
    bias [m] or None."""
    return _launch_mm(ell_cols, ell_cols, values, x, bias, out_features, transposed=False)


def bell_matmul(x: torch.Tensor, t_ell_cols: torch.Tensor, t_slots: torch.Tensor,
                values: torch.Tensor, k: int) -> torch.Tensor:
    """y [n, k] = x [n, m] @ A for A [m, k] in Blocked-ELL, through A^T's structure."""
    return _launch_mm(t_ell_cols, t_slots, values, x, None, k, transposed=True)


def sddmm_bell(ell_cols: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
               b: int) -> torch.Tensor:
    """dvalues [R, W, b, b]: dy [n, m]^T @ x [n, k] at A's stored blocks, zero where unused."""
    rows, width = ell_cols.shape
    out = _alloc.empty((rows, width, b, b), dy.dtype, dy.device)
    if out.numel() == 0:
        return out
    with on_device_of(dy):
        _sddmm_bell_kernel[(rows * width,)](
            ell_cols.contiguous(), dy, x, out,
            dy.shape[0], dy.shape[1], x.shape[1], width,
            dy.stride(0), dy.stride(1),
            x.stride(0), x.stride(1),
            B=b, **dot_meta(dy.dtype),
        )
    return out

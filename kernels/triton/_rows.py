"""Pieces shared by the per-row quantizers (int8, FP8) and their W8A8 GEMMs: the quantizers'
kernel and autotune configs, the loads of a row and its max |x|, the fp32 magic number of
round-half-to-even, the GEMMs' grouped tile order, persistent grid and choice of TMA loads,
and the recomputation of the rows a quantized x cannot carry.

TMA (``tma_loads``): on sm_90 and later the GEMMs load their operand tiles through tensor
descriptors made in the kernel (``tl.make_tensor_descriptor``): the tensor memory
accelerator copies each tile global -> shared, zero-filling past the edges, with no address
arithmetic or masks in the threads. A descriptor needs a 16-byte-aligned address, unit
stride along K and a row stride of a multiple of 16 bytes; an operand that breaks one of
these (a column slice, a transpose, K not a multiple of 16 / element size) makes the GEMM
load through pointers, chosen once per call. Descriptors made in the kernel live in a
global scratch buffer per program, which Triton asks ``triton.set_allocator``'s allocator
for at launch.

One read of a row: a quantizer loads the row's first block x[row, :BLOCK_K] once and keeps it
in registers for both the max and the quantization, so a row with K <= BLOCK_K (the common
case: the space reaches BLOCK_K = 8192) is read from memory once; only the blocks after the
first are read twice (once for the max, once to quantize). A program quantizes BLOCK_M rows:
one when x's rows are contiguous, a tile of rows when they are columns in memory (x a
transposed view, as FP8 training quantizes x^T, dy^T and W^T), so that each load reads
BLOCK_M neighbouring elements instead of one element per row.

NaN and Inf (the same on the torch path): a row of x holding a NaN gets scale NaN, and a
row holding ±Inf (and no NaN) scale +Inf; x / scale is then NaN or 0 everywhere, and NaN
quantizes to 0, so such a row is all zeros. A W8A8 GEMM then gives NaN (0 * NaN, 0 * Inf)
for the whole row: right for a NaN row (F.linear's row is NaN too), but F.linear's row for
±Inf is ±Inf where the infinities meet nonzero weights of one sign, NaN elsewhere, so
``redo_infinite_rows`` recomputes the rows with scale +Inf from x itself.
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from ._autotune import Configs, autotune
from ._config import interpreting, on_device_of

ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: v + magic - magic rounds |v| < 2**22 half to even

# One row a program (BLOCK_M = 1). BLOCK_K >= K: the row is held in registers and read once
# (16 fp32 values a thread at 4096 over 8 warps and at 8192 over 16). BLOCK_K = 16384
# spilled on sm_90 over 16 warps and over 32 (64 registers a thread), so rows longer than
# 8192 take the two-pass loop.
QUANT_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": 1, "BLOCK_K": bk}, num_warps=w) for bk, w in [(1024, 4), (2048, 8), (4096, 8),
                                                                            (8192, 16)]],
    triton.Config({"BLOCK_M": 1, "BLOCK_K": 1024}),  # the interpreter's cost is per step, not per element
)
_REDO_CONFIGS = Configs(
    [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4) for bn, bk in [(64, 64), (128, 32)]],
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}),
)


@triton.jit
def load_row_block(x_ptr, smooth_ptr, rows, k0, M, K, stride_xm, stride_xk, SMOOTHED: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """(x[rows, k0:k0 + BLOCK_K] [BLOCK_M, BLOCK_K] in fp32 with 0 past M and K, divided
    column by column by smooth[k0:k0 + BLOCK_K] (fp32 [K], IEEE division) when SMOOTHED,
    its column offsets (int64), its mask); ``rows`` int64 [BLOCK_M]."""
    offs = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask = (rows < M)[:, None] & (offs < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs[None, :] * stride_xk, mask=mask, other=0).to(tl.float32)
    if SMOOTHED:
        x = tl.div_rn(x, tl.zeros_like(x) + tl.load(smooth_ptr + offs, mask=offs < K, other=1.0)[None, :])
    return x, offs, mask


@triton.jit
def row_absmax(x_ptr, smooth_ptr, rows, first, M, K, stride_xm, stride_xk, SMOOTHED: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """[BLOCK_M]: max |x[row, k]| (of x / smooth when SMOOTHED) over k < K, in fp32 (0 for
    K = 0; NaN when the row holds a NaN), given ``first``, the rows' first block
    (``load_row_block`` at k0 = 0), held by the caller: only the blocks after it are read,
    none when K <= BLOCK_K."""
    amax = tl.abs(first)
    nans = (first != first).to(tl.int32)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        x, _, _ = load_row_block(x_ptr, smooth_ptr, rows, k0, M, K, stride_xm, stride_xk, SMOOTHED, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(x))
        nans |= (x != x).to(tl.int32)
    return tl.where(tl.max(nans, axis=1) > 0, float("nan"), tl.max(amax, axis=1))


@triton.jit
def _round_to_fp8(v, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """v (fp32, |v| <= the format's max) rounded half to even to the FP8 grid, in fp32."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN)  # the binade; subnormals share EMIN's ulp
    ulp = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((MBITS - e + 127) << 23).to(tl.float32, bitcast=True)
    r = ((tl.abs(v) * inv_ulp + ROUND_MAGIC) - ROUND_MAGIC) * ulp  # both products exact
    return tl.where(bits < 0, -r, r)


@triton.jit
def row_scales(x_ptr, smooth_ptr, rows, first, M, K, stride_xm, stride_xk, Q_MAX: tl.constexpr,
               SMOOTHED: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M]: each row's scale, max |x[row]| / Q_MAX (``row_absmax``'s max, IEEE
    division), 1 for an all-zero row, NaN for a row holding a NaN, +Inf for one holding
    ±Inf; ``first`` as for row_absmax."""
    top = row_absmax(x_ptr, smooth_ptr, rows, first, M, K, stride_xm, stride_xk, SMOOTHED, BLOCK_K)
    scale = tl.div_rn(top, tl.zeros_like(top) + Q_MAX)
    return tl.where(scale == 0, 1.0, scale)


@triton.jit
def _clamped_ratio(x, scale, Q_MAX: tl.constexpr):
    """clamp(x / scale, -Q_MAX, Q_MAX) in fp32 (IEEE division), NaN to 0; ``scale``
    broadcast against x."""
    v = tl.div_rn(x, tl.zeros_like(x) + scale)
    v = tl.where(v != v, 0.0, v)
    return tl.minimum(tl.maximum(v, -Q_MAX), Q_MAX)


@triton.jit
def int8_codes(x, scale):
    """clamp(x / scale, -127, 127) rounded half to even, NaN to 0, as int8 (``scale``
    broadcast against x; IEEE division): the int8 code of quantize_rows_kernel."""
    v = _clamped_ratio(x, scale, 127.0)
    return ((v + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int8)


@triton.jit
def _quantize_block(x, q_ptrs, mask, scale, Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr,
                    MBITS: tl.constexpr, EMIN: tl.constexpr):
    """*q_ptrs = the code of clamp(x / scale, -Q_MAX, Q_MAX) where ``mask``, NaN to 0,
    ``scale`` broadcast against x: for int8 (Q_DTYPE tl.int8, Q_MAX 127) rounded half to
    even, stored as int8; for FP8 rounded to the FP8 grid (MBITS mantissa bits, smallest
    normal exponent EMIN), stored as its bits (uint8)."""
    if Q_DTYPE == tl.int8:
        tl.store(q_ptrs, int8_codes(x, scale), mask=mask)
    else:
        v = _clamped_ratio(x, scale, Q_MAX)
        q = _round_to_fp8(v, MBITS, EMIN).to(Q_DTYPE)  # exact: already on the grid
        # The sign bit set from v's: the interpreter's cast drops the sign of -0 (a negative
        # value over an infinite scale, or below the smallest subnormal), torch's keeps it.
        sign = tl.where(v.to(tl.int32, bitcast=True) < 0, 0x80, 0).to(tl.uint8)
        tl.store(q_ptrs, q.to(tl.uint8, bitcast=True) | sign, mask=mask)


@triton.jit
def quantize_rows_kernel(
    # pointers
    x_ptr, smooth_ptr, q_ptr, scale_ptr, static_ptr,
    # sizes
    M, K,
    # strides
    stride_xm, stride_xk,
    stride_qm,
    # meta-parameters: the code (Q_DTYPE, Q_MAX, MBITS, EMIN), the tile
    STATIC: tl.constexpr, SMOOTHED: tl.constexpr, Q_DTYPE: tl.constexpr, Q_MAX: tl.constexpr,
    MBITS: tl.constexpr, EMIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """q [M, K] and scale [M] of x [M, K] (of x / smooth, column by column, when SMOOTHED:
    SmoothQuant's divisor fused, smooth fp32 [K]), per row: scale = max|x[m]| / Q_MAX (IEEE
    division; 1 for an all-zero row; NaN for a row holding a NaN), or *static_ptr
    (STATIC); q the code of x / scale (``_quantize_block``). Program p quantizes rows
    p * BLOCK_M, ...; their first block stays in registers from the max to the
    quantization (one read of x when K <= BLOCK_K, see the module doc). The int8 and FP8
    quantizers' kernel, autotuned by each (``autotune(...)(quantize_rows_kernel)``)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    first, offs, mask = load_row_block(x_ptr, smooth_ptr, rows, 0, M, K, stride_xm, stride_xk, SMOOTHED, BLOCK_K)
    if STATIC:
        scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_ptr).to(tl.float32)
    else:
        scale = row_scales(x_ptr, smooth_ptr, rows, first, M, K, stride_xm, stride_xk, Q_MAX, SMOOTHED, BLOCK_K)
    q_rows_ptr = q_ptr + rows[:, None] * stride_qm
    nans = tl.max((first != first).to(tl.int32), axis=1)
    _quantize_block(first, q_rows_ptr + offs[None, :], mask, scale[:, None], Q_DTYPE, Q_MAX, MBITS, EMIN)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        x, offs, mask = load_row_block(x_ptr, smooth_ptr, rows, k0, M, K, stride_xm, stride_xk, SMOOTHED, BLOCK_K)
        nans |= tl.max((x != x).to(tl.int32), axis=1)
        _quantize_block(x, q_rows_ptr + offs[None, :], mask, scale[:, None], Q_DTYPE, Q_MAX, MBITS, EMIN)
    tl.store(scale_ptr + rows, tl.where(nans > 0, float("nan"), scale), mask=rows < M)


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number ``tile`` in grouped order: tiles run down GROUP_M
    row blocks before moving to the next column block, so that GROUP_M row blocks of a and a
    few column blocks of b are reused from L2 while they are there."""
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (tile % (GROUP_M * grid_n)) % rows, (tile % (GROUP_M * grid_n)) // rows


@triton.jit
def operand_source(ptr, R, K, stride_r, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    """What ``load_operand_tile`` reads a GEMM operand [R, K] (unit stride along K under
    USE_TMA) from: a TMA descriptor of [BLOCK_R, BLOCK_K] tiles when USE_TMA, else ``ptr``."""
    if USE_TMA:
        return tl.make_tensor_descriptor(ptr, [R, K], [stride_r, 1], [BLOCK_R, BLOCK_K])
    else:
        return ptr


@triton.jit
def load_operand_tile(src, pid, k0, R, K, stride_r, stride_k, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_TMA: tl.constexpr):
    """Tile [pid * BLOCK_R:, k0:] [BLOCK_R, BLOCK_K] of the operand [R, K] behind ``src``
    (``operand_source``), zero past R and K: one TMA copy, or masked loads through strides."""
    if USE_TMA:
        return src.load([pid * BLOCK_R, k0])
    else:
        offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        return tl.load(src + offs_r[:, None] * stride_r + offs_k[None, :] * stride_k,
                       mask=(offs_r < R)[:, None] & (offs_k < K)[None, :], other=0.0)  # 0.0: int 0 has no FP8 cast


# Programs per SM of the GEMMs' persistent grid: tiles of 128 x 128 and more hold one
# program per SM (FP8: 8 warps at 136 to 254 registers and 129 KB of shared memory and more
# in the sm_90 kernel report; int8's 128 x 128 through TMA would fit two: not measured yet),
# smaller two.
_BIG_TILE = 128 * 128
# Stand-in for the SM count off a GPU (the interpreter): small, so that the tests' programs
# loop over several tiles.
_PROGRAMS_WITHOUT_SMS = 2


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(device: torch.device, per_sm: int) -> int:
    """How many programs a persistent grid on ``device`` launches at ``per_sm`` programs
    per SM (``_PROGRAMS_WITHOUT_SMS`` off a GPU)."""
    return _sm_count(device) * per_sm if device.type == "cuda" else _PROGRAMS_WITHOUT_SMS


def persistent_grid(device: torch.device, m: int, n: int):
    """The grid of a persistent GEMM over the [m, n] output (``grouped_tile`` order): one
    program per output tile up to the programs the device keeps resident (1 or 2 per SM by
    tile size; ``_PROGRAMS_WITHOUT_SMS`` off a GPU), each looping over the tiles
    pid, pid + programs, ..."""
    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        per_sm = 1 if meta["BLOCK_M"] * meta["BLOCK_N"] >= _BIG_TILE else 2
        return (min(tiles, persistent_programs(device, per_sm)),)
    return grid


# Bytes a TMA descriptor needs its address and row stride to be a multiple of.
_TMA_ALIGNMENT = 16


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Triton's global scratch of a launch (the kernel's TMA descriptors), on the current
    device and stream (torch's caching allocator: 512-byte aligned, freed after the launch
    in stream order)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_loads(*operands: torch.Tensor) -> bool:
    """Whether a GEMM can load each of ``operands`` (2-D, [rows, K]) through TMA
    descriptors: a device with TMA (sm_90 and later; the interpreter, which emulates them;
    a meta tensor, which stands for an sm_90 call in the kernel report), and each operand
    at a 16-byte-aligned address with unit stride along K and a row stride of a multiple
    of 16 bytes. When it can on a GPU, the caller's thread gets ``_scratch`` as Triton's
    allocator unless one is set (Triton keeps it per thread, in a context variable)."""
    device = operands[0].device
    if device.type == "cuda":
        if not _has_tma(device):
            return False
    elif device.type != "meta" and not interpreting():
        return False
    for t in operands:
        if (t.data_ptr() % _TMA_ALIGNMENT or t.stride(1) != 1
                or t.stride(0) * t.element_size() % _TMA_ALIGNMENT):
            return False
    if device.type == "cuda" and isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
    return True


@autotune(_REDO_CONFIGS, key=["N", "K"])
@triton.jit
def _redo_infinite_rows_kernel(
    # pointers
    x_ptr, smooth_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr,
    # sizes
    N, K,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    stride_ws, stride_bias,
    # meta-parameters
    W_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTHED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m, j): if x_scale[m] is +Inf, y[m, block j] = (x[m] @ w^T) * w_scale + bias
    (x[m] / smooth when SMOOTHED) with fp32 products and sums, whose NaN/Inf pattern is
    F.linear's; else nothing."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(x_scale_ptr + row) == float("inf"):
        offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        redo_row(x_ptr, smooth_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr, row, offs_n, N, K,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_ws, stride_bias,
                 W_DTYPE, HAS_BIAS, SMOOTHED, BLOCK_N, BLOCK_K)


@triton.jit
def redo_row(x_ptr, smooth_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr, row, offs_n, N, K,
             stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_ws, stride_bias,
             W_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTHED: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[row, offs_n] = (x[row] @ w[offs_n]^T) * w_scale + bias (x[row] / smooth when
    SMOOTHED) with fp32 products and sums, whose NaN/Inf pattern is F.linear's: a row of x
    holding ±Inf, which the quantized product cannot give."""
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=mask_k, other=0).to(tl.float32)
        if SMOOTHED:
            x = tl.div_rn(x, tl.load(smooth_ptr + offs_k, mask=mask_k, other=1.0))
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # 0.0: int 0 has no FP8 cast
        acc += tl.sum(w.to(W_DTYPE, bitcast=True).to(tl.float32) * x[None, :], axis=1)
    out = acc * tl.load(w_scale_ptr + offs_n * stride_ws, mask=mask_n, other=0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs_n * stride_yn, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def redo_infinite_rows(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor], y: torch.Tensor, w_dtype,
                       smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] (modified in place, and returned) with each row m whose x_scale[m] is +Inf
    recomputed as x[m] @ (w * w_scale)^T + bias (x[m] / smoothing when given: fp32 [K]):
    x [M, K] float, w [N, K] (int8, or FP8 or, under the interpreter, FP8 viewed as uint8;
    of Triton type ``w_dtype``), w_scale [N] or [1], bias [N] or None. One launch over
    every row; rows with a finite scale end at once."""
    m, k = x.shape
    n = w.shape[0]
    if m == 0 or n == 0:
        return y
    grid = lambda meta: (m, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    with on_device_of(x):
        _redo_infinite_rows_kernel[grid](
            x, x if smoothing is None else smoothing, w, x_scale, w_scale, y if bias is None else bias, y,
            n, k,
            x.stride(0), x.stride(1),
            w.stride(0), w.stride(1),
            y.stride(0), y.stride(1),
            0 if w_scale.numel() == 1 else w_scale.stride(0), 0 if bias is None else bias.stride(0),
            W_DTYPE=w_dtype, HAS_BIAS=bias is not None, SMOOTHED=smoothing is not None,
        )
    return y

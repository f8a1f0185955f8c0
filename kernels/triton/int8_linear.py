"""int8 linear layers: W8A8 (dynamic per-token activation scales) and weight-only W8A16.

quantize_rows: q [M, K] int8, scale [M] fp32 for x [M, K]: scale = max|x[m]| / 127 (1 for an
    all-zero row), or a given static scale; q = clamp(round(x / scale), -127, 127), the
    division IEEE-exact and the rounding half to even (the fp32 magic-number add), so the
    result equals torch.round's. NaN quantizes to 0; a row holding a NaN gets scale NaN
    (with a static scale too), a row holding ±Inf scale +Inf (see _rows.py).
int8_linear: y [M, N] = (q_x @ q_w^T) * scale_x[m] * scale_w[n] + bias, the product in int32
    on int8 tensor cores (W8A8), or y = (x @ q_w^T) * scale_w[n] + bias with the int8 weight
    tile converted to x's dtype in registers (W8A16). Epilogue fused; fp32 accumulation for
    W8A16. K need not be a multiple of 16: tiles are masked with zeros. W8A8 accumulates in
    int32, exact up to K = INT32_SAFE_K (|q_x| <= 127, |q_w| <= 128); beyond it (CHUNKED, a
    variant compiled only for such K, as the second accumulator costs registers) it sums
    chunks of at most INT32_SAFE_K in int32 and adds them in fp32: any K is safe. Rows of x holding ±Inf are recomputed from x
    (``_rows.redo_infinite_rows``), so NaN and Inf reach y as through F.linear. Grouped
    tile order; operand tiles through TMA descriptors, on a persistent grid, where x (or
    q_x) and q_w allow it, else through pointers, one tile a program (``_rows.tma_loads``).
int_mm_linear: W8A8 y as int8_linear computes it, the int8 product by torch._int_mm
    (cuBLASLt) and the scaling by int8_linear's own epilogue (``_scale_and_store``), so the
    same y bit for bit; the binding times both ways on CUDA.
quantize_linear: W8A8 y as int8_linear computes it, for M <= 16 in one launch (x quantized
    in the GEMM's registers), the same y bit for bit; the binding times it against the
    three launches of int8_linear on CUDA.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..dispatch import SPLIT_K_MAX_M
from ._autotune import Configs, autotune
from ._config import dot_meta, on_device_of
from ._rows import (QUANT_CONFIGS, grouped_tile, int8_codes, load_operand_tile, load_row_block, operand_source,
                    persistent_grid, quantize_rows_kernel, redo_infinite_rows, redo_row, row_scales, tma_loads)

# The longest K whose int8 x int8 dot cannot overflow int32: 2**31 / (127 * 128) > 2**17.
INT32_SAFE_K = tl.constexpr(1 << 17)

_GEMM_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
                              (64, 64, 128, 4, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 3)]],
    # No 128 x 256 tile: its int32 accumulator alone is 128 registers a thread at 8 warps; it
    # compiled to 215-255 registers and spilled at some specialisations (sm_90).
    # the interpreter's cost is per step: K = 133,145 (the int32 overflow test) in 261 steps
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 512, "GROUP_M": 2}),
)


# _int_mm's epilogue reads 4 bytes and writes 2 per element: tiles of 4K to 8K elements.
_EPILOGUE_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4) for bm, bn in [(32, 128), (64, 128), (16, 256)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}),
)


# The fused small-M W8A8 kernel: one block of 16 rows (SPLIT_K_MAX_M), weight tiles as the
# small-M configs of int4 and N:M read theirs.
_FUSED_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
     for bn, bk, w, st in [(32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 8, 3)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}),
)


# The per-row quantizer (_rows.quantize_rows_kernel) for int8 codes.
_quantize_rows_kernel = autotune(QUANT_CONFIGS, key=["K"])(quantize_rows_kernel)
_INT8_CODE = {"Q_DTYPE": tl.int8, "Q_MAX": 127.0, "MBITS": 0, "EMIN": 0}


@triton.jit
def _dot_k_range(x_src, w_src, acc, pid_m, pid_n, M, N, k_start, k_end, K,
                 stride_xm, stride_xk, stride_wn, stride_wk,
                 W8A8: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + x[tile pid_m, k_start:k_end] @ w[tile pid_n, k_start:k_end]^T: int8 x int8 into
    an int32 acc (W8A8), or x's float type times the int8 weight cast to it; x_src and w_src
    from ``_rows.operand_source``."""
    for k0 in range(k_start, k_end, BLOCK_K):
        x = load_operand_tile(x_src, pid_m, k0, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, USE_TMA)
        w = load_operand_tile(w_src, pid_n, k0, N, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K, USE_TMA)
        if W8A8:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            if UPCAST:  # the same values: |q| <= 127 is exact in bf16
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            else:
                w = w.to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _linear_tile(tile, x_src, w_src, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, K,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_bias,
                 W8A8: tl.constexpr, CHUNKED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile number ``tile`` (``_rows.grouped_tile`` order): y = its product, scaled,
    plus the bias, in y's dtype."""
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if CHUNKED:  # W8A8 with K > INT32_SAFE_K: exact int32 chunks, summed in ACC_DTYPE
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        CHUNK_K: tl.constexpr = INT32_SAFE_K // BLOCK_K * BLOCK_K
        for chunk in range(0, K, CHUNK_K):
            part = _dot_k_range(x_src, w_src, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32), pid_m, pid_n,
                                M, N, chunk, tl.minimum(K, chunk + CHUNK_K), K,
                                stride_xm, stride_xk, stride_wn, stride_wk,
                                W8A8, ACC_DTYPE, PRECISION, UPCAST, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            acc += part.to(ACC_DTYPE)
    else:
        acc = _dot_k_range(x_src, w_src, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if W8A8 else ACC_DTYPE),
                           pid_m, pid_n, M, N, 0, K, K,
                           stride_xm, stride_xk, stride_wn, stride_wk,
                           W8A8, ACC_DTYPE, PRECISION, UPCAST, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    if W8A8:  # (W8A16 has no row scales: x_scale_ptr is not read)
        x_scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0)
    else:
        x_scale = tl.zeros([BLOCK_M], dtype=tl.float32)
    _scale_and_store(acc, x_scale, offs_m, offs_n, offs_m < M, N, w_scale_ptr, bias_ptr, y_ptr,
                     stride_ym, stride_yn, stride_bias, W8A8, HAS_BIAS)


@triton.jit
def _scale_and_store(acc, x_scale, offs_m, offs_n, rows_stored, N, w_scale_ptr, bias_ptr, y_ptr,
                     stride_ym, stride_yn, stride_bias, W8A8: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[offs_m, offs_n] = acc * w_scale[n] (* x_scale [BLOCK_M] for W8A8) + bias[n], in fp32
    in that order, rounded once to y's dtype, for the rows where ``rows_stored``: the
    epilogue of every way to W8A8 (the Triton GEMM's, _int_mm's and the fused small-M
    kernel's), so they give the same y bit for bit."""
    mask_n = offs_n < N
    out = acc.to(tl.float32) * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    if W8A8:
        out = out * x_scale.to(tl.float32)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             out.to(y_ptr.dtype.element_ty), mask=rows_stored[:, None] & mask_n[None, :])


@autotune(_EPILOGUE_CONFIGS, key=["N"])
@triton.jit
def _int_mm_epilogue_kernel(
    # pointers: acc int32 [M, N] (torch._int_mm's), the scales, bias and y
    acc_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr,
    # sizes
    M, N,
    # strides
    stride_am, stride_an,
    stride_ym, stride_yn,
    stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.load(acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an,
                  mask=(offs_m < M)[:, None] & (offs_n < N)[None, :], other=0)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0)
    _scale_and_store(acc, x_scale, offs_m, offs_n, offs_m < M, N, w_scale_ptr, bias_ptr, y_ptr,
                     stride_ym, stride_yn, stride_bias, True, HAS_BIAS)


@autotune(_FUSED_CONFIGS, key=["M", "N", "K"], bucket=["M"])
@triton.jit
def _int8_quantize_linear_kernel(
    # pointers: x (float), SmoothQuant's divisor (fp32 [K]) or anything, q_w, its scales, bias, y
    x_ptr, smooth_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr,
    # sizes (M <= BLOCK_M: every row in one block)
    M, N, K,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    stride_bias,
    # meta-parameters
    SMOOTHED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W8A8 for M <= BLOCK_M in one launch: program j finds the scales of every row of x (a
    pass over x), then for each K step quantizes x's tile in registers (``int8_codes``, the
    quantizer's rounding) and adds its int8 product with q_w's rows of block j; the shared
    epilogue; rows holding ±Inf recomputed in fp32 (``redo_row``). The same y bit for bit as
    quantize_rows + the GEMM + redo_infinite_rows, where those take three launches."""
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    first, _, _ = load_row_block(x_ptr, smooth_ptr, rows, 0, M, K, stride_xm, stride_xk, SMOOTHED, BLOCK_K)
    scale = row_scales(x_ptr, smooth_ptr, rows, first, M, K, stride_xm, stride_xk, 127.0, SMOOTHED, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x, offs_k, _ = load_row_block(x_ptr, smooth_ptr, rows, k0, M, K, stride_xm, stride_xk, SMOOTHED, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & (offs_k < K)[None, :], other=0)
        acc = tl.dot(int8_codes(x, scale[:, None]), tl.trans(w), acc, out_dtype=tl.int32)
    infinite = scale == float("inf")
    _scale_and_store(acc, scale, rows, offs_n, (rows < M) & ~infinite, N, w_scale_ptr, bias_ptr, y_ptr,
                     stride_ym, stride_yn, stride_bias, True, HAS_BIAS)
    if tl.max(infinite.to(tl.int32)) > 0:
        for row in range(0, M):
            if tl.max((infinite & (rows == row)).to(tl.int32)) > 0:
                redo_row(x_ptr, smooth_ptr, w_ptr, w_scale_ptr, bias_ptr, y_ptr, row, offs_n, N, K,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, 1, stride_bias,
                         tl.int8, HAS_BIAS, SMOOTHED, BLOCK_N, BLOCK_K)


@autotune(_GEMM_CONFIGS, key=["M", "N", "K", "W8A8", "CHUNKED", "USE_TMA"], bucket=["M"])
@triton.jit
def _int8_linear_kernel(
    # pointers
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    stride_bias,
    # meta-parameters
    W8A8: tl.constexpr, CHUNKED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Through TMA (USE_TMA), persistent: program p computes the output tiles p, p + programs,
    ... Through pointers, program p computes tile p: a loop over tiles cost the pointer
    loads up to 255 registers and twice the spills at K = 72 (sm_90)."""
    x_src = operand_source(x_ptr, M, K, stride_xm, BLOCK_M, BLOCK_K, USE_TMA)
    w_src = operand_source(w_ptr, N, K, stride_wn, BLOCK_N, BLOCK_K, USE_TMA)
    if USE_TMA:
        for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
            _linear_tile(tile, x_src, w_src, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, K,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_bias,
                         W8A8, CHUNKED, HAS_BIAS, ACC_DTYPE, PRECISION, UPCAST, USE_TMA,
                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _linear_tile(tl.program_id(0), x_src, w_src, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, K,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_bias,
                     W8A8, CHUNKED, HAS_BIAS, ACC_DTYPE, PRECISION, UPCAST, USE_TMA,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor],
                  smoothing: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [M, K], scale fp32 [M]) for float x [M, K] (x / smoothing, fp32 [K], when
    given); ``static_scale`` (a 1-element tensor) replaces the per-row scales when given."""
    m, k = x.shape
    q = _alloc.empty((m, k), torch.int8, x.device)
    scale = _alloc.empty((m,), torch.float32, x.device)
    if m == 0:
        return q, scale
    static = static_scale if static_scale is not None else scale
    with on_device_of(x):
        _quantize_rows_kernel[(m,)](x, x if smoothing is None else smoothing, q, scale, static, m, k,
                                    x.stride(0), x.stride(1), q.stride(0),
                                    STATIC=static_scale is not None, SMOOTHED=smoothing is not None, **_INT8_CODE)
    return q, scale


def int_mm_takes(m: int, n: int, k: int) -> bool:
    """Whether ``int_mm_linear`` takes an [m, k] x [n, k]^T product: cuBLASLt's int8 GEMM
    (torch._int_mm) needs m > 16 and n, k multiples of 8; its int32 sum is exact up to
    k = INT32_SAFE_K."""
    return m > 16 and n % 8 == 0 and k % 8 == 0 and 0 < k <= INT32_SAFE_K


def int_mm_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias,
                  smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 y [M, N] as ``int8_linear`` computes it, the int8 product by cuBLASLt instead of
    the Triton GEMM: x quantized per row (``quantize_rows``), torch._int_mm's int32 [M, N]
    product, then one epilogue kernel (the Triton GEMM's own: the same y bit for bit) and
    the rows with ±Inf recomputed. Shapes that ``int_mm_takes``. Triton makes a wgmma
    asynchronous only with an fp32 accumulator, so its int8 GEMM waits for every wgmma;
    whether cuBLASLt's is faster, the binding measures (bindings/int8_linear.py)."""
    m, k = x.shape
    n = qweight.shape[0]
    a, a_scale = quantize_rows(x, None, smoothing)
    acc = torch._int_mm(a, qweight.t())
    y = _alloc.empty((m, n), x.dtype, x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    with on_device_of(x):
        _int_mm_epilogue_kernel[grid](acc, a_scale, scales.contiguous(), y if bias is None else bias, y,
                                      m, n, acc.stride(0), acc.stride(1), y.stride(0), y.stride(1),
                                      0 if bias is None else bias.stride(0), HAS_BIAS=bias is not None)
    return redo_infinite_rows(x, a_scale, qweight, scales, bias, y, tl.int8, smoothing)


def fused_takes(m: int, k: int) -> bool:
    """Whether ``quantize_linear`` takes x [m, k]: every row in its one block of 16, and K
    within the int32-exact sum."""
    return 0 < m <= SPLIT_K_MAX_M and k <= INT32_SAFE_K


def quantize_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias,
                    smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A8 y [M, N] as ``int8_linear`` computes it, in one launch for M <= 16 (where the
    quantizer, the GEMM and the ±Inf recompute are three): each program quantizes x's rows
    in registers, reading x twice (for the row scales, then tile by tile), which costs
    little next to the weight at decode sizes. Shapes that ``fused_takes``."""
    m, k = x.shape
    n = qweight.shape[0]
    y = _alloc.empty((m, n), x.dtype, x.device)
    if n == 0:
        return y
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with on_device_of(x):
        _int8_quantize_linear_kernel[grid](
            x, x if smoothing is None else smoothing, qweight, scales.contiguous(), y if bias is None else bias, y,
            m, n, k,
            x.stride(0), x.stride(1),
            qweight.stride(0), qweight.stride(1),
            y.stride(0), y.stride(1),
            0 if bias is None else bias.stride(0),
            SMOOTHED=smoothing is not None, HAS_BIAS=bias is not None,
        )
    return y


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias,
                quantize_activation: bool, smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (q_w * scale_w)^T + bias, x quantized per row (W8A8) when
    ``quantize_activation``, else used as is (W8A16); W8A8 quantizes x / smoothing (fp32
    [K], SmoothQuant's divisor) when given, the division fused into the quantizer."""
    m, k = x.shape
    n = qweight.shape[0]
    y = _alloc.empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    scales = scales.contiguous()  # read at unit stride
    a, a_scale = quantize_rows(x, None, smoothing) if quantize_activation else (x, scales)
    use_tma = tma_loads(a, qweight)
    tile_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with on_device_of(x):
        _int8_linear_kernel[persistent_grid(x.device, m, n) if use_tma else tile_grid](
            a, qweight, a_scale, scales, y if bias is None else bias, y,
            m, n, k,
            a.stride(0), a.stride(1),
            qweight.stride(0), qweight.stride(1),
            y.stride(0), y.stride(1),
            0 if bias is None else bias.stride(0),
            W8A8=quantize_activation, CHUNKED=quantize_activation and k > INT32_SAFE_K,
            HAS_BIAS=bias is not None, USE_TMA=use_tma, **dot_meta(x.dtype),
        )
    if quantize_activation:
        redo_infinite_rows(x, a_scale, qweight, scales, bias, y, tl.int8, smoothing)
    return y

"""FP8 scaled GEMM and per-row FP8 quantization.

quantize_rows: q [M, K] (float8_e4m3fn or float8_e5m2), scale [M] fp32 for float x [M, K]:
    scale = max|x[m]| / fmax (1 for an all-zero row), or a given static scale;
    q = fp8(clamp(x / scale, -fmax, fmax)), the division IEEE-exact and the cast to nearest
    even. The rounding to the FP8 grid is done in fp32 arithmetic (scale by the power of
    two of the value's FP8 ulp, the magic-number add, scale back), so the final cast is
    exact: the same bits on a GPU and in the interpreter (whose own fp32->fp8 cast
    mis-rounds values that carry into the next binade), and equal to torch's cast. NaN
    quantizes to 0; a row holding a NaN gets scale NaN (with a static scale too), a row
    holding ±Inf scale +Inf (see _rows.py).
scaled_mm: y [M, N] = (a @ b^T) * a_scale[m] * b_scale[n] + bias, out in fp16/bf16/fp32.
    a [M, K] FP8 (FP8 x FP8 on tensor cores, fp32 accumulation) or float (weight-only: the
    FP8 tile of b [N, K] is converted to a's dtype in registers; a_scale is unused); b FP8.
    A scale of one element is tensor-wise (read with stride 0). Epilogue (both scales,
    bias, cast) fused. K need not be a multiple of 16: tiles are zero past the edges.
    Operand tiles come through TMA descriptors where both operands allow it (sm_90 and
    later, 16-byte-aligned rows: ``_rows.tma_loads``), else through pointers with masks.
    FP8 is loaded as FP8 on a GPU, and as uint8 then bitcast under the interpreter only
    (its masked FP8 loads fail). Persistent grid, grouped tile order (_rows.py).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._autotune import Configs, autotune
from ._config import dot_meta, interpreting, on_device_of
from ._rows import (QUANT_CONFIGS, grouped_tile, persistent_grid, quantize_rows_kernel, redo_infinite_rows,
                    load_operand_tile, operand_source, tma_loads)

# torch FP8 dtype name -> (Triton dtype, mantissa bits, smallest normal exponent)
_FORMATS = {"float8_e4m3fn": (tl.float8e4nv, 3, -6), "float8_e5m2": (tl.float8e5, 2, -14)}

# FP8 x FP8: a and b tiles of one byte an element.
_GEMM_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in [(16, 16, 512, 2, 4), (16, 32, 512, 4, 3),  # small M: more CTAs, more bytes in flight
                              (16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 128, 128, 4, 4),
                              (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 4),
                              (128, 128, 128, 8, 4), (128, 256, 128, 8, 3)]],
    # No 256 x 128 tile: it spilled (255 registers) at N = 40 on sm_90, through TMA and pointers.
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}),
)
# Weight-only: a is float (up to 4 bytes an element, and b is converted to a's dtype for the
# dot), so its tiles take up to 4x the shared memory: the small-M tiles, which fit sm_90's
# 227 KB in fp32 (the large ones took 256 KB and more).
_WEIGHT_ONLY_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in [(16, 16, 512, 2, 3), (16, 32, 256, 4, 4), (16, 64, 256, 4, 3),
                              (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 3)]],
    _GEMM_CONFIGS.test,
)


# Quantizing a transposed view (x^T, dy^T, W^T in FP8 training): tiles of BLOCK_M rows of x,
# which are columns in memory, so that a load reads BLOCK_M contiguous elements; a row
# longer than BLOCK_K is read twice (the max, then the quantization). 16 elements a thread
# (the first tile, the max and the NaN flags are held through the loop): 32 took 163 to 175
# registers on sm_90, 64 took 198 to 255.
_COLUMN_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w)
     for bm, bk, w in [(16, 128, 4), (32, 64, 4), (32, 128, 8), (64, 64, 8), (64, 128, 16)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}),
)


def fp8_format(dtype: torch.dtype) -> dict:
    """Constexprs of FP8 ``dtype``: its Triton type, largest finite value, mantissa bits and
    smallest normal exponent (the quantizer's code)."""
    tl_dtype, mbits, emin = _FORMATS[str(dtype).replace("torch.", "")]
    return {"Q_DTYPE": tl_dtype, "Q_MAX": float(torch.finfo(dtype).max), "MBITS": mbits, "EMIN": emin}


# The per-row quantizer (_rows.quantize_rows_kernel) for FP8 codes (``fp8_format``).
_quantize_rows_kernel = autotune(QUANT_CONFIGS, key=["K"])(quantize_rows_kernel)


# The same kernel over tiles of BLOCK_M rows, for x whose rows are columns in memory
# (stride_xm == 1): each load reads BLOCK_M neighbours along a column of memory.
_quantize_columns_kernel = autotune(_COLUMN_CONFIGS, key=["M", "K"], bucket=["M"])(quantize_rows_kernel)


@autotune(_GEMM_CONFIGS, key=["M", "N", "K", "A_FP8", "USE_TMA"], bucket=["M"])
@triton.jit
def _fp8_scaled_mm_kernel(
    # pointers
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_ym, stride_yn,
    stride_as, stride_bs, stride_bias,
    # meta-parameters
    A_FP8: tl.constexpr, A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Persistent: program p computes the output tiles p, p + programs, ... in grouped order
    (``_rows.grouped_tile``). a and b are FP8 (or a float, weight-only) on a GPU and uint8
    under the interpreter, bitcast to A_DTYPE and B_DTYPE (a no-op on FP8 pointers)."""
    a_src = operand_source(a_ptr, M, K, stride_am, BLOCK_M, BLOCK_K, USE_TMA)
    b_src = operand_source(b_ptr, N, K, stride_bn, BLOCK_N, BLOCK_K, USE_TMA)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = load_operand_tile(a_src, pid_m, k0, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, USE_TMA)
            b = load_operand_tile(b_src, pid_n, k0, N, K, stride_bn, stride_bk, BLOCK_N, BLOCK_K, USE_TMA)
            b = b.to(B_DTYPE, bitcast=True)
            if A_FP8:
                a = a.to(A_DTYPE, bitcast=True)
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.float32)
            else:
                if UPCAST:  # exact: every FP8 value is a bf16 and an fp32 value
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                else:
                    b = b.to(a.dtype)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m, mask_n = offs_m < M, offs_n < N
        out = acc * tl.load(b_scale_ptr + offs_n * stride_bs, mask=mask_n, other=0)[None, :]
        if A_FP8:
            out = out * tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=0)[:, None]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The same kernel with float a (A_FP8 False), tuned over the configs that fit its tiles.
_weight_only_mm_kernel = autotune(_WEIGHT_ONLY_CONFIGS, key=["M", "N", "K", "A_FP8", "USE_TMA"], bucket=["M"])(
    _fp8_scaled_mm_kernel.fn)


def _fp8_operand(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as the kernels take it: itself on a GPU (native FP8 loads, which keep the
    GEMM's operands in shared memory for wgmma), its bits as uint8 under the interpreter,
    whose masked FP8 loads fail (the kernels bitcast the uint8 back)."""
    return t.view(torch.uint8) if interpreting() else t


def _scale_stride(scale: torch.Tensor) -> int:
    """0 for a tensor-wise (one-element) scale, read by every row or column."""
    return 0 if scale.numel() == 1 else scale.stride(0)


def quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor],
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] in FP8 ``dtype``, scale fp32 [M]) for float x [M, K] (any strides: a
    transposed view, whose rows are columns in memory, is read a tile of rows at a time);
    ``static_scale`` (a 1-element tensor) replaces the per-row scales when given."""
    m, k = x.shape
    q = _alloc.empty((m, k), torch.uint8, x.device)
    scale = _alloc.empty((m,), torch.float32, x.device)
    if m > 0:
        static = static_scale if static_scale is not None else scale
        kernel = _quantize_columns_kernel if x.stride(0) == 1 and x.stride(1) != 1 else _quantize_rows_kernel
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
        with on_device_of(x):
            kernel[grid](x, x, q, scale, static, m, k, x.stride(0), x.stride(1), q.stride(0),
                         STATIC=static_scale is not None, SMOOTHED=False, **fp8_format(dtype))
    return q.view(dtype), scale


def scaled_mm(a: torch.Tensor, a_scale: Optional[torch.Tensor], b: torch.Tensor,
              b_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] = (a [M, K] @ b [N, K]^T) * a_scale * b_scale + bias in ``out_dtype``; a FP8
    with a_scale [M] or [1], or float with a_scale None (weight-only); b FP8, b_scale [N] or [1]."""
    m, k = a.shape
    n = b.shape[0]
    y = _alloc.empty((m, n), out_dtype, a.device)
    if m == 0 or n == 0:
        return y
    a_fp8 = a_scale is not None
    if not a_fp8:  # weight-only: the kernel never reads a_scale
        a_scale = b_scale
    a_op, b_op = _fp8_operand(a) if a_fp8 else a, _fp8_operand(b)
    with on_device_of(a):
        (_fp8_scaled_mm_kernel if a_fp8 else _weight_only_mm_kernel)[persistent_grid(a.device, m, n)](
            a_op, b_op, a_scale, b_scale,
            y if bias is None else bias, y,
            m, n, k,
            a.stride(0), a.stride(1),
            b.stride(0), b.stride(1),
            y.stride(0), y.stride(1),
            _scale_stride(a_scale), _scale_stride(b_scale), 0 if bias is None else bias.stride(0),
            A_FP8=a_fp8, A_DTYPE=fp8_format(a.dtype)["Q_DTYPE"] if a_fp8 else tl.float32,
            B_DTYPE=fp8_format(b.dtype)["Q_DTYPE"], HAS_BIAS=bias is not None, USE_TMA=tma_loads(a_op, b_op),
            **dot_meta(out_dtype if a_fp8 else a.dtype),
        )
    return y


def redo_rows(x: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """y [M, N] with the rows of x [M, K] that hold ±Inf (x_scale +Inf) recomputed from x as
    x @ (q_w * w_scale)^T + bias, in place (see _rows.py); qweight FP8 [N, K]."""
    return redo_infinite_rows(x, x_scale, _fp8_operand(qweight), w_scale, bias, y,
                              fp8_format(qweight.dtype)["Q_DTYPE"])

"""int4 weight-only linear (W4A16): y [M, N] = x [M, K] @ dequant(W)^T + bias.

W [N, K] is read in the format's own layout (sparqle.formats.int4, docs/int4.md): ``packed``
uint8 [N, 64 ceil(K / 128)], a row's codes in tiles of 128 (64 bytes) interleaved within
the tile in the order of the tensor cores' register fragments; ``scales`` and ``zeros``
[N, ceil(K / GROUP)]. The kernel reads that layout as it is (no second copy of the
weight), as int32 words: one program computes a [BLOCK_M, BLOCK_N] tile of y over one of
SPLIT_K slices of K, and for each BLOCK_K step loads

- x [BLOCK_M, BLOCK_K] and the step's words of ``packed`` [BLOCK_N, BLOCK_K / 8]
  (``_codes_of_step``). Both are addressed from the step index, so their offsets along K are
  known multiples of 16 bytes: each thread's part of a row is one 16-byte load that the
  software pipeline issues as cp.async, and the words' codes reach the dot's register
  fragment without a shared-memory round trip;
- one scale and one zero point per column and group: a [BLOCK_N] column when the step lies
  in one group (GROUP >= BLOCK_K, or one group per row: GROUP_PER_ROW, loaded once before
  the loop), else [BLOCK_N, BLOCK_K / GROUP] broadcast over each group's GROUP channels.

The codes are unpacked with masks and shifts (``tl.join`` + ``reshape`` put them in K order)
and turned into floats without an int -> float conversion: with
``MAGIC`` = 2^p (1024 for fp16, 128 for bf16, 2^23 for fp32, see MAGIC below), the bits
``q | bits(MAGIC)`` read as a float are exactly MAGIC + q (q fills the low mantissa bits), so
w = (that - (MAGIC + zero)) * scale: the subtraction is exact (small integers), and the one
rounding is the product's, to x's dtype: the same value as (q - zero) * scale computed in fp32
and rounded to x's dtype, which sparqle.formats.int4.dequantize gives. fp16 and bf16 decode in
their own dtype (bf16 under the interpreter, which has no bf16 arithmetic, in fp32: the same
value). ``tl.dot`` accumulates the tile of y^T = W x^T in fp32, the decoded weight as its
left operand (``_linear.dot_tile``): on sm_90 a weight tile of 64 or more rows feeds wgmma
from registers, asynchronously, at any token count; the bias is added in the epilogue.

Launched by ``_linear.launch_by_m`` for every M (thresholds and their reasons:
sparqle.kernels.dispatch): the split-K small-M configs at M <= SPLIT_K_MAX_M, the tiled
configs above it (HALF_*_CONFIGS for fp16 and bf16 x, FP32_*_CONFIGS for fp32); the weight is
dequantized inside the GEMM's main loop at every M.
"""
import torch
import triton
import triton.language as tl

from . import _linear
from ._autotune import Configs, autotune
from ._config import dot_meta, interpreting
from ._linear import dot_tile, launch_by_m, store_tile, tile_of_y

# x's dtype -> (the dtype the weight is decoded in, MAGIC, MAGIC's bits): q | bits read as
# that dtype is MAGIC + q for q in [0, 15], since MAGIC = 2^p has a zero mantissa and its
# spacing (its ulp) is 1: p is the dtype's mantissa bits (10, 7, 23).
MAGIC = {torch.float16: (tl.float16, 1024.0, 0x6400), torch.bfloat16: (tl.bfloat16, 128.0, 0x4300),
         torch.float32: (tl.float32, 8388608.0, 0x4B000000)}


@triton.jit
def _decode(q, scale, zero, DEQUANT_DTYPE: tl.constexpr, MAGIC_VALUE: tl.constexpr, MAGIC_BITS: tl.constexpr):
    """(q - zero) * scale in DEQUANT_DTYPE for integer codes q in [0, 15] (see the module
    doc: q | MAGIC_BITS read as a float is MAGIC_VALUE + q)."""
    if DEQUANT_DTYPE.primitive_bitwidth == 16:
        bits = q.to(tl.int16) | MAGIC_BITS
    else:
        bits = q.to(tl.int32) | MAGIC_BITS
    return (bits.to(DEQUANT_DTYPE, bitcast=True) - (zero.to(DEQUANT_DTYPE) + MAGIC_VALUE)) \
        * scale.to(DEQUANT_DTYPE)


@triton.jit
def _group_params(scales_ptr, zeros_ptr, offs_n, mask_n, step, K, stride_sn,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The scales and zero points of columns offs_n at K step ``step``: [BLOCK_N, 1] when the
    step lies in one group (GROUP >= BLOCK_K), else [BLOCK_N, BLOCK_K] with each of the
    step's BLOCK_K / GROUP groups loaded once and broadcast over its GROUP channels."""
    if GROUP >= BLOCK_K:
        group = step * BLOCK_K // GROUP
        scale = tl.load(scales_ptr + offs_n * stride_sn + group, mask=mask_n, other=0)[:, None]
        zero = tl.load(zeros_ptr + offs_n * stride_sn + group, mask=mask_n, other=0)[:, None]
    else:
        PER_STEP: tl.constexpr = BLOCK_K // GROUP
        group = step * PER_STEP + tl.arange(0, PER_STEP)
        offs = offs_n[:, None] * stride_sn + group[None, :]
        mask = mask_n[:, None] & (group * GROUP < K)[None, :]
        scale = tl.load(scales_ptr + offs, mask=mask, other=0)
        zero = tl.load(zeros_ptr + offs, mask=mask, other=0)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, PER_STEP, GROUP)), (BLOCK_N, BLOCK_K))
        zero = tl.reshape(tl.broadcast_to(zero[:, :, None], (BLOCK_N, PER_STEP, GROUP)), (BLOCK_N, BLOCK_K))
    return scale, zero


@triton.jit
def _codes_of_step(packed_ptr, offs_n, mask_n, step, K_WORDS, stride_pn,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The codes q [BLOCK_N, BLOCK_K] of K step ``step`` of rows offs_n, in K order, from
    ``packed`` read as int32 words (K_WORDS a row).

    ``packed`` stores each 64-byte tile interleaved: the byte of K order 4 i + t at 16 t + i
    (sparqle.formats.int4). A step of 64 bytes or more is whole tiles, loaded as stored
    (contiguous: 16-byte loads); each word is split into its eight codes, and a reshape and
    a transpose put them in K order, which Triton folds into the layout it reads shared
    memory with: the thread whose register fragment holds K-order bytes t, t + 4, ... reads
    them as its 16 contiguous stored bytes (128-bit loads; K order took 16 byte loads). A
    step of BLOCK_K 32 or 64 is a part of a tile: each t's bytes in it, a run of BYTES / 4,
    lie from 16 t + (the step's first K-order byte mod 64) / 4 of its tile."""
    BYTES: tl.constexpr = BLOCK_K // 2
    RUN: tl.constexpr = (BYTES if BYTES < 64 else 64) // 4     # stored bytes of each t per tile
    TILES: tl.constexpr = (BYTES + 63) // 64
    WORDS: tl.constexpr = BYTES // 4
    RUN_WORDS: tl.constexpr = RUN // 4
    first = step * WORDS                                        # the step's first word in K order
    if WORDS >= 16:
        offs = first + tl.arange(0, WORDS)
    else:  # word j is word j % RUN_WORDS of the run of t = j // RUN_WORDS
        j = tl.arange(0, WORDS)
        offs = first // 16 * 16 + first % 16 // 4 + 4 * (j // RUN_WORDS) + j % RUN_WORDS
    packed_ptr = packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # read as its int32 words
    words = tl.load(packed_ptr + offs_n[:, None] * stride_pn + offs[None, :],
                    mask=mask_n[:, None] & (offs < K_WORDS)[None, :], other=0).to(tl.uint32, bitcast=True)
    # Byte b of a word (little-endian) holds codes lo = bits 8 b .. 8 b + 3 and hi = 8 b + 4 ..
    # 8 b + 7; join(join(c0, c2), join(c1, c3)) reshaped is c0 c1 c2 c3, and the last join
    # puts hi after lo: codes in stored-byte order, then the two halves of each byte.
    lo = tl.join(tl.join(words & 15, (words >> 16) & 15), tl.join((words >> 8) & 15, (words >> 24) & 15))
    hi = tl.join(tl.join((words >> 4) & 15, (words >> 20) & 15), tl.join((words >> 12) & 15, words >> 28))
    codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, TILES, 4, RUN, 2))
    return tl.reshape(tl.permute(codes, (0, 1, 3, 2, 4)), (BLOCK_N, BLOCK_K))


@triton.jit
def _int4_linear_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr,
    # sizes (K_WORDS: the int32 words of a packed row, 16 ceil(K / 128))
    # (packed_ptr: uint8, read as int32 words; stride_pn: in words)
    M, N, K, K_WORDS,
    # strides
    stride_xm, stride_xk,
    stride_pn, stride_sn,
    stride_ym, stride_yn,
    stride_bias,
    # meta-parameters (GROUP: the input channels of a quantization group, a power of 2;
    # GROUP_PER_ROW: one group per row, GROUP unused)
    GROUP: tl.constexpr, GROUP_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    DEQUANT_DTYPE: tl.constexpr, MAGIC_VALUE: tl.constexpr, MAGIC_BITS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, split = tile_of_y(M, N, BLOCK_M, BLOCK_N)
    steps_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    if GROUP_PER_ROW:  # (K = 0: no group, nothing to read)
        scale = tl.load(scales_ptr + offs_n * stride_sn, mask=mask_n & (K > 0), other=0)[:, None]
        zero = tl.load(zeros_ptr + offs_n * stride_sn, mask=mask_n & (K > 0), other=0)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC_DTYPE)
    for step in range(split * steps_per_split, tl.minimum(tl.cdiv(K, BLOCK_K), (split + 1) * steps_per_split)):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0)
        q = _codes_of_step(packed_ptr, offs_n, mask_n, step, K_WORDS, stride_pn, BLOCK_N, BLOCK_K)
        if not GROUP_PER_ROW:
            scale, zero = _group_params(scales_ptr, zeros_ptr, offs_n, mask_n, step, K, stride_sn,
                                        GROUP, BLOCK_N, BLOCK_K)
        w = _decode(q, scale, zero, DEQUANT_DTYPE, MAGIC_VALUE, MAGIC_BITS)
        acc = dot_tile(w, x, acc, ACC_DTYPE, PRECISION, UPCAST)
    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, split, stride_ym, stride_yn,
               stride_bias, HAS_BIAS, ACC_DTYPE, SPLIT_K)


# fp32 x: without TF32, Triton computes an fp32 tl.dot with FMAs in registers, and every
# config of the shared spaces spills on sm_90 (hundreds to tens of thousands of bytes per
# thread: the kernel report run over fp32); these, with BLOCK_K = 32, compile without spills.
FP32_SMALL_M_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4, num_stages=3)
     for bn, bk, sk in [(32, 32, 1), (64, 32, 1), (32, 64, 1), (128, 32, 1), (32, 32, 4), (64, 32, 2)]],
    _linear.SMALL_M_CONFIGS.test,
)
FP32_TILED_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "SPLIT_K": 1}, num_warps=w, num_stages=3)
     for bm, bn, w in [(32, 32, 4), (32, 64, 4), (64, 32, 4), (64, 64, 8)]],
    _linear.TILED_CONFIGS.test,
)
# fp16 / bf16 x: BLOCK_K >= 128, so that each K step is whole 64-byte tiles of ``packed``,
# read with 16-byte loads (``_codes_of_step``; a half tile takes 8-byte runs, 4-byte loads).
HALF_TILED_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": 1}, num_warps=w, num_stages=s)
     for bm, bn, w, s in [(32, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)]],
    _linear.TILED_CONFIGS.test,
)
HALF_SMALL_M_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
     for bn, bk, sk, w, s in [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (128, 128, 1, 4, 4), (32, 128, 2, 4, 4),
                              (64, 128, 2, 4, 4), (32, 128, 4, 4, 4), (64, 256, 4, 8, 3), (32, 256, 8, 4, 4)]],
    _linear.SMALL_M_CONFIGS.test,
)
_tiled = autotune(HALF_TILED_CONFIGS, key=["M", "N", "K"], bucket=["M"])(_int4_linear_kernel)
_small_m = autotune(HALF_SMALL_M_CONFIGS, key=["M", "N", "K"], bucket=["M"],
                    reset_to_zero=["y_ptr"])(_int4_linear_kernel)
_tiled_fp32 = autotune(FP32_TILED_CONFIGS, key=["M", "N", "K"], bucket=["M"])(_int4_linear_kernel)
_small_m_fp32 = autotune(FP32_SMALL_M_CONFIGS, key=["M", "N", "K"], bucket=["M"],
                         reset_to_zero=["y_ptr"])(_int4_linear_kernel)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bias, group_width: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(W)^T (+ bias [N]) for an int4 W [N, K]."""
    m, k = x.shape
    n = packed.shape[0]
    # The kernel reads bytes and groups along K at unit stride, zeros at scales' strides.
    packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
    per_row = group_width >= k
    dequant_dtype, magic, bits = MAGIC[torch.float32 if x.dtype == torch.bfloat16 and interpreting() else x.dtype]

    if packed.data_ptr() % 4:  # the kernel reads int32 words
        packed = packed.clone()

    def launch(kernel, grid, y):
        kernel[grid](
            x, packed, scales, zeros, y if bias is None else bias, y,
            m, n, k, packed.shape[1] // 4,
            x.stride(0), x.stride(1),
            packed.stride(0) // 4, scales.stride(0),
            y.stride(0), y.stride(1),
            0 if bias is None else bias.stride(0),
            GROUP=1 if per_row else group_width, GROUP_PER_ROW=per_row, HAS_BIAS=bias is not None,
            DEQUANT_DTYPE=dequant_dtype, MAGIC_VALUE=magic, MAGIC_BITS=bits, **dot_meta(x.dtype),
        )

    if x.dtype == torch.float32:
        return launch_by_m(_tiled_fp32, _small_m_fp32, x, n, launch)
    return launch_by_m(_tiled, _small_m, x, n, launch)

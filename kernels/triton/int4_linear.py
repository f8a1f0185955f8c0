"""int4 weight-only linear (W4A16): y [M, N] = x [M, K] @ dequant(W)^T + bias.

W is packed two 4-bit values a byte along K (see sparqle.formats.int4), with a scale and a
zero point per group of GROUP consecutive input channels. One program computes a
[BLOCK_M, BLOCK_N] tile of y over one of SPLIT_K slices of K: for each BLOCK_K step it
loads x, the [BLOCK_N, BLOCK_K / 2] packed bytes (contiguous along K), unpacks the
nibbles, dequantizes them in registers ((q - zero) * scale in fp32, rounded to x's dtype; x in
fp16, bf16 or fp32) and feeds ``tl.dot`` with fp32 accumulation; the bias is added in the epilogue.

Dispatch by M (thresholds and their reasons: sparqle.kernels.dispatch): below
INT4_DEQUANTIZE_FROM_M the split-K small-M and tiled launches of ``_linear.launch_by_m``;
from it on, compute-bound, dequantize once and let cuBLAS multiply.
"""
import torch
import triton
import triton.language as tl

from sparqle.formats.int4 import dequantize

from ..dispatch import INT4_DEQUANTIZE_FROM_M
from ._autotune import autotune
from ._config import dot_meta
from ._linear import SMALL_M_CONFIGS, TILED_CONFIGS, dot_tile, launch_by_m, store_tile


@triton.jit
def _int4_linear_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr,
    # sizes (GROUP: the input channels of one quantization group)
    M, N, K, GROUP,
    # strides
    stride_xm, stride_xk,
    stride_pn, stride_sn,
    stride_ym, stride_yn,
    stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    split = tl.program_id(2)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(split * k_per_split, tl.minimum(K, (split + 1) * k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # int32 for the group division below
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(packed_ptr + offs_n[:, None] * stride_pn + offs_byte[None, :],
                         mask=mask_n[:, None] & (offs_byte < (K + 1) // 2)[None, :], other=0)
        packed = packed.to(tl.int32)
        q = tl.reshape(tl.join(packed & 15, (packed >> 4) & 15), (BLOCK_N, BLOCK_K))
        group = offs_k // GROUP
        mask_w = mask_n[:, None] & mask_k[None, :]
        scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + group[None, :], mask=mask_w, other=0)
        zero = tl.load(zeros_ptr + offs_n[:, None] * stride_sn + group[None, :], mask=mask_w, other=0)
        w = ((q.to(ACC_DTYPE) - zero.to(ACC_DTYPE)) * scale.to(ACC_DTYPE)).to(x.dtype)
        acc = dot_tile(x, w, acc, ACC_DTYPE, PRECISION, UPCAST)
    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, split, stride_ym, stride_yn,
               stride_bias, HAS_BIAS, ACC_DTYPE, SPLIT_K)


_tiled = autotune(TILED_CONFIGS, key=["M", "N", "K"], bucket=["M"])(_int4_linear_kernel)
_small_m = autotune(SMALL_M_CONFIGS, key=["M", "N", "K"], bucket=["M"],
                           reset_to_zero=["y_ptr"])(_int4_linear_kernel)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bias, group_width: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(W)^T (+ bias [N]) for an int4 W [N, K]."""
    m, k = x.shape
    n = packed.shape[0]
    # The kernel reads bytes and groups along K at unit stride, zeros at scales' strides.
    packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
    if m >= INT4_DEQUANTIZE_FROM_M:
        w = dequantize(packed, scales, zeros, group_width, k).to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)

    def launch(kernel, grid, y):
        kernel[grid](
            x, packed, scales, zeros, y if bias is None else bias, y,
            m, n, k, group_width,
            x.stride(0), x.stride(1),
            packed.stride(0), scales.stride(0),
            y.stride(0), y.stride(1),
            0 if bias is None else bias.stride(0),
            HAS_BIAS=bias is not None, **dot_meta(x.dtype),
        )

    return launch_by_m(_tiled, _small_m, x, n, launch)

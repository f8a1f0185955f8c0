"""N:M semi-structured sparse linear: y [M, N] = x [M, K] @ W^T + bias, W [N, K] in N:M
(see sparqle.kernels.torch.nm_linear for the layout of ``values`` and ``meta``).

One program computes a [BLOCK_M, BLOCK_N] tile of y over one of SPLIT_K slices of K. For
each BLOCK_K step it loads x, the [BLOCK_N, BLOCK_K * N / M] compressed values and their
packed positions, expands them in registers into the dense [BLOCK_N, BLOCK_K] tile (each
position selects one of the M slots of its group) and feeds ``tl.dot`` with fp32
accumulation; the bias is added in the epilogue. The weight is read at N/M of its dense
bytes plus BITS / 16 bits per dense fp16 weight of metadata (0.5625x dense for 2:4).

Dispatch by M (thresholds not yet measured on a GPU): below DENSE_FROM_M the split-K
small-M and tiled launches of ``_linear.launch_by_m``, where reading 0.5625x of the dense
bytes is the speed-up at small M; from it on, compute-bound, where N:M saves no math on
dense tensor cores: expand W once and let cuBLAS multiply. Sparse tensor cores
(cuSPARSELt, or the cupy backend's mma.sp kernel, which runs when forced) are the way to
a 2x there; auto routes to them once they are measured faster.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..torch.nm_linear import index_bits, to_dense
from ._config import dot_meta
from ._linear import SMALL_M_CONFIGS, TILED_CONFIGS, launch_by_m

DENSE_FROM_M = 1024


@triton.jit
def _nm_linear_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_vn, stride_metan,
    stride_ym, stride_yn,
    KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    mask_m, mask_n = offs_m < M, offs_n < N
    kc_total = tl.cdiv(K, GROUP) * KEEP
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(split * k_per_split, tl.minimum(K, (split + 1) * k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0)
        # Load the compressed tile and its positions contiguously, then expand in
        # registers: dense column k of group k // GROUP takes the kept value j whose
        # position is k % GROUP, else 0.
        offs_kc = k0 // GROUP * KEEP + tl.arange(0, BLOCK_K // GROUP * KEEP)
        mask_w = mask_n[:, None] & (offs_kc < kc_total)[None, :]
        v = tl.load(values_ptr + offs_n[:, None] * stride_vn + offs_kc[None, :], mask=mask_w, other=0)
        word = tl.load(meta_ptr + offs_n[:, None] * stride_metan + (offs_kc // PER_WORD)[None, :],
                       mask=mask_w, other=0)
        pos = (word >> ((offs_kc % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
        w = tl.zeros([BLOCK_N, BLOCK_K], dtype=x.dtype)
        slot = tl.arange(0, BLOCK_K) % GROUP
        for j in tl.static_range(KEEP):
            source = tl.broadcast_to((tl.arange(0, BLOCK_K) // GROUP * KEEP + j)[None, :], (BLOCK_N, BLOCK_K))
            w = tl.where(tl.gather(pos, source, axis=1) == slot[None, :],
                         tl.gather(v, source, axis=1).to(x.dtype), w)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n & (split == 0), other=0)
        acc += bias.to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask_y = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:  # y is a zeroed fp32 workspace
        tl.atomic_add(y_ptrs, acc, mask=mask_y)


_tiled = triton.autotune(configs=TILED_CONFIGS, key=["M", "N", "K", "KEEP", "GROUP"])(_nm_linear_kernel)
_small_m = triton.autotune(configs=SMALL_M_CONFIGS, key=["M", "N", "K", "KEEP", "GROUP"],
                           reset_to_zero=["y_ptr"])(_nm_linear_kernel)


def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              bias: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T (+ bias [N]) for W [N, K] in n:m."""
    rows, k = x.shape
    out = values.shape[0]
    if rows >= DENSE_FROM_M:
        return torch.nn.functional.linear(x, to_dense(values, meta, n, m, k).to(x.dtype), bias)

    def launch(kernel, grid, y):
        kernel[grid](
            x, values, meta, y if bias is None else bias, y,
            rows, out, k,
            x.stride(0), x.stride(1),
            values.stride(0), meta.stride(0),
            y.stride(0), y.stride(1),
            KEEP=n, GROUP=m, BITS=index_bits(m), HAS_BIAS=bias is not None, **dot_meta(x.dtype),
        )

    return launch_by_m(_tiled, _small_m, x, out, launch)

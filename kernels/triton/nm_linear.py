"""N:M semi-structured sparse linear: y [M, N] = x [M, K] @ W^T + bias, W [N, K] in N:M
(see sparqle.formats.nm for the layout of ``values`` and ``meta``).

One program computes a [BLOCK_M, BLOCK_N] tile of y over one of SPLIT_K slices of K. For
each BLOCK_K step it loads x, the [BLOCK_N, BLOCK_K * N / M] compressed values and their
packed positions, expands them in registers into the dense [BLOCK_N, BLOCK_K] tile (each
position selects one of the M slots of its group) and feeds ``tl.dot`` with fp32
accumulation; the bias is added in the epilogue. The weight is read at N/M of its dense
bytes plus BITS / 16 bits per dense fp16 weight of metadata (0.5625x dense for 2:4).

``to_dense`` expands W with the same register expansion, writing each dense element
once, and ``expanded_linear`` multiplies the expanded W with cuBLAS.

Launched through ``_linear.launch_by_m``: the split-K small-M path for M <= 16, where
reading 0.5625x of the dense bytes is the speed-up, and the tiled path above it. At large
M, where N:M saves no math on dense tensor cores, expanding W for cuBLAS or cuSPARSELt's
sparse tensor cores may be faster: the binding measures which (bindings/nm_linear.py).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from sparqle.formats.nm import index_bits

from .. import _alloc
from ._autotune import Configs, autotune
from ._config import dot_meta, on_device_of
from ._linear import SMALL_M_CONFIGS, TILED_CONFIGS, dot_tile, launch_by_m, store_tile, tile_of_y

# to_dense is bound by memory: tiles of 2K to 8K dense elements.
TO_DENSE_CONFIGS = Configs(
    [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4) for bn, bk in [(16, 128), (32, 128), (32, 256)]],
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}),
)


@triton.jit
def _expanded_tile(values_ptr, meta_ptr,  # pointers
                   offs_n, mask_n, k0, KC,  # W's rows (int64) and their mask, K offset, Kc
                   stride_vn, stride_vk, stride_metan, stride_metak,  # strides
                   PATTERN_N: tl.constexpr, PATTERN_M: tl.constexpr, BITS: tl.constexpr,  # meta-parameters
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense columns [k0, k0 + BLOCK_K) of W's rows offs_n (int64), in values' dtype (zero outside
    W); k0 a multiple of BLOCK_K. The compressed tile [BLOCK_N, BLOCK_KC] and its position words
    are loaded contiguously (KC, the compressed width, is an argument rather than computed, so
    that Triton sees its divisibility by 16 and loads 16 bytes at a time), then expanded in
    registers: dense column k of group k // PATTERN_M takes the kept value j whose position is
    k % PATTERN_M, else 0."""
    PER_WORD: tl.constexpr = 32 // BITS
    BLOCK_KC: tl.constexpr = BLOCK_K // PATTERN_M * PATTERN_N
    kc0 = k0 // PATTERN_M * PATTERN_N
    offs_kc = kc0 + tl.arange(0, BLOCK_KC)
    mask_w = mask_n[:, None] & (offs_kc < KC)[None, :]
    v = tl.load(values_ptr + offs_n[:, None] * stride_vn + offs_kc[None, :].to(tl.int64) * stride_vk,
                mask=mask_w, other=0)
    if BLOCK_KC % PER_WORD == 0:
        # The tile's BLOCK_KC / PER_WORD whole words, each unpacked into PER_WORD positions.
        offs_word = kc0 // PER_WORD + tl.arange(0, BLOCK_KC // PER_WORD)
        word = tl.load(meta_ptr + offs_n[:, None] * stride_metan + offs_word[None, :].to(tl.int64) * stride_metak,
                       mask=mask_n[:, None] & (offs_word < tl.cdiv(KC, PER_WORD))[None, :], other=0)
        shifts = tl.arange(0, PER_WORD) * BITS
        pos = tl.reshape((word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BLOCK_N, BLOCK_KC))
    else:  # a tile narrower than a word (small BLOCK_K, sparse patterns): each position's word
        word = tl.load(meta_ptr + offs_n[:, None] * stride_metan
                       + (offs_kc // PER_WORD)[None, :].to(tl.int64) * stride_metak,
                       mask=mask_w, other=0)
        pos = (word >> ((offs_kc % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
    # Slot s of group g takes the bits of the kept value whose position is s, else 0: a
    # compare over [BLOCK_N, groups, PATTERN_N, PATTERN_M] and an XOR over the group's kept
    # values (at most one matches a slot: positions increase strictly in a group), so the
    # bits pass through unchanged (-0 and NaN included); no gather across the tile.
    GROUPS: tl.constexpr = BLOCK_K // PATTERN_M
    if v.dtype.primitive_bitwidth == 16:
        bits = v.to(tl.int16, bitcast=True)
    elif v.dtype.primitive_bitwidth == 32:
        bits = v.to(tl.int32, bitcast=True)
    else:
        bits = v.to(tl.int64, bitcast=True)
    bits = tl.reshape(bits, (BLOCK_N, GROUPS, PATTERN_N, 1))
    pos = tl.reshape(pos, (BLOCK_N, GROUPS, PATTERN_N, 1))
    slot = tl.arange(0, PATTERN_M)[None, None, None, :]
    w = tl.xor_sum(tl.where(pos == slot, bits, 0), axis=2)
    return tl.reshape(w, (BLOCK_N, BLOCK_K)).to(v.dtype, bitcast=True)


@triton.jit
def _nm_linear_kernel(
    # pointers
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    # sizes (KC: values' columns, ceil(K / PATTERN_M) * PATTERN_N)
    M, N, K, KC,
    # strides
    stride_xm, stride_xk,
    stride_vn, stride_vk,
    stride_metan, stride_metak,
    stride_ym, stride_yn,
    stride_bias,
    # meta-parameters: the pattern (PATTERN_N kept in every PATTERN_M), BITS per position
    PATTERN_N: tl.constexpr, PATTERN_M: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    offs_m, offs_n, mask_m, mask_n, split = tile_of_y(M, N, BLOCK_M, BLOCK_N)
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC_DTYPE)
    for k0 in range(split * k_per_split, tl.minimum(K, (split + 1) * k_per_split), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0)
        w = _expanded_tile(values_ptr, meta_ptr, offs_n, mask_n, k0, KC, stride_vn, stride_vk,
                           stride_metan, stride_metak,
                           PATTERN_N, PATTERN_M, BITS, BLOCK_N, BLOCK_K).to(x.dtype)
        acc = dot_tile(w, x, acc, ACC_DTYPE, PRECISION, UPCAST)
    store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, split, stride_ym, stride_yn,
               stride_bias, HAS_BIAS, ACC_DTYPE, SPLIT_K)


_KEY = ["M", "N", "K", "PATTERN_N", "PATTERN_M"]
_tiled = autotune(TILED_CONFIGS, key=_KEY, bucket=["M"])(_nm_linear_kernel)
_small_m = autotune(SMALL_M_CONFIGS, key=_KEY, bucket=["M"], reset_to_zero=["y_ptr"])(_nm_linear_kernel)


@triton.jit
def _to_dense_kernel(
    # pointers
    values_ptr, meta_ptr, dense_ptr,
    # sizes (KC: values' columns)
    N, K, KC,
    # strides
    stride_vn, stride_vk,
    stride_metan, stride_metak,
    stride_dn, stride_dk,
    # meta-parameters
    PATTERN_N: tl.constexpr, PATTERN_M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w = _expanded_tile(values_ptr, meta_ptr, offs_n, mask_n, k0, KC,
                       stride_vn, stride_vk, stride_metan, stride_metak,
                       PATTERN_N, PATTERN_M, BITS, BLOCK_N, BLOCK_K)
    tl.store(dense_ptr + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk, w,
             mask=mask_n[:, None] & (offs_k < K)[None, :])


_to_dense = autotune(TO_DENSE_CONFIGS, key=["N", "K", "PATTERN_N", "PATTERN_M"])(_to_dense_kernel)


def to_dense(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    """W [N, k] (contiguous, values' dtype) from the compressed form, every element written
    once: it reads the compressed bytes and writes the dense ones, nothing more."""
    out = values.shape[0]
    dense = _alloc.empty((out, k), values.dtype, values.device)
    if out == 0 or k == 0:
        return dense
    grid = lambda config: (triton.cdiv(out, config["BLOCK_N"]), triton.cdiv(k, config["BLOCK_K"]))  # noqa: E731
    with on_device_of(values):
        _to_dense[grid](
            values, meta, dense, out, k, values.shape[1],
            values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
            dense.stride(0), dense.stride(1),
            PATTERN_N=n, PATTERN_M=m, BITS=index_bits(m),
        )
    return dense


def expanded_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T (+ bias [N]) in x's dtype: W expanded by ``to_dense``, then
    one ``F.linear`` (cuBLAS on a GPU), the dense layer's own arithmetic."""
    return torch.nn.functional.linear(x, to_dense(values, meta, n, m, x.shape[1]), bias)


def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              bias: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T (+ bias [N]) for W [N, K] in n:m."""
    rows, k = x.shape
    out = values.shape[0]

    def launch(kernel, grid, y):
        kernel[grid](
            x, values, meta, y if bias is None else bias, y,
            rows, out, k, values.shape[1],
            x.stride(0), x.stride(1),
            values.stride(0), values.stride(1),
            meta.stride(0), meta.stride(1),
            y.stride(0), y.stride(1),
            0 if bias is None else bias.stride(0),
            PATTERN_N=n, PATTERN_M=m, BITS=index_bits(m), HAS_BIAS=bias is not None, **dot_meta(x.dtype),
        )

    return launch_by_m(_tiled, _small_m, x, out, launch)

"""Pieces shared by the per-row quantizers (int8, FP8): their autotune configs, the
per-row max |x|, and the fp32 magic number of round-half-to-even."""
import triton
import triton.language as tl

from ._autotune import Configs

ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: v + magic - magic rounds |v| < 2**22 half to even

QUANT_CONFIGS = Configs(
    [triton.Config({"BLOCK_K": bk}, num_warps=w) for bk, w in [(1024, 4), (2048, 8), (4096, 8)]],
    triton.Config({"BLOCK_K": 32}),
)


@triton.jit
def row_absmax(x_ptr, row, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """max |x[row, k]| over k < K, in fp32 (0 for K = 0); ``row`` int64."""
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(x_ptr + row * stride_xm + offs * stride_xk, mask=offs < K, other=0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    return tl.max(amax, axis=0)

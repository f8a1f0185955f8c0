"""The launch shared by the weight-streaming linear kernels (int4, N:M): y [M, N] = x [M, K]
@ W^T for a W the kernel decodes tile by tile, dispatched by M.

- M <= SPLIT_K_MAX_M (16, with its reason in sparqle.kernels.dispatch): weight-bound.
  BLOCK_M = 16 covers every row, so the weight is streamed once; SPLIT_K > 1 spreads K
  over more programs, each adding its fp32 partial tile atomically into a zeroed workspace
  (then cast to x's dtype); a config with SPLIT_K == 1 writes y directly, one launch in all.
- M > SPLIT_K_MAX_M: the tiled configs, one pass over K per tile, y written in x's dtype.

A kernel launched here takes the grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K),
accumulates each decoded tile with ``dot_tile`` into a [BLOCK_N, BLOCK_M] tile of y^T (the
weight is the dot's left operand, see there) and ends with ``store_tile``, which stores
with ``tl.store`` when SPLIT_K == 1 and ``tl.atomic_add`` otherwise.
"""
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from .. import _alloc, _capture
from ..dispatch import SPLIT_K_MAX_M
from ._autotune import Configs
from ._config import on_device_of

TILED_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in [(32, 64, 128, 4, 2), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                              (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1}),
)
SMALL_M_CONFIGS = Configs(
    [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
     for bn, bk, sk, w, s in [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (128, 64, 1, 4, 4), (32, 128, 2, 4, 4),
                              (64, 128, 2, 4, 4), (32, 128, 4, 4, 4), (64, 256, 4, 8, 3), (32, 256, 8, 8, 4)]],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}),
)


@triton.jit
def tile_of_y(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's tile of y: its rows offs_m and columns offs_n (int64), their masks, and
    its slice of K (program axis 2, 0 without split-K)."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return offs_m, offs_n, offs_m < M, offs_n < N, tl.program_id(2)


@triton.jit
def dot_tile(w, x, acc, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] + w [BLOCK_N, BLOCK_K] @ x [BLOCK_M, BLOCK_K]^T: the tile of y^T,
    both operands upcast to fp32 first when UPCAST (see _config.dot_meta).

    The decoded weight is the left operand because wgmma (sm_90) takes its left operand from
    registers and its right one from shared memory: w goes from the decoding straight into
    the MMA and x stays in the shared buffer the pipeline loaded it into, so Triton leaves
    the wgmmas in flight while the next step loads and decodes. With w on the right (y = x
    w^T) the decoded tile was stored to shared memory every step and each wgmma waited for
    at once. The token count is wgmma's N (8 to 256), so 16 tokens run on wgmma as well
    (its M, 64 per warpgroup, is BLOCK_N). tests/test_triton_compile.py checks both in the
    sm_90 compiler's output."""
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(w, tl.trans(x), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, split, stride_ym, stride_yn,
               stride_bias, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[offs_m, offs_n] = acc^T + bias for acc [BLOCK_N, BLOCK_M] (``dot_tile``'s tile of y^T;
    bias read at ``stride_bias``, 0 for an expanded bias; added by split 0 only): stored in
    y's dtype when SPLIT_K == 1, else added atomically into y, a zeroed fp32 workspace.
    offs_m and offs_n are int64, so that offs_m * stride_ym passes 2^31 without wrapping."""
    acc = tl.trans(acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n & (split == 0), other=0)
        acc += bias.to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask_y = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask_y)


class _Workspace(NamedTuple):
    """Stands in for the fp32 workspace [rows, out_features] when only its dtype and strides
    are read (the tuning key)."""
    rows: int
    out_features: int
    dtype: torch.dtype = torch.float32

    def stride(self, dim: int) -> int:
        return (self.out_features, 1)[dim]


class _Recorded:
    """Stands in for a kernel: ``[grid](*args, **kwargs)`` keeps the arguments, launches nothing."""

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.args, self.kwargs = args, kwargs
        return record


def _small_m_config(small_m, launch, grid, rows: int, out_features: int):
    """The config ``small_m`` runs for this call without tuning (None: untuned), asked with
    the arguments ``launch`` passes for the fp32 workspace."""
    recorded = _Recorded()
    launch(recorded, grid, _Workspace(rows, out_features))
    return small_m.known_config(*recorded.args, **recorded.kwargs)


def launch_by_m(tiled, small_m, x: torch.Tensor, out_features: int,
                launch: Callable[[object, Callable, torch.Tensor], None]) -> torch.Tensor:
    """y [M, out_features] in x's dtype: ``launch(kernel, grid, y)`` runs ``tiled`` for
    M > SPLIT_K_MAX_M, else ``small_m``: one launch straight into y when the config it runs
    has SPLIT_K == 1; into a zeroed fp32 workspace, then cast to x's dtype, when it splits K or
    is not tuned yet. The call that tunes a key whose best config has SPLIT_K == 1 launches
    it once more straight into y (compiling that variant outside any CUDA-graph capture)."""
    rows = x.shape[0]
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(out_features, meta["BLOCK_N"]), meta["SPLIT_K"])
    if rows > SPLIT_K_MAX_M or rows == 0 or out_features == 0:
        y = _alloc.empty((rows, out_features), x.dtype, x.device)
        if y.numel():
            with on_device_of(x):
                launch(tiled, grid, y)
        return y
    with on_device_of(x):
        config = _small_m_config(small_m, launch, grid, rows, out_features)
        if config is None or config.kwargs["SPLIT_K"] > 1:
            workspace = torch.zeros((rows, out_features), dtype=torch.float32, device=x.device)
            launch(small_m, grid, workspace)
            if config is not None or _capture.capturing():
                return workspace.to(x.dtype)
            config = _small_m_config(small_m, launch, grid, rows, out_features)  # just tuned
            if config is None or config.kwargs["SPLIT_K"] > 1:
                return workspace.to(x.dtype)
        y = _alloc.empty((rows, out_features), x.dtype, x.device)
        launch(small_m.pinned(config), grid, y)
    return y

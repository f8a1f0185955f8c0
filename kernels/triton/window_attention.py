"""Swin window attention, fused, and the window layout around it.

window_attention: q, k, v [B_, heads, N, d] (B_ windows of N tokens) ->
    out [B_, heads, N, d] = softmax(S) v and lse [B_, heads, N] (fp32) = logsumexp of S's rows,
    S = q k^T * scale + bias[h] + mask[m(b)], m(b) = b % nW or mask_index[b]. The kernels read
    bias plus mask from one score table [nW or 1, heads or 1, NP, NP] (score_table: fp32,
    rows padded to NP, -inf in the padded keys), which a layer keeps across calls, in 128-bit
    loads. One program per (run of windows, head, block of BLOCK_M query rows) takes its
    windows one after another, each over its keys in blocks of BLOCK_N with an online softmax
    (FlashAttention's: running row max and sum in fp32); d padded to HEAD_DIM. For N <= 64
    (Swin's 7x7 windows) one block of each holds the whole window, and the loads of the next
    window are pipelined.
window_attention_backward: P = exp(S - lse) recomputed block by block from the saved
    logsumexp, dS = P * (dO V^T - rowsum(dO * O)), in two kernels without atomics:
    - one program per (window, head, key block) owns its keys' dV = P^T dO and
      dK = dS^T Q * scale, summed over the query blocks in registers (with runs of windows
      too, as below, it spills at N = 49);
    - one program per (run of windows, head, query block), taking them one after another,
      writes dQ = dS K * scale, summed over the key blocks, and d(bias)[h] = sum over windows of dS: each program sums its run into
      its rows of one fp32 partial [programs, heads, N, N] (in registers when the window is
      one key block, else read and written back block by block), which the launcher reduces
      with torch.sum: deterministic, no atomics contending on the same N x N entries from
      every window, and the runs keep the partial buffer small.
window_partition / window_merge: one index-mapping copy kernel in both directions. Window
    r of image i = r // K is window w = index[r] (or r % K) of the image rolled by
    (-sh, -sw) and zero-padded to multiples of the window; its token t sits at the rolled
    frame's (py, px) = (w // nWw * wh + t // ww, w % nWw * ww + t % ww), which is x's pixel
    ((py + sh) % H, (px + sw) % W) when py < H and px < W, and padding otherwise.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._autotune import Configs, autotune
from ._config import dot_meta, interpreting, on_device_of

ONE_BLOCK_TOKENS = 64  # windows of up to this many tokens are one block of query rows and keys

# num_stages > 1 pipelines the loads of the innermost loop through cp.async: over key blocks
# (the backward's dK/dV kernel: query blocks), or, in the forward and dQ kernels, over
# windows when a window is one block (N <= 64). Every config compiles without spills at N = 49,
# 144 and 256 (bf16, d = 32), forward and backward (python -m sparqle.bench.kernel_report --op
# window_attention); at N = 49 the forward takes 97 (1 stage) and 74 (2 stages) registers since
# it reads one fp32 score table in 128-bit loads (232 and 255 with a 16-bit bias and mask read
# element by element). 4 warps compile without spills at N = 49 too now, but the dQ kernel
# spills with 4 warps and 2 stages at N = 144, as it does with 3 stages.
_ATTENTION_CONFIGS = Configs(
    [triton.Config({}, num_warps=8, num_stages=s) for s in (1, 2)],
    triton.Config({}, num_warps=8, num_stages=1),
)
_COPY_CONFIGS = Configs(
    [triton.Config({"BLOCK_T": t, "BLOCK_C": c}, num_warps=w)
     for t, c, w in [(16, 64, 2), (32, 64, 4), (64, 64, 4), (16, 128, 4), (64, 128, 8)]],
    triton.Config({"BLOCK_T": 64, "BLOCK_C": 32}),
)


@triton.jit
def _tile(offs_r, offs_d, R, D, stride_r, stride_d):
    """(offsets, mask) of the [rows, HEAD_DIM] tile of rows offs_r < R, features offs_d < D.
    Row and feature offsets stay int32 (fewer registers; the caller adds them to a pointer
    already moved by the int64 window and head offset): the launchers pass only strides
    whose products with them fit."""
    return (offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
            (offs_r < R)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _operand(tile, UPCAST: tl.constexpr):
    """A loaded tile as a dot operand: in fp32 with UPCAST (the interpreter's bf16)."""
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _scores(q, k, table_ptr, mask_index_ptr, b, h, offs_m, offs_n, N, NP, T, stride_tw, stride_th, scale,
            HAS_TABLE: tl.constexpr, MASK_INDEX: tl.constexpr, ONE_BLOCK: tl.constexpr,
            PRECISION: tl.constexpr):
    """S [BLOCK_M, BLOCK_N] (fp32) of query rows offs_m and keys offs_n of window b, head h
    (int64): q k^T * scale + table[t(b), h] (bias plus mask, -inf in the padded key columns;
    t(b) = mask_index[b] or b % T), or -inf in the padded key columns without a table. The
    table's rows are NP (a multiple of 16) fp32 long, so that each thread reads 4 of a row
    with one 128-bit load: unmasked when the window is one block (NP = BLOCK_N = BLOCK_M),
    else masked to the first NP keys (whole 16-column groups), -inf beyond."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32) * scale
    if HAS_TABLE:
        if MASK_INDEX:
            t = tl.load(mask_index_ptr + b).to(tl.int64)
        else:
            t = b % T
        window = t * stride_tw + h * stride_th
        if ONE_BLOCK:
            s += tl.load(table_ptr + window + offs_m[:, None] * NP + offs_n[None, :])
        else:  # query rows past the table (padding) read its last row: finite, never stored
            rows = tl.minimum(offs_m, NP - 1)
            s += tl.load(table_ptr + window + rows[:, None] * NP + offs_n[None, :], mask=(offs_n < NP)[None, :],
                         other=float("-inf"))
    else:
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
    return s


@triton.jit
def _probabilities_and_ds(q, k, v, do, lse, delta, table_ptr, mask_index_ptr, b, h, offs_m, offs_n,
                          N, NP, T, stride_tw, stride_th, scale,
                          HAS_TABLE: tl.constexpr, MASK_INDEX: tl.constexpr, ONE_BLOCK: tl.constexpr,
                          PRECISION: tl.constexpr):
    """(P, dS) [BLOCK_M, BLOCK_N] fp32 of one query block and one key block, recomputed from
    the row logsumexp: P = exp(S - lse) (0 in padded rows), dS = P * (dO V^T - delta)."""
    s = _scores(q, k, table_ptr, mask_index_ptr, b, h, offs_m, offs_n, N, NP, T, stride_tw, stride_th, scale,
                HAS_TABLE, MASK_INDEX, ONE_BLOCK, PRECISION)
    p = tl.where((offs_m < N)[:, None], tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=tl.float32)
    return p, p * (dp - delta[:, None])


@triton.jit
def _row_statistics(out_ptr, dout_ptr, lse_ptr, o_base, lse_base, offs_m, offs_d, N, D, stride_on, stride_od,
                    UPCAST: tl.constexpr):
    """(dO tile, lse, delta = rowsum(dO * O) in fp32) of query rows offs_m."""
    offs, in_tile = _tile(offs_m, offs_d, N, D, stride_on, stride_od)
    do = _operand(tl.load(dout_ptr + o_base + offs, mask=in_tile, other=0), UPCAST)
    o = tl.load(out_ptr + o_base + offs, mask=in_tile, other=0)
    lse = tl.load(lse_ptr + lse_base + offs_m, mask=offs_m < N, other=0)
    return do, lse, tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)


@autotune(_ATTENTION_CONFIGS, key=["N", "D", "HAS_TABLE"])
@triton.jit
def _window_attention_fwd_kernel(
    # pointers
    query_ptr, key_ptr, value_ptr, table_ptr, mask_index_ptr, out_ptr, lse_ptr,
    # sizes (NP: the table's padded rows and columns, T: its windows) and the softmax scale
    NWIN, N, D, NP, T, RUN, scale,
    # strides (window, head, token, dim) of q, k, v and out; (window, head) of the table
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_tw, stride_th,
    # meta-parameters
    HAS_TABLE: tl.constexpr, MASK_INDEX: tl.constexpr,
    ONE_BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (r, h, i): query rows [i * BLOCK_M, (i + 1) * BLOCK_M) of windows
    [r * RUN, r * RUN + RUN), head h, one window after another, each over its keys in blocks
    of BLOCK_N with an online softmax (running row max m and sum l in fp32: each block
    rescales the sum and the output accumulator by exp(m_old - m_new)). With ONE_BLOCK
    (N <= BLOCK_M = BLOCK_N) the key loop has one step and the window loop is the innermost:
    its loads of q, k and v are the ones num_stages pipelines."""
    h = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if ONE_BLOCK:  # one step of the key loop, a constant: the window loop is the innermost
        keys = BLOCK_N
    else:
        keys = N
    start = tl.program_id(0).to(tl.int64) * RUN
    for j in range(0, tl.minimum(RUN, NWIN - start)):
        b = start + j
        offs, in_tile = _tile(offs_m, offs_d, N, D, stride_qn, stride_qd)
        q = _operand(tl.load(query_ptr + b * stride_qb + h * stride_qh + offs, mask=in_tile, other=0), UPCAST)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for key0 in range(0, keys, BLOCK_N):
            offs_n = key0 + tl.arange(0, BLOCK_N)
            offs, in_tile = _tile(offs_n, offs_d, N, D, stride_kn, stride_kd)
            k = _operand(tl.load(key_ptr + b * stride_kb + h * stride_kh + offs, mask=in_tile, other=0), UPCAST)
            offs, in_tile = _tile(offs_n, offs_d, N, D, stride_vn, stride_vd)
            v = _operand(tl.load(value_ptr + b * stride_vb + h * stride_vh + offs, mask=in_tile, other=0), UPCAST)
            s = _scores(q, k, table_ptr, mask_index_ptr, b, h, offs_m, offs_n, N, NP, T, stride_tw, stride_th,
                        scale, HAS_TABLE, MASK_INDEX, ONE_BLOCK, PRECISION)
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            # a row whose keys so far are all -inf (a user mask) keeps a finite reference: 0
            reference = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(row_max - reference)
            p = tl.exp(s - reference[:, None])
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION,
                                                  out_dtype=tl.float32)
            row_max = new_max
        offs, in_tile = _tile(offs_m, offs_d, N, D, stride_on, stride_od)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs, (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty),
                 mask=in_tile)
        tl.store(lse_ptr + (b * tl.num_programs(1) + h) * N + offs_m, row_max + tl.log(row_sum), mask=offs_m < N)


@autotune(_ATTENTION_CONFIGS, key=["N", "D", "HAS_TABLE"])
@triton.jit
def _window_attention_bwd_dkdv_kernel(
    # pointers
    query_ptr, key_ptr, value_ptr, table_ptr, mask_index_ptr, out_ptr, lse_ptr,
    dout_ptr, dkey_ptr, dvalue_ptr,
    # sizes (NP: the table's padded rows and columns, T: its windows) and the softmax scale
    N, D, NP, T, scale,
    # strides (window, head, token, dim) of q, k, v and out (dout, dk and dv: out's); (window,
    # head) of the table
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_tw, stride_th,
    # meta-parameters
    HAS_TABLE: tl.constexpr, MASK_INDEX: tl.constexpr,
    ONE_BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (b, h, j): keys [j * BLOCK_N, (j + 1) * BLOCK_N) of window b, head h own their
    dV = P^T dO and dK = dS^T Q * scale, summed over the window's query blocks in registers
    and stored once (no atomics)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs, in_tile = _tile(offs_n, offs_d, N, D, stride_kn, stride_kd)
    k = _operand(tl.load(key_ptr + b * stride_kb + h * stride_kh + offs, mask=in_tile, other=0), UPCAST)
    offs, in_tile = _tile(offs_n, offs_d, N, D, stride_vn, stride_vd)
    v = _operand(tl.load(value_ptr + b * stride_vb + h * stride_vh + offs, mask=in_tile, other=0), UPCAST)
    o_base = b * stride_ob + h * stride_oh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        offs, in_tile = _tile(offs_m, offs_d, N, D, stride_qn, stride_qd)
        q = _operand(tl.load(query_ptr + b * stride_qb + h * stride_qh + offs, mask=in_tile, other=0), UPCAST)
        do, lse, delta = _row_statistics(out_ptr, dout_ptr, lse_ptr, o_base, (b * tl.num_programs(1) + h) * N,
                                         offs_m, offs_d, N, D, stride_on, stride_od, UPCAST)
        p, ds = _probabilities_and_ds(q, k, v, do, lse, delta, table_ptr, mask_index_ptr, b, h, offs_m, offs_n,
                                      N, NP, T, stride_tw, stride_th, scale, HAS_TABLE, MASK_INDEX, ONE_BLOCK,
                                      PRECISION)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION, out_dtype=tl.float32)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION, out_dtype=tl.float32)
    offs_nd = o_base + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od
    mask_nd = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    tl.store(dkey_ptr + offs_nd, (dk * scale).to(dkey_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dvalue_ptr + offs_nd, dv.to(dvalue_ptr.dtype.element_ty), mask=mask_nd)


@autotune(_ATTENTION_CONFIGS, key=["N", "D", "HAS_TABLE", "HAS_BIAS"],
          # over several key blocks, the d(bias) partials are sums read and written in place
          reset_to_zero=["dbias_ptr"])
@triton.jit
def _window_attention_bwd_dq_kernel(
    # pointers
    query_ptr, key_ptr, value_ptr, table_ptr, mask_index_ptr, out_ptr, lse_ptr,
    dout_ptr, dquery_ptr, dbias_ptr,
    # sizes (NP: the table's padded rows and columns, T: its windows) and the softmax scale
    NWIN, N, D, NP, T, RUN, scale,
    # strides (window, head, token, dim) of q, k, v and out (dout and dq: out's); (window,
    # head) of the table
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_tw, stride_th,
    # meta-parameters
    HAS_TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_INDEX: tl.constexpr,
    ONE_BLOCK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (r, h, i): query block i of windows [r * RUN, r * RUN + RUN), head h: dQ =
    dS K * scale over the key blocks, and the run's sum of dS, its rows of the d(bias) partial
    [programs, heads, N, N]: kept in registers with ONE_BLOCK (N <= BLOCK_N), else added
    into the partial (zeroed) block by block, each program reading back only what it wrote."""
    h = tl.program_id(1).to(tl.int64)
    heads = tl.num_programs(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    mask_md = mask_m[:, None] & (offs_d < D)[None, :]
    partial = (tl.program_id(0) * heads + h) * N * N
    dbias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ONE_BLOCK:  # one step of the key loop, a constant: the window loop is the innermost
        keys = BLOCK_N
    else:
        keys = N
    start = tl.program_id(0).to(tl.int64) * RUN
    for j in range(0, tl.minimum(RUN, NWIN - start)):
        b = start + j
        offs, in_tile = _tile(offs_m, offs_d, N, D, stride_qn, stride_qd)
        q = _operand(tl.load(query_ptr + b * stride_qb + h * stride_qh + offs, mask=in_tile, other=0), UPCAST)
        o_base = b * stride_ob + h * stride_oh
        do, lse, delta = _row_statistics(out_ptr, dout_ptr, lse_ptr, o_base, (b * heads + h) * N,
                                         offs_m, offs_d, N, D, stride_on, stride_od, UPCAST)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for key0 in range(0, keys, BLOCK_N):
            offs_n = key0 + tl.arange(0, BLOCK_N)
            offs, in_tile = _tile(offs_n, offs_d, N, D, stride_kn, stride_kd)
            k = _operand(tl.load(key_ptr + b * stride_kb + h * stride_kh + offs, mask=in_tile, other=0), UPCAST)
            offs, in_tile = _tile(offs_n, offs_d, N, D, stride_vn, stride_vd)
            v = _operand(tl.load(value_ptr + b * stride_vb + h * stride_vh + offs, mask=in_tile, other=0), UPCAST)
            p, ds = _probabilities_and_ds(q, k, v, do, lse, delta, table_ptr, mask_index_ptr, b, h, offs_m,
                                          offs_n, N, NP, T, stride_tw, stride_th, scale, HAS_TABLE, MASK_INDEX,
                                          ONE_BLOCK, PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=tl.float32)
            if HAS_BIAS:
                if ONE_BLOCK:
                    dbias += ds
                else:
                    offs_mn = offs_m[:, None] * N + offs_n[None, :]
                    mask_mn = mask_m[:, None] & (offs_n < N)[None, :]
                    tl.store(dbias_ptr + partial + offs_mn, tl.load(dbias_ptr + partial + offs_mn, mask=mask_mn) + ds,
                             mask=mask_mn)
        tl.store(dquery_ptr + o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                 (dq * scale).to(dquery_ptr.dtype.element_ty), mask=mask_md)
        if HAS_BIAS and not ONE_BLOCK:
            tl.debug_barrier()  # the next window's loads of the partial see this window's stores
    if HAS_BIAS:
        if ONE_BLOCK:
            offs_n = tl.arange(0, BLOCK_N)
            tl.store(dbias_ptr + partial + offs_m[:, None] * N + offs_n[None, :], dbias,
                     mask=mask_m[:, None] & (offs_n < N)[None, :])


@autotune(_COPY_CONFIGS, key=["N", "C", "HAS_INDEX", "MERGE"])
@triton.jit
def _window_copy_kernel(
    # pointers
    x_ptr, windows_ptr, index_ptr,
    # sizes: the image, the windows, the window shape and shift
    H, W, C, N, K, NWW, WH, WW, SH, SW,
    # strides of x [B, H, W, C] and windows [B * K, N, C]
    stride_xb, stride_xh, stride_xw, stride_xc,
    stride_wr, stride_wn, stride_wc,
    # meta-parameters
    HAS_INDEX: tl.constexpr, MERGE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partition (x -> windows, padding written as 0) or, with MERGE, the inverse scatter of
    the windows' real tokens into x."""
    r = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # int32 for the divisions by WW
    offs_c = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    image = r // K
    if HAS_INDEX:
        w = tl.load(index_ptr + r).to(tl.int64)
    else:
        w = r % K
    py = (w // NWW) * WH + offs_t // WW
    px = (w % NWW) * WW + offs_t % WW
    in_window = offs_t < N
    real = in_window & (py < H) & (px < W)
    mask_c = (offs_c < C)[None, :]
    pixel = image * stride_xb + ((py + SH) % H) * stride_xh + ((px + SW) % W) * stride_xw
    x_offs = pixel[:, None] + offs_c[None, :] * stride_xc
    w_offs = r * stride_wr + offs_t[:, None].to(tl.int64) * stride_wn + offs_c[None, :] * stride_wc
    if MERGE:
        vals = tl.load(windows_ptr + w_offs, mask=real[:, None] & mask_c)
        tl.store(x_ptr + x_offs, vals.to(x_ptr.dtype.element_ty), mask=real[:, None] & mask_c)
    else:
        vals = tl.load(x_ptr + x_offs, mask=real[:, None] & mask_c, other=0)
        tl.store(windows_ptr + w_offs, vals.to(windows_ptr.dtype.element_ty),
                 mask=in_window[:, None] & mask_c)


def _blocks(n: int, d: int, dtype: torch.dtype) -> dict:
    """The tiles: d padded to HEAD_DIM; a window of up to 64 tokens is one block of
    BLOCK_M = BLOCK_N query and key rows (N padded to a power of two >= 16); a larger one is
    cut into blocks of 64 query rows and 64 keys (32 and 32 when fp32 operands have d > 64,
    so that the pipelined tiles fit the 163 KB of shared memory a block has on sm_80)."""
    head_dim = max(16, triton.next_power_of_2(d))
    if n <= ONE_BLOCK_TOKENS:
        rows = keys = table_size(n)
    else:
        rows = keys = 32 if dtype == torch.float32 and head_dim > 64 else 64
    return {"BLOCK_M": rows, "BLOCK_N": keys, "HEAD_DIM": head_dim}


def table_size(n: int) -> int:
    """NP, the rows and columns of the score table for windows of n tokens: the block (a power
    of two >= 16) when the window is one block, so that its loads need no mask; else n
    rounded up to a multiple of 16, so that the masked loads stay 128-bit (the mask is
    constant over each 16 columns, and Triton marks NP divisible by 16)."""
    return max(16, triton.next_power_of_2(n)) if n <= ONE_BLOCK_TOKENS else triton.cdiv(n, 16) * 16


def score_table(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """table [T, H, NP, NP] in ``dtype``: bias [heads, N, N] plus mask [nW, N, N] (T = nW or 1
    without a mask, H = heads or 1 without a bias), NP = table_size(N), -inf in the padded
    key columns and 0 in the padded query rows' real columns. Summed in fp32 (fp64 for
    fp64), as the score it is added to: Swin's -100 mask plus any bias stays exact, and its
    4 bytes per entry are what a 16-bit bias and a 16-bit mask took before."""
    src = bias if bias is not None else mask
    n = src.shape[-1]
    size = table_size(n)
    table = torch.zeros((mask.shape[0] if mask is not None else 1, bias.shape[0] if bias is not None else 1,
                         size, size), dtype=dtype, device=src.device)
    table[..., n:] = float("-inf")
    body = table[:, :, :n, :n]
    if bias is not None:
        body += bias.to(dtype)
    if mask is not None:
        body += mask.to(dtype)[:, None]
    return table


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _int32_tiles(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B_, heads, N, d], copied contiguous when a token or feature offset (< 256)
    times its stride could pass 2^31: the kernels keep those offsets int32 and only the
    window and head offsets int64."""
    reach = max(t.shape[2], t.shape[3]) * max(abs(t.stride(2)), abs(t.stride(3)))
    return t if reach < 2 ** 31 else t.contiguous()


def _contiguous(*tensors):
    """The tensors (None kept) at unit strides, as the kernels index mask_index, index, lse,
    the score table, and dO and O (whose strides dQ, dK and dV share)."""
    return [None if t is None else t.contiguous() for t in tensors]


def _table_arguments(q, bias, mask, table):
    """(table or q, NP, T, stride of its windows and heads) as the kernels take them: the
    caller's table (the one a layer keeps, see score_table) or one made from bias and mask;
    q, a pointer never read, without either. A table of one head is read by every head."""
    if table is None and (bias is not None or mask is not None):
        table = score_table(bias, mask)
    if table is None:
        return q, 16, 1, 0, 0
    (table,) = _contiguous(table)
    return table, table.shape[2], table.shape[0], table.stride(0), table.stride(1) if table.shape[1] > 1 else 0


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor], mask_index: Optional[torch.Tensor],
                     scale: float, table: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B_, heads, N, d], lse [B_, heads, N] fp32); q, k, v read through their strides.
    The kernel adds the score table (``table``, fp32, when given: score_table(bias, mask);
    else made from bias [heads, N, N] and mask [nW, N, N]); mask_index made contiguous."""
    nb, heads, n, d = q.shape
    q, k, v = _int32_tiles(q), _int32_tiles(k), _int32_tiles(v)
    (mask_index,) = _contiguous(mask_index)
    out = _alloc.empty((nb, heads, n, d), q.dtype, q.device)
    lse = _alloc.empty((nb, heads, n), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    table, size, windows, stride_tw, stride_th = _table_arguments(q, bias, mask, table)
    meta, blocks = dot_meta(q.dtype), _blocks(n, d, q.dtype)
    query_blocks = triton.cdiv(n, blocks["BLOCK_M"])
    run = _run_length(nb, heads, query_blocks)
    with on_device_of(q):
        _window_attention_fwd_kernel[(triton.cdiv(nb, run), heads, query_blocks)](
            q, k, v, table, q if mask_index is None else mask_index, out, lse,
            nb, n, d, size, windows, run, scale, *_strides(q, k, v, out), stride_tw, stride_th,
            HAS_TABLE=table is not q, MASK_INDEX=mask_index is not None,
            ONE_BLOCK=n <= ONE_BLOCK_TOKENS, PRECISION=meta["PRECISION"], UPCAST=meta["UPCAST"], **blocks)
    return out, lse


def _run_length(windows: int, heads: int, query_blocks: int) -> int:
    """Windows per program of the forward and dQ kernels: about 1024 programs (8 per SM of an
    H100), and as few d(bias) partials; in the interpreter, which runs programs one after
    another, 3."""
    return 3 if interpreting() else max(1, min(16, windows * heads * query_blocks // 1024))


def window_attention_backward(dout, q, k, v, out, lse, bias, mask, mask_index, scale, table=None):
    """(dq, dk, dv, dbias) for window_attention (dbias empty [0] without a bias); q, k, v
    read through their strides, the other tensors made contiguous. Two kernels, each
    recomputing P: one per key block for dK and dV, one per query block for dQ and d(bias)."""
    nb, heads, n, d = q.shape
    q, k, v = _int32_tiles(q), _int32_tiles(k), _int32_tiles(v)
    dout, out, lse, mask_index = _contiguous(dout, out, lse, mask_index)
    meta, blocks = dot_meta(q.dtype), _blocks(n, d, q.dtype)
    dq, dk, dv = (_alloc.empty((nb, heads, n, d), q.dtype, q.device) for _ in range(3))
    query_blocks = triton.cdiv(n, blocks["BLOCK_M"])
    run = _run_length(nb, heads, query_blocks)
    programs = triton.cdiv(nb, run)
    partial = (torch.zeros((programs, heads, n, n), dtype=torch.float32, device=q.device)
               if bias is not None else dq)
    if dq.numel():
        table, size, windows, stride_tw, stride_th = _table_arguments(q, bias, mask, table)
        flags = dict(HAS_TABLE=table is not q, MASK_INDEX=mask_index is not None, ONE_BLOCK=n <= ONE_BLOCK_TOKENS,
                     PRECISION=meta["PRECISION"], UPCAST=meta["UPCAST"], **blocks)
        inputs = (q, k, v, table, q if mask_index is None else mask_index, out, lse, dout)
        with on_device_of(q):
            _window_attention_bwd_dkdv_kernel[(nb, heads, triton.cdiv(n, blocks["BLOCK_N"]))](
                *inputs, dk, dv, n, d, size, windows, scale, *_strides(q, k, v, out), stride_tw, stride_th, **flags)
            _window_attention_bwd_dq_kernel[(programs, heads, query_blocks)](
                *inputs, dq, partial, nb, n, d, size, windows, run, scale, *_strides(q, k, v, out),
                stride_tw, stride_th, HAS_BIAS=bias is not None, **flags)
    dbias = partial.sum(0).to(bias.dtype) if bias is not None else q.new_empty((0,))
    return dq, dk, dv, dbias


def _copy(x, windows, wh, ww, sh, sw, index, merge):
    b, h, w, c = x.shape
    rows, n = windows.shape[0], wh * ww
    if rows == 0 or n == 0 or c == 0:
        return
    per_image = rows // b
    grid = lambda meta: (rows, triton.cdiv(n, meta["BLOCK_T"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
    with on_device_of(x):
        _window_copy_kernel[grid](
            x, windows, x if index is None else index,
            h, w, c, n, per_image, triton.cdiv(w, ww), wh, ww, sh, sw,
            *x.stride(), *windows.stride(),
            HAS_INDEX=index is not None, MERGE=merge)


def window_partition(x: torch.Tensor, wh: int, ww: int, sh: int, sw: int,
                     index: Optional[torch.Tensor]) -> torch.Tensor:
    """windows [B * K, N, C] of x [B, H, W, C] (any strides), index [B, K] (made contiguous)."""
    b, h, w, c = x.shape
    (index,) = _contiguous(index)
    per_image = index.shape[1] if index is not None else triton.cdiv(h, wh) * triton.cdiv(w, ww)
    windows = _alloc.empty((b * per_image, wh * ww, c), x.dtype, x.device)
    _copy(x, windows, wh, ww, sh, sw, index, merge=False)
    return windows


def window_merge(windows: torch.Tensor, x: torch.Tensor, wh: int, ww: int, sh: int, sw: int,
                 index: Optional[torch.Tensor]) -> torch.Tensor:
    """out [B, H, W, C]: a copy of x (only its shape without ``index``, as every pixel is
    then written) with the windows' real tokens scattered back; windows and x with any
    strides, index made contiguous."""
    (index,) = _contiguous(index)
    out = _alloc.empty(x.shape, x.dtype, x.device)
    if index is not None:
        out.copy_(x)
    _copy(out, windows, wh, ww, sh, sw, index, merge=True)
    return out

"""Swin window attention, fused, and the window layout around it.

window_attention: q, k, v [B_, heads, N, d] (B_ windows of N tokens) ->
    out [B_, heads, N, d] = softmax(S) v and lse [B_, heads, N] (fp32) = logsumexp of S's rows,
    S = q k^T * scale + bias[h] + mask[m(b)], m(b) = b % nW or mask_index[b]. One program per
    (window, head, block of BLOCK_M query rows) holds all the window's keys: the N tokens
    padded to BLOCK_T (a power of two >= 16, <= 256), d to HEAD_DIM; scores and softmax
    statistics in fp32. For N <= 64 (Swin's 7x7 windows) one program holds the whole window.
window_attention_backward: one program per (run of windows, head, query block) recomputes
    P = exp(S - lse) and writes dQ = dS K * scale, with dS = P * (dO V^T - rowsum(dO * O)),
    and dV = P^T dO, dK = dS^T Q * scale: stored directly when the window is one query block,
    else added with fp32 atomics over the (at most 8) query blocks. d(bias)[h] = sum over
    windows of dS: each program sums its run in registers and writes its rows of one fp32
    partial [programs, heads, N, N], which the launcher reduces with torch.sum:
    deterministic, no atomics contending on the same N x N entries from every window, and
    the runs keep the partial buffer small.
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

_ATTENTION_CONFIGS = Configs(
    [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)],
    triton.Config({}),
)
_COPY_CONFIGS = Configs(
    [triton.Config({"BLOCK_T": t, "BLOCK_C": c}, num_warps=w)
     for t, c, w in [(16, 64, 2), (32, 64, 4), (64, 64, 4), (16, 128, 4), (64, 128, 8)]],
    triton.Config({"BLOCK_T": 64, "BLOCK_C": 32}),
)


@triton.jit
def _scores(query_ptr, key_ptr, bias_ptr, mask_ptr, mask_index_ptr, b, h, row0, N, D, NW, scale,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_INDEX: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(q [BLOCK_M, HEAD_DIM] of query rows row0.., k [BLOCK_T, HEAD_DIM] of all keys, S
    [BLOCK_M, BLOCK_T] fp32) of window b, head h (b, h int64: the window's base offset may
    pass 2^31); S is -inf in the padded key columns. Token and feature offsets stay int32
    (fewer registers): the launchers pass only strides whose products with them fit."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m, mask_t, mask_d = offs_m < N, offs_t < N, offs_d < D
    q = tl.load(query_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0)
    k = tl.load(key_ptr + b * stride_kb + h * stride_kh + offs_t[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=mask_t[:, None] & mask_d[None, :], other=0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32) * scale
    mask_mt = mask_m[:, None] & mask_t[None, :]
    offs_mt = offs_m[:, None] * N + offs_t[None, :]
    if HAS_BIAS:
        s += tl.load(bias_ptr + h * N * N + offs_mt, mask=mask_mt, other=0).to(tl.float32)
    if HAS_MASK:
        if MASK_INDEX:
            w = tl.load(mask_index_ptr + b).to(tl.int64)
        else:
            w = b % NW
        s += tl.load(mask_ptr + w * N * N + offs_mt, mask=mask_mt, other=0).to(tl.float32)
    s = tl.where(mask_t[None, :], s, float("-inf"))
    return q, k, s


@autotune(_ATTENTION_CONFIGS, key=["N", "D", "HAS_BIAS", "HAS_MASK"])
@triton.jit
def _window_attention_fwd_kernel(
    # pointers
    query_ptr, key_ptr, value_ptr, bias_ptr, mask_ptr, mask_index_ptr, out_ptr, lse_ptr,
    # sizes and the softmax scale
    N, D, NW, scale,
    # strides (window, head, token, dim) of q, k, v and out
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_INDEX: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (b, h, i): query rows [i * BLOCK_M, (i + 1) * BLOCK_M) of window b, head h."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row0 = tl.program_id(2) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m, mask_d = offs_m < N, offs_d < D
    q, k, s = _scores(query_ptr, key_ptr, bias_ptr, mask_ptr, mask_index_ptr, b, h, row0, N, D, NW, scale,
                      stride_qb, stride_qh, stride_qn, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      HAS_BIAS, HAS_MASK, MASK_INDEX, PRECISION, UPCAST, BLOCK_M, BLOCK_T, HEAD_DIM)
    v = tl.load(value_ptr + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=(offs_t < N)[:, None] & mask_d[None, :], other=0)
    if UPCAST:
        v = v.to(tl.float32)
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    total = tl.sum(p, axis=1)
    out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=tl.float32) / total[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
             + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + (b * tl.num_programs(1) + h) * N + offs_m, m + tl.log(total), mask=mask_m)


@autotune(_ATTENTION_CONFIGS, key=["N", "D", "HAS_BIAS", "HAS_MASK"],
          # with SPLIT, dK and dV are fp32 sums of atomic adds: zeroed before each trial
          reset_to_zero=["dkey_ptr", "dvalue_ptr"])
@triton.jit
def _window_attention_bwd_kernel(
    # pointers
    query_ptr, key_ptr, value_ptr, bias_ptr, mask_ptr, mask_index_ptr, out_ptr, lse_ptr,
    dout_ptr, dquery_ptr, dkey_ptr, dvalue_ptr, dbias_ptr,
    # sizes and the softmax scale
    NWIN, N, D, NW, RUN, scale,
    # strides (window, head, token, dim) of q, k, v and out (dout and dq: out's)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_INDEX: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program (r, h, i): query rows block i of windows [r * RUN, r * RUN + RUN), head h.
    dO and dQ share out's strides, as dK and dV do; with SPLIT (several query blocks) the
    dK, dV parts are added with fp32 atomics into zeroed fp32 buffers."""
    h = tl.program_id(1).to(tl.int64)
    heads = tl.num_programs(1)
    row0 = tl.program_id(2) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m, mask_t, mask_d = offs_m < N, offs_t < N, offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    mask_td = mask_t[:, None] & mask_d[None, :]
    mask_mt = mask_m[:, None] & mask_t[None, :]
    offs_md = offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    offs_td = offs_t[:, None] * stride_on + offs_d[None, :] * stride_od
    dbias = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    start = tl.program_id(0).to(tl.int64) * RUN
    for j in range(0, tl.minimum(RUN, NWIN - start)):
        b = start + j
        q, k, s = _scores(query_ptr, key_ptr, bias_ptr, mask_ptr, mask_index_ptr, b, h, row0, N, D, NW, scale,
                          stride_qb, stride_qh, stride_qn, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          HAS_BIAS, HAS_MASK, MASK_INDEX, PRECISION, UPCAST, BLOCK_M, BLOCK_T, HEAD_DIM)
        v = tl.load(value_ptr + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd, mask=mask_td, other=0)
        o_base = b * stride_ob + h * stride_oh
        o = tl.load(out_ptr + o_base + offs_md, mask=mask_md, other=0).to(tl.float32)
        do = tl.load(dout_ptr + o_base + offs_md, mask=mask_md, other=0)
        if UPCAST:
            v = v.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + (b * heads + h) * N + offs_m, mask=mask_m, other=0)
        p = tl.where(mask_mt, tl.exp(s - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION, out_dtype=tl.float32)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=tl.float32)
        delta = tl.sum(do.to(tl.float32) * o, axis=1)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=tl.float32) * scale
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION, out_dtype=tl.float32) * scale
        tl.store(dquery_ptr + o_base + offs_md, dq.to(dquery_ptr.dtype.element_ty), mask=mask_md)
        if SPLIT:
            tl.atomic_add(dkey_ptr + o_base + offs_td, dk, mask=mask_td)
            tl.atomic_add(dvalue_ptr + o_base + offs_td, dv, mask=mask_td)
        else:
            tl.store(dkey_ptr + o_base + offs_td, dk.to(dkey_ptr.dtype.element_ty), mask=mask_td)
            tl.store(dvalue_ptr + o_base + offs_td, dv.to(dvalue_ptr.dtype.element_ty), mask=mask_td)
        dbias += ds
    if HAS_BIAS:
        partial = (tl.program_id(0) * heads + h) * N * N
        tl.store(dbias_ptr + partial + offs_m[:, None] * N + offs_t[None, :], dbias, mask=mask_mt)


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
    """The tiles: all N keys padded to BLOCK_T (>= 16, a power of two), d to HEAD_DIM, and
    query rows in blocks of BLOCK_M (the whole window up to 64 tokens; 64 rows up to 128,
    32 up to 256, so that the [BLOCK_M, BLOCK_T] fp32 tiles and their shared-memory layout
    conversions fit one SM; half that, 32 and 16, when fp32 operands have d > 64: their
    backward at 64 rows and 128 keys needs 176 KB of shared memory on sm_80 and 241 KB on
    sm_90, at 32 rows and 256 keys 184 KB on sm_80, over the 163 KB and 227 KB a block has)."""
    block_t = max(16, triton.next_power_of_2(n))
    head_dim = max(16, triton.next_power_of_2(d))
    rows = 64 if block_t <= 128 else 32
    if dtype == torch.float32 and head_dim > 64 and block_t > 64:
        rows //= 2
    return {"BLOCK_M": min(block_t, rows), "BLOCK_T": block_t, "HEAD_DIM": head_dim}


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _int32_tiles(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B_, heads, N, d], copied contiguous when a token or feature offset (< 256)
    times its stride could pass 2^31: the kernels keep those offsets int32 and only the
    window and head offsets int64."""
    reach = max(t.shape[2], t.shape[3]) * max(abs(t.stride(2)), abs(t.stride(3)))
    return t if reach < 2 ** 31 else t.contiguous()


def _contiguous(*tensors):
    """The tensors (None kept) at unit strides, as the kernels index bias, mask, mask_index,
    index, lse, and dO and O (whose strides dQ, dK and dV share)."""
    return [None if t is None else t.contiguous() for t in tensors]


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor], mask_index: Optional[torch.Tensor],
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B_, heads, N, d], lse [B_, heads, N] fp32); q, k, v read through their strides,
    bias [heads, N, N], mask [nW, N, N] and mask_index made contiguous."""
    nb, heads, n, d = q.shape
    q, k, v = _int32_tiles(q), _int32_tiles(k), _int32_tiles(v)
    bias, mask, mask_index = _contiguous(bias, mask, mask_index)
    out = _alloc.empty((nb, heads, n, d), q.dtype, q.device)
    lse = _alloc.empty((nb, heads, n), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    meta, blocks = dot_meta(q.dtype), _blocks(n, d, q.dtype)
    with on_device_of(q):
        _window_attention_fwd_kernel[(nb, heads, triton.cdiv(n, blocks["BLOCK_M"]))](
            q, k, v, q if bias is None else bias, q if mask is None else mask,
            q if mask_index is None else mask_index, out, lse,
            n, d, 1 if mask is None else mask.shape[0], scale, *_strides(q, k, v, out),
            HAS_BIAS=bias is not None, HAS_MASK=mask is not None, MASK_INDEX=mask_index is not None,
            PRECISION=meta["PRECISION"], UPCAST=meta["UPCAST"], **blocks)
    return out, lse


def _run_length(windows: int) -> int:
    """Windows per backward program: enough programs to fill a GPU (and few d(bias)
    partials); in the interpreter, which runs programs one after another, 3 per program."""
    return 3 if interpreting() else max(1, min(16, windows // 512))


def window_attention_backward(dout, q, k, v, out, lse, bias, mask, mask_index, scale):
    """(dq, dk, dv, dbias) for window_attention (dbias empty [0] without a bias); q, k, v
    read through their strides, the other tensors made contiguous."""
    nb, heads, n, d = q.shape
    q, k, v = _int32_tiles(q), _int32_tiles(k), _int32_tiles(v)
    dout, out, lse, bias, mask, mask_index = _contiguous(dout, out, lse, bias, mask, mask_index)
    meta, blocks = dot_meta(q.dtype), _blocks(n, d, q.dtype)
    row_blocks = triton.cdiv(n, blocks["BLOCK_M"])
    split = row_blocks > 1
    dq = _alloc.empty((nb, heads, n, d), q.dtype, q.device)
    dk, dv = ((torch.zeros((nb, heads, n, d), dtype=torch.float32, device=q.device) if split
               else _alloc.empty((nb, heads, n, d), q.dtype, q.device)) for _ in range(2))
    run = _run_length(nb)
    programs = triton.cdiv(nb, run)
    partial = (torch.zeros((programs, heads, n, n), dtype=torch.float32, device=q.device)
               if bias is not None else dq)
    if dq.numel():
        with on_device_of(q):
            _window_attention_bwd_kernel[(programs, heads, row_blocks)](
                q, k, v, q if bias is None else bias, q if mask is None else mask,
                q if mask_index is None else mask_index, out, lse, dout, dq, dk, dv, partial,
                nb, n, d, 1 if mask is None else mask.shape[0], run, scale, *_strides(q, k, v, out),
                HAS_BIAS=bias is not None, HAS_MASK=mask is not None, MASK_INDEX=mask_index is not None,
                SPLIT=split, PRECISION=meta["PRECISION"], UPCAST=meta["UPCAST"], **blocks)
    dbias = partial.sum(0).to(bias.dtype) if bias is not None else q.new_empty((0,))
    return dq, dk.to(q.dtype), dv.to(q.dtype), dbias


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

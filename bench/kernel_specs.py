"""What sparqle's Triton kernels compile to, taken from real launcher calls, for any GPU target
and without a GPU.

Inside ``kernels/triton/_autotune.planning()`` a launcher call launches nothing: each
autotuned kernel records the call's arguments (tensors as their dtype and address), once
per distinct specialisation (``Plan.compiles``). The cases below call the launchers of
``sparqle.kernels.triton`` on meta tensors (shapes, dtypes and strides without storage:
nothing is computed or allocated, so headline shapes cost nothing), so a recorded
:class:`~sparqle.kernels.triton._autotune.Launch` has exactly the pointer dtypes, integer
widths, constexprs and flags a GPU call of that shape would pass. :func:`compile_spec`
then compiles it as ``triton.runtime.jit.JITFunction.run`` does, for the target asked: the
same binder computes the run-time specialisations (an integer equal to 1 becomes a
constant, integers divisible by 16 and 16-byte-aligned pointers get ``tt.divisibility =
16``), with the config's num_warps and num_stages.

:func:`launch_problems` checks a compiled kernel against its target's per-block limits
(shared memory; registers x threads), read from the cubin with the ``cuobjdump`` that
Triton ships. ``python -m sparqle.bench.kernel_specs`` compiles every spec of
:func:`test_specs` for sm_80 and sm_90 on every core and prints the kernels that fail to
compile or cannot launch (tests/test_triton_compile.py runs it); run it without
``TRITON_INTERPRET``, which makes ``triton.jit`` build interpreted functions.
"""
import argparse
import contextlib
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from sparqle.formats._checks import cdiv
from sparqle.formats.nm import index_bits
from sparqle.formats.int4 import packed_width
from sparqle.kernels.triton import (fp8_linear, int4_linear, int8_linear, nm_linear, spmm_bell, spmm_csr,
                                    window_attention)
from sparqle.kernels.triton._autotune import planning

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # every Triton backend's
FP64_TOO = FLOAT_DTYPES + (torch.float64,)  # CSR, Blocked-ELL, nm_to_dense also take fp64
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
NM_PATTERNS = ((2, 4), (1, 2), (1, 4), (2, 8), (4, 8))
BELL_BLOCKS = (16, 32, 64, 128)


class Target(NamedTuple):
    """A GPU's per-block and per-SM limits (CUDA occupancy calculator values)."""
    arch: int                  # compute capability, 80 = sm_80
    shared_per_block: int      # bytes a block may opt in to (dynamic + static)
    shared_per_sm: int         # bytes of shared memory per SM (largest carve-out)
    registers_per_sm: int = 65536
    warps_per_sm: int = 64
    ctas_per_sm: int = 32
    reserved_shared_per_cta: int = 1024  # the driver's reserve per resident block
    shared_granularity: int = 128
    register_granularity: int = 256      # registers are allocated per warp in these units
    sub_partitions: int = 4              # the register file is split among these


TARGETS = {80: Target(80, shared_per_block=166912, shared_per_sm=167936),   # A100: 163 KB / 164 KB
           90: Target(90, shared_per_block=232448, shared_per_sm=233472)}   # H100/H200: 227 KB / 228 KB


def tensor(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A contiguous meta tensor: a shape, dtype and strides, no storage (address 0: aligned)."""
    return torch.empty(shape, dtype=dtype, device="meta")


def misaligned(rows: int, cols: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A [rows, cols] view whose address is not 16-byte aligned and whose row stride is
    cols + 1 (a column slice of a wider tensor): what Triton does not specialise."""
    return tensor(rows, cols + 1, dtype=dtype)[:, 1:]


class Case(NamedTuple):
    """One launcher call: ``run()`` calls a sparqle.kernels.triton launcher on meta tensors."""
    op: str                      # the kernel module: int4_linear, spmm_csr, ...
    label: str                   # what the call is, for messages and tables
    run: Callable[[], object]
    archs: Tuple[int, ...] = (80, 90)  # targets its kernels are built for


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- launcher calls, one builder per op -------------------------------------------------

def csr_cases(m: int, k: int, n: int, nnz: int, dtype: torch.dtype, transposed_x: bool = False,
              bias: bool = False, sddmm: bool = True, archs=(80, 90)) -> List[Case]:
    """csr_linear: x [n, k] (a transposed view when ``transposed_x``, as sparqle.spmm passes
    b^T) @ A^T (+ bias [m]) for A [m, k] with nnz entries, int32 indices (read as 16-bit
    where the launcher narrows them: fp16 and bf16, k <= 65536); sddmm_csr at the same
    pattern with x [m, n], y [k, n]."""
    crow, col, order = tensor(m + 1, dtype=torch.int32), tensor(nnz, dtype=torch.int32), tensor(m, dtype=torch.int32)
    x = tensor(k, n, dtype=dtype).t() if transposed_x else tensor(n, k, dtype=dtype)
    label = f"{_name(dtype)} m={m} k={k} n={n} nnz={nnz}" + (" x^T" if transposed_x else "")
    cases = [Case("spmm_csr", "linear " + label + (" bias" if bias else ""),
                  lambda: spmm_csr.csr_linear(x, crow, col, tensor(nnz, dtype=dtype), order,
                                              tensor(m, dtype=dtype) if bias else None), archs)]
    if sddmm:
        cases.append(Case("spmm_csr", "sddmm " + label,
                          lambda: spmm_csr.sddmm_csr(crow, col, tensor(m, n, dtype=dtype), tensor(k, n, dtype=dtype)),
                          archs))
    return cases


def csr_bitmap_cases(m: int, k: int, n: int, nnz: int, dtype: torch.dtype, transposed_x: bool = False,
                     bias: bool = False, archs=(80, 90)) -> List[Case]:
    """csr_bitmap_linear (the tensor-core path): x [n, k] (a transposed view when
    ``transposed_x``) @ A^T (+ bias [m]) for A [m, k] with nnz entries, from its bitmap
    words and row starts (int32 [m, ceil(k / 32)])."""
    chunks = cdiv(k, 32)
    words, starts = tensor(m, chunks, dtype=torch.int32), tensor(m, chunks, dtype=torch.int32)
    x = tensor(k, n, dtype=dtype).t() if transposed_x else tensor(n, k, dtype=dtype)
    label = (f"tensor cores {_name(dtype)} m={m} k={k} n={n} nnz={nnz}" + (" x^T" if transposed_x else "")
             + (" bias" if bias else ""))
    return [Case("spmm_csr", label, lambda: spmm_csr.csr_bitmap_linear(
        x, words, starts, tensor(nnz, dtype=dtype), tensor(m, dtype=dtype) if bias else None), archs)]


def bell_cases(n: int, m: int, k: int, block: int, width: int, dtype: torch.dtype,
               directions=("linear", "matmul", "sddmm"), bias: bool = False, archs=(80, 90)) -> List[Case]:
    """A [m, k] in Blocked-ELL (block x block blocks, ``width`` slots per block-row):
    bell_linear x [n, k] @ A^T (+ bias [m]), bell_matmul x [n, m] @ A over A^T's structure at
    its bound width (the block-rows of A), sddmm_bell dy [n, m]^T @ x [n, k]."""
    rows, cols = cdiv(m, block), cdiv(k, block)
    values = tensor(rows, width, block, block, dtype=dtype)
    ell_cols = tensor(rows, width, dtype=torch.int32)
    label = f"{_name(dtype)} n={n} m={m} k={k} block={block} width={width}"
    calls = {
        "linear": lambda: spmm_bell.bell_linear(tensor(n, k, dtype=dtype), ell_cols, values,
                                                tensor(m, dtype=dtype) if bias else None, m),
        "matmul": lambda: spmm_bell.bell_matmul(tensor(n, m, dtype=dtype), tensor(cols, rows, dtype=torch.int32),
                                                tensor(cols, rows, dtype=torch.int32), values, k),
        "sddmm": lambda: spmm_bell.sddmm_bell(ell_cols, tensor(n, m, dtype=dtype), tensor(n, k, dtype=dtype), block),
    }
    return [Case("spmm_bell", f"{d} {label}" + (" bias" if bias and d == "linear" else ""), calls[d], archs)
            for d in directions]


def int4_cases(x: torch.Tensor, n: int, bias: bool, group: int = 128, archs=(80, 90)) -> List[Case]:
    """int4_linear: x [M, K] @ dequant(W [n, K])^T, packed uint8 [n, 64 ceil(K/128)], scales and
    zeros [n, ceil(K/group)] in x's dtype (one group per row when group >= K)."""
    m, k = x.shape
    groups = cdiv(k, group)
    label = f"{_name(x.dtype)} M={m} N={n} K={k} group={group}{' bias' if bias else ''}"
    return [Case("int4_linear", label, lambda: int4_linear.int4_linear(
        x, tensor(n, packed_width(k), dtype=torch.uint8), tensor(n, groups, dtype=x.dtype),
        tensor(n, groups, dtype=x.dtype), tensor(n, dtype=x.dtype) if bias else None, group), archs)]


def int8_cases(x: torch.Tensor, n: int, bias: bool, w8a8: bool, archs=(80, 90),
               smoothed: bool = False) -> List[Case]:
    """int8_linear (W8A8: x quantized per row first, divided by SmoothQuant's s when
    ``smoothed``; else W8A16): x [M, K] @ (q [n, K] int8 * scales [n])^T."""
    m, k = x.shape
    label = (f"{'W8A8' if w8a8 else 'W8A16'} {_name(x.dtype)} M={m} N={n} K={k}{' bias' if bias else ''}"
             f"{' smoothed' if smoothed else ''}")
    return [Case("int8_linear", label, lambda: int8_linear.int8_linear(
        x, tensor(n, k, dtype=torch.int8), tensor(n, dtype=x.dtype),
        tensor(n, dtype=x.dtype) if bias else None, w8a8,
        tensor(k, dtype=torch.float32) if smoothed else None), archs)]


def int8_int_mm_cases(x: torch.Tensor, n: int, bias: bool, archs=(80, 90)) -> List[Case]:
    """W8A8 through torch._int_mm (int_mm_linear): the quantizer, then _int_mm's int32
    product (not a Triton kernel) scaled by the epilogue kernel."""
    m, k = x.shape
    label = f"int_mm W8A8 {_name(x.dtype)} M={m} N={n} K={k}{' bias' if bias else ''}"
    return [Case("int8_linear", label, lambda: int8_linear.int_mm_linear(
        x, tensor(n, k, dtype=torch.int8), tensor(n, dtype=x.dtype), tensor(n, dtype=x.dtype) if bias else None),
        archs)]


def int8_fused_cases(x: torch.Tensor, n: int, bias: bool, smoothed: bool = False, archs=(80, 90)) -> List[Case]:
    """W8A8 at M <= 16 in one launch (quantize_linear): x [M, K] quantized in the GEMM."""
    m, k = x.shape
    label = (f"fused W8A8 {_name(x.dtype)} M={m} N={n} K={k}{' bias' if bias else ''}"
             f"{' smoothed' if smoothed else ''}")
    return [Case("int8_linear", label, lambda: int8_linear.quantize_linear(
        x, tensor(n, k, dtype=torch.int8), tensor(n, dtype=x.dtype), tensor(n, dtype=x.dtype) if bias else None,
        tensor(k, dtype=torch.float32) if smoothed else None), archs)]


def int8_quantize_cases(x: torch.Tensor, static: bool, archs=(80, 90)) -> List[Case]:
    label = f"quantize_rows {_name(x.dtype)} M={x.shape[0]} K={x.shape[1]}{' static' if static else ''}"
    return [Case("int8_linear", label, lambda: int8_linear.quantize_rows(
        x, tensor(1, dtype=torch.float32) if static else None), archs)]


def nm_cases(x: torch.Tensor, rows: int, pattern_n: int, pattern_m: int, bias: bool, to_dense: bool = False,
             archs=(80, 90)) -> List[Case]:
    """nm_linear: x [M, K] @ W^T for W [rows, K] in pattern_n:pattern_m (values [rows, Kc],
    meta int32 [rows, ceil(Kc / (32 / bits))]); with ``to_dense``, also nm_to_dense of W."""
    m, k = x.shape
    kc = cdiv(k, pattern_m) * pattern_n
    values = tensor(rows, kc, dtype=x.dtype)
    meta = tensor(rows, cdiv(kc, 32 // index_bits(pattern_m)), dtype=torch.int32)
    pattern = f"{pattern_n}:{pattern_m}"
    label = f"{pattern} {_name(x.dtype)} M={m} N={rows} K={k}{' bias' if bias else ''}"
    cases = [Case("nm_linear", label, lambda: nm_linear.nm_linear(
        x, values, meta, tensor(rows, dtype=x.dtype) if bias else None, pattern_n, pattern_m), archs)]
    if to_dense:
        cases.append(Case("nm_linear", f"to_dense {pattern} {_name(x.dtype)} N={rows} K={k}",
                          lambda: nm_linear.to_dense(values, meta, pattern_n, pattern_m, k), archs))
    return cases


def fp8_quantize_cases(x: torch.Tensor, fp8: torch.dtype, static: bool) -> List[Case]:
    """quantize_rows of x [M, K] (a transposed view, rows as columns in memory: " x^T")."""
    label = (f"quantize_rows {_name(x.dtype)}->{_name(fp8)} M={x.shape[0]} K={x.shape[1]}"
             f"{' x^T' if x.stride(0) == 1 and x.stride(1) != 1 else ''}{' static' if static else ''}")
    return [Case("fp8_linear", label, lambda: fp8_linear.quantize_rows(
        x, tensor(1, dtype=torch.float32) if static else None, fp8), (90,))]


def fp8_mm_cases(a: torch.Tensor, n: int, b_fp8: torch.dtype, out: torch.dtype, bias: bool,
                 row_scales: bool = True) -> List[Case]:
    """scaled_mm: a [M, K] (FP8 with a per-row scale, or float: weight-only) @ b [n, K]^T in
    FP8 ``b_fp8`` with a scale per row (or one, tensor-wise), out in ``out``. sm_90 only:
    FP8 needs compute capability 8.9."""
    m, k = a.shape
    a_fp8 = a.dtype in FP8_DTYPES
    b_scale = tensor(n if row_scales else 1, dtype=torch.float32)
    label = (f"{_name(a.dtype)} x {_name(b_fp8)} -> {_name(out)} M={m} N={n} K={k}"
             f"{'' if row_scales else ' tensor-wise'}{' bias' if bias else ''}")
    return [Case("fp8_linear", label, lambda: fp8_linear.scaled_mm(
        a, tensor(m, dtype=torch.float32) if a_fp8 else None, tensor(n, k, dtype=b_fp8), b_scale,
        tensor(n, dtype=out) if bias else None, out), (90,))]


def fp8_redo_cases(x: torch.Tensor, n: int, b_fp8: torch.dtype, bias: bool) -> List[Case]:
    """redo_rows: the rows of x [M, K] holding ±Inf recomputed from x against b [n, K] in FP8
    ``b_fp8`` (the W8A8 fp8_linear's last launch; int8's is recorded by int8_linear). sm_90."""
    m, k = x.shape
    label = f"redo_rows {_name(x.dtype)} x {_name(b_fp8)} M={m} N={n} K={k}{' bias' if bias else ''}"
    return [Case("fp8_linear", label, lambda: fp8_linear.redo_rows(
        x, tensor(m, dtype=torch.float32), tensor(n, k, dtype=b_fp8), tensor(n, dtype=torch.float32),
        tensor(n, dtype=x.dtype) if bias else None, tensor(m, n, dtype=x.dtype)), (90,))]


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(precision) inside the ``with`` block ("high":
    fp32 dots may use TF32)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def window_attention_cases(windows: int, heads: int, n: int, d: int, dtype: torch.dtype, bias: bool,
                           mask_windows: int, mask_index: bool, backward: bool = True,
                           swin_layout: bool = False, tf32: bool = False, archs=(80, 90)) -> List[Case]:
    """window_attention (and its backward) on q, k, v [windows, heads, n, d]: contiguous, or
    with ``swin_layout`` the views of one qkv [windows, n, 3, heads, d] tensor that Swin's
    projection makes; bias [heads, n, n]; mask [mask_windows, n, n] (0: none), chosen by
    b % mask_windows or by an int64 ``mask_index``; fp32 dots in TF32 when ``tf32``."""

    def qkv():
        if swin_layout:
            return tuple(tensor(windows, n, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4))
        return tuple(tensor(windows, heads, n, d, dtype=dtype) for _ in range(3))

    q, k, v = qkv()
    extras = (tensor(heads, n, n, dtype=dtype) if bias else None,
              tensor(mask_windows, n, n, dtype=dtype) if mask_windows else None,
              tensor(windows, dtype=torch.int64) if mask_index else None)
    label = (f"{_name(dtype)} windows={windows} heads={heads} N={n} d={d}{' bias' if bias else ''}"
             f"{f' mask[{mask_windows}]' if mask_windows else ''}{' mask_index' if mask_index else ''}"
             f"{' swin-qkv' if swin_layout else ''}")
    scale = d ** -0.5
    precision = "high" if tf32 else torch.get_float32_matmul_precision()

    def forward():
        with float32_matmul_precision(precision):
            return window_attention.window_attention(q, k, v, *extras, scale)

    def backward_():
        out, lse = tensor(windows, heads, n, d, dtype=dtype), tensor(windows, heads, n, dtype=torch.float32)
        with float32_matmul_precision(precision):
            return window_attention.window_attention_backward(tensor(windows, heads, n, d, dtype=dtype), q, k, v, out, lse,
                                                     *extras, scale)

    label += " tf32" if tf32 else ""
    return [Case("window_attention", "fwd " + label, forward, archs)] + (
        [Case("window_attention", "bwd " + label, backward_, archs)] if backward else [])


def window_copy_cases(batch: int, side: int, channels: int, window: int, shift: int, dtype: torch.dtype,
                      index: bool, archs=(80, 90)) -> List[Case]:
    """window_partition and window_merge of x [batch, side, side, channels] into windows of
    window x window tokens, rolled by ``shift``; the windows listed by an int64 index when
    ``index``."""
    per_image = cdiv(side, window) ** 2
    windows = tensor(batch * per_image, window * window, channels, dtype=dtype)
    idx = tensor(batch, per_image, dtype=torch.int64) if index else None
    x = tensor(batch, side, side, channels, dtype=dtype)
    label = f"{_name(dtype)} x=[{batch}, {side}, {side}, {channels}] window={window} shift={shift}{' index' if index else ''}"
    return [Case("window_attention", "partition " + label,
                 lambda: window_attention.window_partition(x, window, window, shift, shift, idx), archs),
            Case("window_attention", "merge " + label,
                 lambda: window_attention.window_merge(windows, x, window, window, shift, shift, idx), archs)]


# --- the compile test's cases -------------------------------------------------------------

def _linear_cases(x: torch.Tensor, bias: bool) -> List[Case]:
    """The first variant of every linear op on x (2:4, e4m3; FP8 x FP8 and weight-only)."""
    e4m3 = FP8_DTYPES[0]
    return (int4_cases(x, 40, bias) + int8_cases(x, 40, bias, True) + int8_cases(x, 40, bias, False)
            + nm_cases(x, 40, 2, 4, bias) + fp8_mm_cases(x, 40, e4m3, x.dtype, bias)
            + fp8_mm_cases(tensor(*x.shape, dtype=e4m3), 40, e4m3, x.dtype, bias)
            + fp8_redo_cases(x, 40, e4m3, bias))


def test_cases() -> List[Case]:
    """Small calls of every launcher, one factor at a time around a first case (bf16):

    - every dtype its Triton backend takes, each with the variants that change the code
      path: bias (and the split-K or plain epilogue it sits in) on both paths of the linear
      ops (M = 16: split-K small-M kernels; M = 48: tiled), W8A8 and W8A16, FP8 x FP8 and
      weight-only, static scales, every Blocked-ELL block size and direction, partition and
      merge with and without an index, and window attention's tiles (below);
    - at bf16, every N:M pattern, FP8 format pair and weight format;
    - at bf16, the run-time specialisations of the sizes: M = 1 (a constant), M = 16 and 48
      (divisible by 16), and M = 7 and 33 with K = 72 and x a misaligned view (nothing
      divisible, no 16-byte alignment); for CSR n = 1 and an average row of 1 entry
      (constants), of 4 (plain) and of 32 (divisible).
    """
    cases: List[Case] = []
    e4m3, e5m2 = FP8_DTYPES
    for dtype in FP64_TOO:
        cases += csr_cases(64, 96, 32, 300, dtype, bias=True)
        cases += csr_cases(33, 40, 1, 40, dtype, transposed_x=True)   # n = 1, avg row nnz 1: constants
        cases += csr_cases(5, 40, 17, 100, dtype, sddmm=False)        # avg row nnz 32: divisible
        for block in BELL_BLOCKS:
            cases += bell_cases(48, 4 * block, 3 * block, block, 2, dtype, bias=block == 16)
        cases += bell_cases(1, 40, 72, 16, 1, dtype)                  # n = 1, width 1, ragged blocks
        cases += nm_cases(tensor(1, 128, dtype=dtype), 64, 2, 4, False, to_dense=True)[1:]
    for dtype in FLOAT_DTYPES:
        cases += csr_bitmap_cases(64, 96, 16, 300, dtype, bias=True) + csr_bitmap_cases(33, 72, 48, 200, dtype)
        for rows, bias in itertools.product((16, 48), (False, True)):
            cases += _linear_cases(tensor(rows, 128, dtype=dtype), bias)
        x = tensor(16, 128, dtype=dtype)
        for static in (False, True):
            cases += int8_quantize_cases(x, static) + fp8_quantize_cases(x, e4m3, static)
        cases += int8_int_mm_cases(tensor(48, 128, dtype=dtype), 40, False)
        cases += int8_int_mm_cases(tensor(48, 128, dtype=dtype), 40, True)
        cases += int8_fused_cases(tensor(16, 128, dtype=dtype), 40, True)
        cases += int8_fused_cases(tensor(1, 128, dtype=dtype), 40, False)
        cases += int8_fused_cases(misaligned(7, 72, dtype), 40, False, smoothed=True)
        cases += window_copy_cases(2, 14, 96, 7, 3, dtype, False) + window_copy_cases(1, 10, 40, 7, 0, dtype, True)
    bf16 = torch.bfloat16
    for rows in (16, 48):
        x = tensor(rows, 128, dtype=bf16)
        cases += [c for n, m in NM_PATTERNS[1:] for c in nm_cases(x, 40, n, m, False)]
        cases += fp8_mm_cases(x, 40, e5m2, bf16, False) + fp8_redo_cases(x, 40, e5m2, False)
        cases += [c for a, b in itertools.product(FP8_DTYPES, repeat=2) if (a, b) != (e4m3, e4m3)
                  for c in fp8_mm_cases(tensor(rows, 128, dtype=a), 40, b, bf16, False)]
    cases += fp8_quantize_cases(tensor(16, 128, dtype=bf16), e5m2, False)
    # FP8 training's transposed operands (x^T, dy^T, W^T): the column-wise quantizer, at
    # every dtype, static too, and rows off every block (M = 40, K = 72, misaligned).
    for dtype in FLOAT_DTYPES:
        cases += fp8_quantize_cases(tensor(128, 48, dtype=dtype).t(), e5m2, False)
    cases += fp8_quantize_cases(tensor(128, 48, dtype=bf16).t(), e4m3, True)
    cases += fp8_quantize_cases(misaligned(72, 40, bf16).t(), e4m3, False)
    # int4 with several groups per row (the cases above have one, K = 128 = group): group 32,
    # below every BLOCK_K in the spaces (each K step's groups broadcast), at every dtype, and 64.
    for rows in (16, 48):
        cases += [c for dtype in FLOAT_DTYPES for c in int4_cases(tensor(rows, 256, dtype=dtype), 40, False, 32)]
        cases += int4_cases(tensor(rows, 256, dtype=bf16), 40, False, 64)
    for x in (tensor(1, 128, dtype=bf16), misaligned(7, 72, bf16), misaligned(33, 72, bf16)):
        cases += _linear_cases(x, False) + int8_quantize_cases(x, False) + fp8_quantize_cases(x, e4m3, False)
    cases += fp8_mm_cases(tensor(48, 128, dtype=e4m3), 40, e4m3, bf16, False, row_scales=False)  # stride 0
    # Window attention: Swin-T's 7x7 windows with the shift mask (by b % nW; by mask_index in
    # Swin's qkv layout), the smallest tile without bias or mask, d = 128 over two query
    # blocks, Swin-B's 12x12 windows over five, and the widest tile. In IEEE fp32 (the default: no TF32) the last
    # two unroll their dots into 1 to 2.5 MB of PTX that ptxas takes minutes over: fp32 is
    # compiled there with TF32 allowed. fp16 takes bf16's code path: two tiles; the mask_index and
    # qkv-view variant at bf16 only.
    for dtype in FLOAT_DTYPES:
        fp32 = dtype == torch.float32
        cases += window_attention_cases(8, 3, 49, 32, dtype, True, 4, False)
        if dtype == torch.bfloat16:
            cases += window_attention_cases(8, 3, 49, 32, dtype, True, 4, True, swin_layout=True)
        if dtype != torch.float16:
            cases += window_attention_cases(2, 2, 16, 16, dtype, False, 0, False)
            cases += window_attention_cases(2, 4, 144, 32, dtype, True, 2, False, tf32=fp32)
        cases += window_attention_cases(2, 2, 100, 128, dtype, True, 2, False, tf32=fp32)
    # W8A8 past the int32-exact K: the CHUNKED variant.
    cases += int8_cases(tensor(16, (1 << 17) + 64), 40, True, True)
    # SmoothQuant's divisor fused into the quantizer and the Inf-row recompute, bf16 and fp32.
    for dtype in (bf16, torch.float32):
        cases += int8_cases(misaligned(33, 72, dtype), 40, True, True, smoothed=True)
    # The widest tile, fp32 at N = 256 and d = 128: the query blocks shrink to fit sm_80.
    cases += window_attention_cases(2, 2, 256, 128, torch.float32, True, 2, False, tf32=True)
    return cases


# --- from calls to compiled kernels --------------------------------------------------------

class Spec(NamedTuple):
    """A kernel to compile: a recorded launch, the config to compile it with, the target."""
    launch: object               # _autotune.Launch
    config: object               # triton.Config
    arch: int
    case: str                    # the label of the case that made the launch

    def describe(self) -> str:
        return f"{self.launch.kernel.name} [{self.config}] on sm_{self.arch} for {self.case}"


def launches(case: Case) -> Dict[Tuple, object]:
    """The distinct launches ``case`` makes, by (kernel, specialisation): one per autotuned
    kernel and run-time specialisation, holding the first config of its kernel's list."""
    with planning() as plan:
        case.run()
    out: Dict[Tuple, object] = {}
    for (_, _, runtime, constexprs), launch in plan.compiles.items():
        out.setdefault((id(launch.kernel), runtime, constexprs), launch)
    return out


def test_specs() -> List[Spec]:
    """The compile test's specs: every launch of :func:`test_cases` at its kernel's first
    config, and each kernel's whole space and test config at its first launch, for every
    arch its case names."""
    specs, seen, tuned = [], set(), set()
    for case in test_cases():
        for key, launch in launches(case).items():
            if key in seen:
                continue
            seen.add(key)
            kernel = launch.kernel
            configs = [kernel.space[0]]
            if id(kernel) not in tuned:
                tuned.add(id(kernel))
                configs = list(kernel.space) + [kernel.test_config]
            specs += [Spec(launch, config, arch, case.label) for config in configs for arch in case.archs]
    return specs


def compile_spec(spec: Spec):
    """The ``triton.compiler.CompiledKernel`` of ``spec``, built as JITFunction.run builds
    it on a device of ``spec.arch``: the binder's specialisation of the recorded arguments,
    the config's meta-parameters and options (num_warps, num_stages, ...)."""
    target = GPUTarget("cuda", spec.arch, 32)
    backend = make_backend(target)
    jit = spec.launch.kernel.fn
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {**spec.config.all_kwargs(), "debug": jit.debug or knobs.runtime.debug,
              "instrumentation_mode": knobs.compilation.instrumentation_mode}
    bound, specialization, options = binder(**spec.launch.arguments, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)


# --- what a compiled kernel needs ------------------------------------------------------------

def nvidia_tool(name: str) -> str:
    """The path of a CUDA binary tool (cuobjdump, ptxas, nvdisasm) that Triton ships."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def read_cubin(tool: str, cubin: bytes, *flags: str) -> str:
    """The output of Triton's ``tool`` (cuobjdump, nvdisasm) with ``flags`` on ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvidia_tool(tool), *flags, f.name], check=True,
                              capture_output=True, text=True).stdout


class Usage(NamedTuple):
    """What one block of a compiled kernel takes."""
    registers: int      # per thread
    shared: int         # bytes: Triton's dynamic shared memory plus the cubin's static
    warps: int


def usage(kernel) -> Usage:
    """The resources of a ``CompiledKernel``, from ``cuobjdump --dump-resource-usage``."""
    text = read_cubin("cuobjdump", kernel.asm["cubin"], "--dump-resource-usage")
    fields = dict(re.findall(r"\b(REG|SHARED):(\d+)", text))
    return Usage(int(fields["REG"]), kernel.metadata.shared + int(fields["SHARED"]), kernel.metadata.num_warps)


def _round_up(n: int, unit: int) -> int:
    return cdiv(n, unit) * unit


def ctas_per_sm(use: Usage, target: Target) -> Dict[str, int]:
    """Resident blocks per SM allowed by each resource (the CUDA occupancy calculator's
    rules: registers allocated per warp in 256s within each of 4 sub-partitions, shared
    memory in 128-byte units plus the 1 KB reserved per block), and the least of them."""
    per_warp = _round_up(max(use.registers, 1) * 32, target.register_granularity)
    warps_by_registers = target.sub_partitions * (target.registers_per_sm // target.sub_partitions // per_warp)
    per_cta_shared = _round_up(use.shared + target.reserved_shared_per_cta, target.shared_granularity)
    limits = {"registers": warps_by_registers // use.warps,
              "shared": target.shared_per_sm // per_cta_shared,
              "warps": target.warps_per_sm // use.warps,
              "ctas": target.ctas_per_sm}
    limits["resident"] = min(limits.values())
    return limits


def launch_problems(kernel, target: Target) -> List[str]:
    """Why ``kernel`` cannot launch on ``target`` (empty when it can): more shared memory
    than a block may have, or more registers x threads than an SM has."""
    use = usage(kernel)
    problems = []
    if use.shared > target.shared_per_block:
        problems.append(f"{use.shared} bytes of shared memory > {target.shared_per_block} per block")
    if ctas_per_sm(use, target)["registers"] < 1:
        problems.append(f"{use.registers} registers x {32 * use.warps} threads do not fit "
                        f"{target.registers_per_sm} registers")
    return problems


class Outcome(NamedTuple):
    problem: Optional[str]  # None: compiles and can launch
    seconds: float          # the compile's wall time (0 when Triton's cache had it)


def check(spec: Spec) -> Outcome:
    """Whether ``spec`` compiles and can launch on its target, and how long it took."""
    start = time.perf_counter()
    try:
        kernel = compile_spec(spec)
    except Exception as error:  # noqa: BLE001 - reported with the spec
        lines = traceback.format_exception_only(type(error), error)
        return Outcome(f"{spec.describe()}: does not compile: {''.join(lines).strip()[-2000:]}",
                       time.perf_counter() - start)
    seconds = time.perf_counter() - start
    problems = launch_problems(kernel, TARGETS[spec.arch])
    return Outcome(f"{spec.describe()}: cannot launch: {'; '.join(problems)}" if problems else None, seconds)


_POOL_WORK: Tuple[Callable, List[Spec]] = (check, [])  # set before the pool forks; workers take indices


def _run_index(i: int):
    function, specs = _POOL_WORK
    return function(specs[i])


def pool_map(function: Callable[[Spec], object], specs: Sequence[Spec], processes: Optional[int] = None) -> list:
    """[function(spec) for spec in specs], on a fork pool over every core: one compile per
    core at a time (the forked workers inherit the specs; results come back pickled)."""
    global _POOL_WORK
    _POOL_WORK = (function, list(specs))
    with multiprocessing.get_context("fork").Pool(processes or os.cpu_count()) as pool:
        return pool.map(_run_index, range(len(specs)), chunksize=1)


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparqle.bench.kernel_specs", description=(
        "Compile every Triton kernel at the compile test's specs (tests/test_triton_compile.py) "
        "for sm_80 and sm_90 and report those that do not compile or cannot launch."))
    parser.add_argument("--list", action="store_true", help="print the specs instead of compiling them")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    specs = test_specs()
    if args.list:
        print("\n".join(s.describe() for s in specs))
        return 0
    outcomes = pool_map(check, specs)
    problems = [o.problem for o in outcomes if o.problem is not None]
    slowest = sorted(zip(outcomes, specs), key=lambda pair: -pair[0].seconds)[:8]
    print("slowest compiles:", *(f"  {o.seconds:6.1f} s  {s.describe()}" for o, s in slowest), sep="\n")
    print(*problems, sep="\n")
    print(f"compiled {len(specs)} specs in {sum(o.seconds for o in outcomes):.0f} s of compiling: "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

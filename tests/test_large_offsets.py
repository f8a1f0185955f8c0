"""Offsets past 2^31 elements: every Triton kernel forms index * stride in int64 where it can
pass 2^31 (a 128K-token x 16K-feature activation, a 128K x 16K lm_head), checked in Triton's
interpreter, whose int32 arithmetic wraps as a GPU's does.

No case allocates gigabytes: each operand is a ``far`` view, a copy of small data laid out
in a fresh storage of just over 2^31 elements with a stride below 2^31 (so that Triton
passes it as an int32) that puts its last row, column or token at offset 2^31 or more.
Only the view's own elements are written; the rest of the storage is pages never touched.
Outputs that a launcher allocates are laid out the same way (``far_outputs``), so that the
kernel's stores reach past 2^31 too. Results are compared against the float64 oracle of the
gathered small operands (or the exact rule, for quantizers and copies).

A wrapped offset reads or writes far outside the tensor (a crash, or a wrong result), so
each op family runs in its own subprocess: a crash fails that family alone. Launchers are
called directly, so that each operand reaches the kernel with the strides given here.
"""
import contextlib
import functools
import math
import os
import pathlib
import subprocess
import sys
from typing import Optional

import pytest
import torch

from sparqle.formats._checks import cdiv
from sparqle.kernels import _alloc

from ._oracle import assert_close

FAR = 2**31  # the first element offset a signed 32-bit integer cannot hold
F16 = torch.float16


def far(data: torch.Tensor, dim: int) -> torch.Tensor:
    """A copy of ``data`` whose index ``data.shape[dim] - 1`` along ``dim`` sits at element
    offset >= 2^31, through a stride < 2^31; the other dimensions are packed row-major inside
    one step of that stride. Only the view's elements of its fresh storage are written."""
    size = data.shape[dim]
    inner = data.shape[:dim] + data.shape[dim + 1:]
    step = cdiv(FAR, size - 1) if size > 1 else FAR
    block = math.prod(inner)
    assert block <= step < FAR, f"far({tuple(data.shape)}, {dim}): needs >= 3 indices and a small rest"
    strides = [math.prod(inner[i + 1:]) for i in range(len(inner))]
    strides.insert(dim, step)
    view = torch.empty((size - 1) * step + block, dtype=data.dtype).as_strided(data.shape, strides)
    view.copy_(data)
    return view


class KeepLayout(torch.Tensor):
    """A tensor whose ``.contiguous()`` is itself: it carries a far layout through a
    launcher's ``.contiguous()``, standing in for a contiguous operand of more than 2^31
    elements (whose row offsets, row * row stride, pass 2^31 the same way)."""

    def contiguous(self, *args, **kwargs):
        return self


@contextlib.contextmanager
def far_outputs(*specs):
    """While active, a launcher's ``_alloc.empty(shape, dtype, ...)`` matching one of
    ``specs`` ((shape, dtype, dim) each) returns a poisoned ``far`` view along ``dim``. Yields
    the list of those views (appended as they are made), for the caller to check that the
    launcher returned them."""
    original, made = _alloc.empty, []
    wanted = {(tuple(shape), dtype): dim for shape, dtype, dim in specs}

    def empty(shape, dtype, device):
        dim = wanted.pop((tuple(shape), dtype), None)
        if dim is None:
            return original(shape, dtype, device)
        poisoned = torch.empty(tuple(shape), dtype=dtype)  # as _alloc poisons
        poisoned.fill_(float("nan") if dtype.is_floating_point else -1)
        made.append(far(poisoned, dim))
        return made[-1]

    _alloc.empty = empty
    try:
        yield made
    finally:
        _alloc.empty = original
    assert not wanted, f"no launcher allocated {sorted(wanted)}"


def assert_is(out: torch.Tensor, placed: torch.Tensor, what: str) -> None:
    """The launcher returned the far output itself (so the kernel stored through it)."""
    assert out.data_ptr() == placed.data_ptr() and out.stride() == placed.stride(), \
        f"{what}: the output is not the far view the launcher was given"


def assert_linear(y, x, w64, what, col_scale=None, row_scale=None):
    """y == (x @ w64^T) * col_scale[n] * row_scale[m] in y's dtype (float64 oracle)."""
    x64 = x.double()
    ones = torch.ones(1, dtype=torch.float64)
    s = (ones if col_scale is None else col_scale.double())[None, :] * \
        (ones if row_scale is None else row_scale.double())[:, None]
    assert_close(y, (x64 @ w64.T) * s, (x64.abs() @ w64.abs().T) * s.abs(), y.dtype, what)


# ---- the checks, by op family (each family run in a subprocess by test_offsets_past_2_31) -----


def _csr():
    """A 5 x 6 fp16 CSR with its dense form, an x [3, 6] and a bias [5]."""
    from sparqle import CSR

    from ._oracle import random_sparse
    dense = random_sparse(5, 6, 0.6, F16)
    return CSR.from_dense(dense), dense, torch.randn(3, 6, dtype=F16), torch.randn(5, dtype=F16)


def csr_linear_far(dim):
    """x, y (through y^T's strides) and the bias with their index ``dim`` (the rows of x and
    y, or the columns of x and y and the bias's entries) past 2^31."""
    from sparqle.kernels.triton.spmm_csr import csr_linear
    a, dense, x, bias = _csr()
    with far_outputs(((3, 5), F16, dim)) as placed:
        y = csr_linear(far(x, dim), a.crow_indices, a.col_indices, a.values, a.row_order,
                       far(bias, 0) if dim else bias)
    assert_is(y, placed[0], "csr_linear")
    x64 = x.double()
    assert_close(y, x64 @ dense.double().T + bias.double(), x64.abs() @ dense.double().abs().T + bias.double().abs(),
                 F16, f"csr_linear: dim {dim} of x and y past 2^31")


def csr_linear_nonzeros_up_to_2_31():
    """The last row of a CSR with nnz = 2^31 - 1: its last chunk of nonzeros ends past 2^31
    (the kernel reads only crow[row] and crow[row + 1], so the other rows are left out)."""
    from sparqle.kernels.triton.spmm_csr import csr_linear
    _, _, x, _ = _csr()
    nnz = FAR - 1
    col, values = torch.empty(nnz, dtype=torch.int32), torch.empty(nnz, dtype=F16)
    col[-4:] = torch.tensor([0, 2, 3, 5], dtype=torch.int32)
    values[-4:] = torch.randn(4, dtype=F16)
    crow = torch.tensor([nnz - 4, nnz], dtype=torch.int32)
    y = csr_linear(x, crow, col, values, torch.zeros(1, dtype=torch.int32), None)
    row = torch.zeros(1, 6, dtype=F16)
    row[0, col[-4:].long()] = values[-4:]
    assert_linear(y, x, row.double(), "csr_linear: nonzeros up to index 2^31 - 1")


def csr_sddmm(x_dim, y_dim):
    from sparqle.kernels.triton.spmm_csr import sddmm_csr
    a, _, _, _ = _csr()
    x, y = torch.randn(5, 3, dtype=F16), torch.randn(6, 3, dtype=F16)
    rows = torch.repeat_interleave(torch.arange(5), a.crow_indices.diff().long())
    x_rows, y_rows = x.double()[rows], y.double()[a.col_indices.long()]
    out = sddmm_csr(a.crow_indices, a.col_indices, far(x, x_dim), far(y, y_dim))
    assert_close(out, (x_rows * y_rows).sum(1), (x_rows.abs() * y_rows.abs()).sum(1), F16,
                 f"sddmm_csr: dim {x_dim} of x and dim {y_dim} of y past 2^31")


def _bell():
    """A 32 x 32 fp16 Blocked-ELL of 16 x 16 blocks (one unused slot), its dense float64
    form, and an x [3, 32]."""
    from sparqle import BlockedELL
    w = torch.randn(32, 32, dtype=F16)
    w[:16, 16:] = 0
    a = BlockedELL.from_dense(w, 16)
    return a, a.to_dense().double(), torch.randn(3, 32, dtype=F16)


def bell_linear_far_rows():
    from sparqle.kernels.triton.spmm_bell import bell_linear
    a, w64, x = _bell()
    with far_outputs(((3, 32), F16, 0)) as placed:
        out = bell_linear(far(x, 0), a.ell_cols, a.values, None, 32)
    assert_is(out, placed[0], "bell_linear")
    assert_linear(out, x, w64, "bell_linear: rows of x and y past 2^31")


def bell_linear_far_columns():
    """The columns of x, of y and the entries of the bias past 2^31."""
    from sparqle.kernels.triton.spmm_bell import bell_linear
    a, w64, x = _bell()
    bias = torch.randn(32, dtype=F16)
    with far_outputs(((3, 32), F16, 1)) as placed:
        out = bell_linear(far(x, 1), a.ell_cols, a.values, far(bias, 0), 32)
    assert_is(out, placed[0], "bell_linear")
    x64, b64 = x.double(), bias.double()
    assert_close(out, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), F16,
                 "bell_linear: columns of x and y and the bias past 2^31")


def bell_matmul_far_columns():
    from sparqle.kernels.triton.spmm_bell import bell_matmul
    a, w64, x = _bell()
    t_cols, t_slots = a.transposed_structure()
    assert_linear(bell_matmul(far(x, 1), t_cols, t_slots, a.values, 32), x, w64.T,
                  "bell_matmul: columns of x past 2^31")


def bell_sddmm(dy_dim, x_dim):
    from sparqle.kernels.triton.spmm_bell import sddmm_bell
    a, _, x = _bell()
    dy = torch.randn(3, 32, dtype=F16)
    used = (a.ell_cols >= 0)[..., None, None]

    def blocks(t):  # t [32, 32] at the stored blocks: [2, W, 16, 16], zero where unused
        return torch.stack([torch.stack([t[16 * r:16 * r + 16, 16 * max(c, 0):16 * max(c, 0) + 16]
                                         for c in a.ell_cols[r].tolist()]) for r in range(2)]) * used

    dvalues = sddmm_bell(a.ell_cols, far(dy, dy_dim), far(x, x_dim), 16)
    assert_close(dvalues, blocks(dy.double().T @ x.double()), blocks(dy.double().abs().T @ x.double().abs()),
                 F16, f"sddmm_bell: dim {dy_dim} of dy and dim {x_dim} of x past 2^31")


def _int4():
    from sparqle import Int4Weight
    qw = Int4Weight.from_float(torch.randn(17, 64, dtype=F16), group_size=32)
    return qw, qw.dequantize().double(), torch.randn(17, 64, dtype=F16)


def int4_tiled_far_rows():
    from sparqle.kernels.triton.int4_linear import int4_linear
    qw, w64, x = _int4()
    packed, scales, zeros = (far(t, 0).as_subclass(KeepLayout) for t in (qw.packed, qw.scales, qw.zeros))
    with far_outputs(((17, 17), F16, 0)) as placed:  # 17 rows: the tiled path
        y = int4_linear(far(x, 0), packed, scales, zeros, None, 32)
    assert_is(y, placed[0], "int4_linear")
    assert_linear(y, x, w64, "int4_linear: rows of x, W and y past 2^31")


def int4_split_k_far_columns():
    from sparqle.kernels.triton.int4_linear import int4_linear
    qw, w64, x = _int4()
    y = int4_linear(far(x[:3], 1), qw.packed, qw.scales, qw.zeros, None, 32)  # 3 rows: split-K
    assert_linear(y, x[:3], w64, "int4_linear: columns of x past 2^31")


def int8_quantize_rows():
    from sparqle.kernels.triton.int8_linear import quantize_rows

    from .test_int8_linear import quantize_rows_rule
    x = torch.randn(4, 5, dtype=F16) * 3
    with far_outputs(((4, 5), torch.int8, 0)) as placed:
        q, scale = quantize_rows(far(x, 1), None)
    assert_is(q, placed[0], "int8 quantize_rows")
    expected_q, expected_scale = quantize_rows_rule(x)
    assert torch.equal(q.float(), expected_q) and torch.equal(scale, expected_scale), \
        "int8 quantize_rows: columns of x and rows of q past 2^31"


def _int8():
    from sparqle import Int8Weight
    return Int8Weight.from_float(torch.randn(3, 8, dtype=F16)), torch.randn(3, 8, dtype=F16)


def int8_w8a16_far_rows():
    from sparqle.kernels.triton.int8_linear import int8_linear
    qw, x = _int8()
    with far_outputs(((3, 3), F16, 0)) as placed:
        y = int8_linear(far(x, 0), far(qw.qweight, 0), qw.scales, None, False)
    assert_is(y, placed[0], "int8_linear")
    assert_linear(y, x, qw.qweight.double(), "int8_linear W8A16: rows of x, W and y past 2^31", qw.scales)


def int8_w8a16_far_columns():
    from sparqle.kernels.triton.int8_linear import int8_linear
    qw, x = _int8()
    y = int8_linear(far(x, 1), far(qw.qweight, 1), qw.scales, None, False)
    assert_linear(y, x, qw.qweight.double(), "int8_linear W8A16: columns of x and W past 2^31", qw.scales)


def int8_w8a8_far_rows():
    from sparqle.kernels.triton.int8_linear import int8_linear

    from .test_int8_linear import quantize_rows_rule
    qw, x = _int8()
    with far_outputs(((3, 3), F16, 0)) as placed:
        y = int8_linear(x, far(qw.qweight, 0), qw.scales, None, True)
    assert_is(y, placed[0], "int8_linear W8A8")
    q_x, s_x = quantize_rows_rule(x)
    assert_linear(y, q_x, qw.qweight.double(), "int8_linear W8A8: rows of W and y past 2^31", qw.scales, s_x)


def _nm():
    from sparqle import SemiStructured
    w = SemiStructured.from_dense(torch.randn(17, 96, dtype=F16), 2, 4)  # meta: 3 words a row
    return w, w.to_dense().double(), torch.randn(17, 96, dtype=F16)


def nm_tiled_far_rows():
    from sparqle.kernels.triton.nm_linear import nm_linear
    w, w64, x = _nm()
    with far_outputs(((17, 17), F16, 0)) as placed:  # 17 rows: the tiled path
        y = nm_linear(far(x, 0), far(w.values, 0), far(w.meta, 0), None, 2, 4)
    assert_is(y, placed[0], "nm_linear")
    assert_linear(y, x, w64, "nm_linear: rows of x, values, meta and y past 2^31")


def nm_split_k_far_columns():
    from sparqle.kernels.triton.nm_linear import nm_linear
    w, w64, x = _nm()
    y = nm_linear(far(x[:3], 1), far(w.values, 1), far(w.meta, 1), None, 2, 4)  # 3 rows: split-K
    assert_linear(y, x[:3], w64, "nm_linear: columns of x, values and meta past 2^31")


def nm_to_dense_far_rows():
    from sparqle.kernels.triton.nm_linear import to_dense
    w, _, _ = _nm()
    with far_outputs(((17, 96), F16, 0)) as placed:
        dense = to_dense(far(w.values, 0), far(w.meta, 0), 2, 4, 96)
    assert_is(dense, placed[0], "nm to_dense")
    assert torch.equal(dense, w.to_dense()), "nm to_dense: rows of values, meta and W past 2^31"


E4M3 = torch.float8_e4m3fn


def fp8_quantize_rows():
    from sparqle.kernels.triton.fp8_linear import quantize_rows

    from .test_fp8_linear import rule
    x = torch.randn(4, 5, dtype=F16) * 3
    with far_outputs(((4, 5), torch.uint8, 0)) as placed:  # q is written as bytes
        q, scale = quantize_rows(far(x, 1), None, E4M3)
    assert_is(q, placed[0], "fp8 quantize_rows")
    expected_q, expected_scale = rule(x, E4M3)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)) and torch.equal(scale, expected_scale), \
        "fp8 quantize_rows: columns of x and rows of q past 2^31"


def _fp8():
    from .test_fp8_linear import rule
    b, b_scale = rule(torch.randn(3, 8), E4M3)
    return b, b_scale, torch.randn(3, 8, dtype=F16)


def fp8_weight_only_far_rows():
    from sparqle.kernels.triton.fp8_linear import scaled_mm
    b, b_scale, a = _fp8()
    with far_outputs(((3, 3), F16, 0)) as placed:
        y = scaled_mm(far(a, 0), None, far(b, 0), far(b_scale, 0), None, F16)
    assert_is(y, placed[0], "fp8 scaled_mm")
    assert_linear(y, a, b.double(), "fp8 scaled_mm weight-only: rows of a, b, b_scale and y past 2^31", b_scale)


def fp8_scaled_far_columns():
    from sparqle.kernels.triton.fp8_linear import scaled_mm

    from .test_fp8_linear import rule
    b, b_scale, a = _fp8()
    q_a, a_scale = rule(a, E4M3)
    y = scaled_mm(far(q_a, 1), far(a_scale, 0), far(b, 1), b_scale, None, F16)
    assert_linear(y, q_a, b.double(), "fp8 scaled_mm FP8 x FP8: columns of a and b, a_scale past 2^31",
                  b_scale, a_scale)


def _qkv():
    return tuple(torch.randn(2, 2, 5, 5, dtype=F16) for _ in range(3))


def window_attention_forward(dim):
    from sparqle.kernels.triton.window_attention import window_attention

    from .test_window_attention import oracle, rounded_for_dot
    q, k, v = _qkv()
    out, _ = window_attention(far(q, dim), far(k, dim), far(v, dim), None, None, None, 0.5)
    expected, p = oracle(q, k, v, None, None, None, 0.5)
    assert_close(out, expected, rounded_for_dot(p, F16) @ v.double().abs(), F16, f"window_attention: dim {dim} of q, k, v past 2^31")


def window_attention_backward(dim):
    from sparqle.kernels.triton import window_attention as kernels

    from .test_window_attention import oracle_grads
    q, k, v = _qkv()
    out, lse = kernels.window_attention(q, k, v, None, None, None, 0.5)
    dout = torch.randn_like(out)
    grads = kernels.window_attention_backward(dout, far(q, dim), far(k, dim), far(v, dim), out, lse,
                                              None, None, None, 0.5)
    expected, scales = oracle_grads(q, k, v, None, None, None, 0.5, dout)
    for name, got in zip(("dq", "dk", "dv"), grads):
        assert_close(got, expected[name], scales[name], F16,
                     f"window_attention_backward: dim {dim} of q, k, v past 2^31: {name}")


def window_partition_far_channels_and_tokens():
    from sparqle.kernels.triton.window_attention import window_partition

    from .test_window_partition import swin_partition
    x = torch.randn(1, 3, 4, 3, dtype=F16)  # 2 x 2 windows, shifted: 4 windows of 4 tokens
    with far_outputs(((4, 4, 3), F16, 1)) as placed:
        windows = window_partition(far(x, 3), 2, 2, 1, 1, None)
    assert_is(windows, placed[0], "window_partition")
    assert torch.equal(windows.double(), swin_partition(x, (2, 2), (1, 1)).reshape(4, 4, 3)), \
        "window_partition: channels of x and tokens of the windows past 2^31"


def window_merge_far_channels():
    from sparqle.kernels.triton.window_attention import window_merge

    from .test_window_partition import merge_oracle
    x, windows = torch.randn(1, 3, 4, 3, dtype=F16), torch.randn(4, 4, 3, dtype=F16)
    with far_outputs(((1, 3, 4, 3), F16, 3)) as placed:
        merged = window_merge(far(windows, 2), x, 2, 2, 1, 1, None)
    assert_is(merged, placed[0], "window_merge")
    assert torch.equal(merged.double(), merge_oracle(windows, x, (2, 2), (1, 1), None)), \
        "window_merge: channels of the windows and of the output past 2^31"


FAMILIES = {
    "spmm_csr": [functools.partial(csr_linear_far, 0), functools.partial(csr_linear_far, 1),
                 csr_linear_nonzeros_up_to_2_31,
                 functools.partial(csr_sddmm, 1, 0), functools.partial(csr_sddmm, 0, 1)],
    "spmm_bell": [bell_linear_far_rows, bell_linear_far_columns, bell_matmul_far_columns,
                  functools.partial(bell_sddmm, 0, 1), functools.partial(bell_sddmm, 1, 0)],
    "int4": [int4_tiled_far_rows, int4_split_k_far_columns],
    "int8": [int8_quantize_rows, int8_w8a16_far_rows, int8_w8a16_far_columns, int8_w8a8_far_rows],
    "nm": [nm_tiled_far_rows, nm_split_k_far_columns, nm_to_dense_far_rows],
    "fp8": [fp8_quantize_rows, fp8_weight_only_far_rows, fp8_scaled_far_columns],
    "window_attention": [functools.partial(check, dim) for check in (window_attention_forward, window_attention_backward)
                         for dim in (2, 3)],  # tokens, then features, past 2^31
    "window_copy": [window_partition_far_channels_and_tokens, window_merge_far_channels],
}


def run_checks(family: str, only: Optional[int] = None) -> None:
    """Run ``family``'s checks (or its check number ``only``): the subprocess's entry point."""
    checks = FAMILIES[family]
    for check in checks if only is None else checks[only:only + 1]:
        check()


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_offsets_past_2_31(family):
    env = {**os.environ, "TRITON_INTERPRET": "1", "SPARQLE_POISON": "1"}
    env.pop("SPARQLE_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c",
         f"from tests.test_large_offsets import run_checks; run_checks({family!r})"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"{family} exited with {result.returncode} (negative: killed by that signal, as a wrapped "
        f"offset's wild address does)\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")

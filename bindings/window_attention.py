"""sparqle::window_attention (fused Swin window attention, with its backward op) and
sparqle::window_partition / sparqle::window_merge (the window layout).

window_attention(q, k, v, bias, mask, mask_index, scale, table=None) -> (out [B_, heads, N, d],
    lse [B_, heads, N]): out = softmax(q k^T * scale + bias[h] + mask[m(b)]) v, m(b) =
    mask_index[b] or b % nW; lse (fp32, fp64 for fp64) is saved for the backward. ``table``,
    when given, is score_table(bias, mask) kept by the caller (a layer builds it once per
    bias and mask): the kernels read bias plus mask from it; when it is None the Triton path
    makes one and keeps it while bias and mask are unchanged. bias still carries the gradient.
window_attention_backward(dout, q, k, v, out, lse, bias, mask, mask_index, scale, table=None)
    -> (dq, dk, dv, dbias); dbias is empty [0] without a bias. The mask and the table get no
    gradient.
window_partition(x, wh, ww, sh, sw, index) -> windows [B * K, wh * ww, C]
window_merge(windows, x, wh, ww, sh, sw, index) -> out [B, H, W, C]

The ops check the values of mask_index (in [0, nW)) and index (in [0, windows per image),
distinct in each row) where they run, so that the checks hold under torch.compile too (the
ops are opaque to it): ValueError, read on the host (a device sync) eagerly; while a CUDA
graph is captured, where nothing may be read, asserted on the device instead.

Gradients of the layout ops are the layout ops: partition's is a merge of the window
gradients into zeros; merge's is, for the windows, a partition of the output gradient, and
for x, the output gradient with the merged windows' pixels zeroed (a merge of zeros).
"""
from typing import Optional, Tuple

import torch

from sparqle.formats._checks import cdiv, compute_dtype
from sparqle.kernels import _capture
from sparqle.kernels._capture import check_values
from sparqle.kernels._derived import derived

from ._autograd import register_autograd
from ._backend import FLOATS, choose, kernels, launch

DTYPES = {"triton": FLOATS - {torch.float64}, "torch": FLOATS}
_MODULE = "window_attention"


def _check_in_range(name: str, t: torch.Tensor, high: int) -> None:
    if t.numel():
        check_values(lambda: ((t >= 0) & (t < high)).all(), f"{name} holds values outside [0, {high})")


def _check_index(index: Optional[torch.Tensor], x: torch.Tensor, wh: int, ww: int) -> None:
    """index [B, K]: window ids of x's images, in range and distinct per image."""
    if index is None:
        return
    _check_in_range("index", index, cdiv(x.shape[1], wh) * cdiv(x.shape[2], ww))
    if index.shape[1] > 1:
        check_values(lambda: (index.sort(dim=1).values.diff(dim=1) != 0).all(),
                     "index names a window twice in one image")


def score_table(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """bias plus mask as the kernels read them: sparqle.kernels.triton.window_attention's
    score_table, whose layout (rows padded to its blocks) the Triton kernels set; the torch
    path reads its first N rows and columns."""
    return kernels("triton", _MODULE).score_table(bias, mask, dtype)


def reads_score_table(q: torch.Tensor) -> bool:
    """Whether window_attention on q runs on the Triton kernels, which read the score table
    (a layer keeps one for them); the torch path adds bias and mask as they are. While
    torch.compile traces, the backend is chosen when the graph runs: the table goes into
    the graph."""
    return _capture.tracing() or choose("window_attention", q.device, q.dtype, DTYPES) == "triton"


def _check_table(table: Optional[torch.Tensor], q: torch.Tensor, bias: Optional[torch.Tensor],
                 mask: Optional[torch.Tensor]) -> None:
    """table: the shape, dtype and device score_table(bias, mask) gives for q (its values,
    bias plus mask, are the caller's to keep in step)."""
    if table is None:
        return
    size = kernels("triton", _MODULE).table_size(q.shape[2])
    shape = (mask.shape[0] if mask is not None else 1, q.shape[1] if bias is not None else 1, size, size)
    if tuple(table.shape) != shape:
        raise ValueError(f"table must have the shape score_table(bias, mask) gives, {shape}, "
                         f"got {tuple(table.shape)}")
    if table.dtype != compute_dtype(q.dtype):
        raise TypeError(f"table must be {compute_dtype(q.dtype)} for q of {q.dtype}, got {table.dtype}")
    if table.device != q.device:
        raise ValueError(f"table is on {table.device} but q is on {q.device}")


def _table(table: Optional[torch.Tensor], q: torch.Tensor, bias: Optional[torch.Tensor],
           mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The caller's table; else, where the Triton kernels run, score_table(bias, mask) kept
    while bias and mask are the same tensors, unmodified (kernels._derived), so that the
    backward, and calls again with the same bias and mask, do not make it again."""
    if table is not None or (bias is None and mask is None) or not reads_score_table(q):
        return table
    sources = [t for t in (bias, mask) if t is not None]
    return derived(table_name(bias, mask), lambda: score_table(bias, mask, torch.float32), *sources)


def table_name(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> str:
    """What _table keeps its tables under (kernels._derived), per (bias, mask)."""
    return "window_attention score table of " + " and ".join(
        name for name, t in (("bias", bias), ("mask", mask)) if t is not None)


@torch.library.custom_op("sparqle::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor], mask_index: Optional[torch.Tensor],
                     scale: float, table: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if mask is not None and mask_index is not None:
        _check_in_range("mask_index", mask_index, mask.shape[0])
    _check_table(table, q, bias, mask)
    return launch(_MODULE, "window_attention", DTYPES, q, q, k, v, bias, mask, mask_index, scale,
                  _table(table, q, bias, mask))


@window_attention.register_fake
def _(q, k, v, bias, mask, mask_index, scale, table=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=compute_dtype(q.dtype))


@torch.library.custom_op("sparqle::window_attention_backward", mutates_args=())
def window_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, bias: Optional[torch.Tensor],
                              mask: Optional[torch.Tensor], mask_index: Optional[torch.Tensor],
                              scale: float, table: Optional[torch.Tensor] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch(_MODULE, "window_attention_backward", DTYPES, q,
                  dout, q, k, v, out, lse, bias, mask, mask_index, scale, _table(table, q, bias, mask))


@window_attention_backward.register_fake
def _(dout, q, k, v, out, lse, bias, mask, mask_index, scale, table=None):
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty((0,))
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias


def _attention_setup(ctx, inputs, output):
    q, k, v, bias, mask, mask_index, scale, table = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, output[0], output[1], bias, mask, mask_index, table)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, mask, mask_index, table = ctx.saved_tensors
    dq, dk, dv, dbias = torch.ops.sparqle.window_attention_backward(
        grad_out, q, k, v, out, lse, bias, mask, mask_index, ctx.scale, table)
    return dq, dk, dv, (dbias if ctx.needs_input_grad[3] else None), None, None, None, None


register_autograd(window_attention, _attention_backward, _attention_setup)


def _windows_shape(x: torch.Tensor, wh: int, ww: int, index: Optional[torch.Tensor]):
    b, h, w, c = x.shape
    per_image = index.shape[1] if index is not None else cdiv(h, wh) * cdiv(w, ww)
    return (b * per_image, wh * ww, c)


@torch.library.custom_op("sparqle::window_partition", mutates_args=())
def window_partition(x: torch.Tensor, wh: int, ww: int, sh: int, sw: int,
                     index: Optional[torch.Tensor]) -> torch.Tensor:
    _check_index(index, x, wh, ww)
    return launch(_MODULE, "window_partition", DTYPES, x, x, wh, ww, sh, sw, index)


@window_partition.register_fake
def _(x, wh, ww, sh, sw, index):
    return x.new_empty(_windows_shape(x, wh, ww, index))


@torch.library.custom_op("sparqle::window_merge", mutates_args=())
def window_merge(windows: torch.Tensor, x: torch.Tensor, wh: int, ww: int, sh: int, sw: int,
                 index: Optional[torch.Tensor]) -> torch.Tensor:
    _check_index(index, x, wh, ww)
    return launch(_MODULE, "window_merge", DTYPES, x, windows, x, wh, ww, sh, sw, index)


@window_merge.register_fake
def _(windows, x, wh, ww, sh, sw, index):
    return x.new_empty(x.shape)


def _partition_setup(ctx, inputs, output):
    x, ctx.wh, ctx.ww, ctx.sh, ctx.sw, index = inputs
    ctx.x_shape = x.shape
    ctx.save_for_backward(index)


def _partition_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    zeros = grad.new_zeros(ctx.x_shape)
    return (torch.ops.sparqle.window_merge(grad.contiguous(), zeros, ctx.wh, ctx.ww, ctx.sh, ctx.sw, index),
            None, None, None, None, None)


register_autograd(window_partition, _partition_backward, _partition_setup)


def _merge_setup(ctx, inputs, output):
    windows, x, ctx.wh, ctx.ww, ctx.sh, ctx.sw, index = inputs
    ctx.windows_shape = windows.shape
    ctx.save_for_backward(index)


def _merge_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    args = (ctx.wh, ctx.ww, ctx.sh, ctx.sw, index)
    grad_windows = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_windows = torch.ops.sparqle.window_partition(grad, *args)
    if ctx.needs_input_grad[1]:
        grad_x = (torch.ops.sparqle.window_merge(grad.new_zeros(ctx.windows_shape), grad, *args)
                  if index is not None else torch.zeros_like(grad))
    return grad_windows, grad_x, None, None, None, None, None


register_autograd(window_merge, _merge_backward, _merge_setup)

"""sparqle::fp8_quantize_rows, sparqle::fp8_scaled_mm, sparqle::fp8_linear and
sparqle::fp8_training_linear (FP8 training).

fp8_quantize_rows(x, static_scale, dtype) -> (q [M, K] FP8 ``dtype``, scale [M] fp32, fp64
    for fp64 x)
fp8_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype) -> y [M, N]
    = (a @ b^T) * a_scale[m] * b_scale[n] + bias; a FP8 (a_scale [M] or [1]) or float
    (weight-only, a_scale None); b FP8 [N, K], b_scale [N] or [1].
fp8_linear(x, qweight, scales, bias) -> y [M, N] = x @ (q_w * scale_w)^T + bias: for
    M > FP8_WEIGHT_ONLY_MAX_M (sparqle.kernels.dispatch), x quantized per token to e4m3 and
    FP8 x FP8 (W8A8); for M <= FP8_WEIGHT_ONLY_MAX_M, where the GEMM is bound by reading
    the weight, x stays in its float dtype (weight-only).
    Gradients (straight through): dx = dy @ (q_w * scale_w), dbias = sum of dy; the
    quantized weight is frozen.
fp8_training_linear(x, weight, bias) -> y [M, N] = x @ W^T + bias: x and the master
    weight W [N, K] quantized per row to e4m3 each call; backward dgrad dx = dy @ W and
    wgrad dW = dy^T @ x with dy in e5m2, every operand scaled per row along its non-reduced
    axis (see docs/fp8.md); y and dx in x's dtype, dW in the weight's, dbias (the sum of
    dy) in the bias's.

Triton's FP8 kernels need compute capability >= 8.9 (the e4m3 type); ``auto`` runs older
GPUs on the torch path, and a forced ``triton`` there is an error.
"""
from typing import Optional, Tuple

import torch

from sparqle.formats._checks import compute_dtype
from sparqle.kernels.dispatch import FP8_WEIGHT_ONLY_MAX_M

from ._autograd import register_autograd, register_row_scaled_autograd
from ._backend import FLOATS, choose, kernels, requested_backend
from ._weight_op import define_weight_op

DTYPES = {"triton": FLOATS - {torch.float64}, "torch": FLOATS}
E4M3, E5M2 = getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)


def _kernels(op: str, device: torch.device, dtype: torch.dtype):
    """The kernel module that runs ``op`` for float ``dtype`` on ``device``."""
    name = choose(op, device, dtype, DTYPES)
    if name == "triton" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        if requested_backend() == "triton":
            raise ValueError(f"backend 'triton' cannot run sparqle::{op}: FP8 needs compute "
                             f"capability >= 8.9, {device} has {torch.cuda.get_device_capability(device)}")
        name = "torch"
    return kernels(name, "fp8_linear")


@torch.library.custom_op("sparqle::fp8_quantize_rows", mutates_args=())
def fp8_quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor],
                      dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels("fp8_quantize_rows", x.device, x.dtype).quantize_rows(x, static_scale, dtype)


@fp8_quantize_rows.register_fake
def _(x, static_scale, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("sparqle::fp8_scaled_mm", mutates_args=())
def fp8_scaled_mm(a: torch.Tensor, a_scale: Optional[torch.Tensor], b: torch.Tensor, b_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    return _kernels("fp8_scaled_mm", a.device, out_dtype).scaled_mm(a, a_scale, b, b_scale, bias, out_dtype)


@fp8_scaled_mm.register_fake
def _(a, a_scale, b, b_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def fp8_linear_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    k = _kernels("fp8_linear", x.device, x.dtype)
    if x.shape[0] <= FP8_WEIGHT_ONLY_MAX_M:
        return k.scaled_mm(x, None, qweight, scales, bias, x.dtype)
    q, scale = k.quantize_rows(x, None, E4M3)
    return k.redo_rows(x, scale, qweight, scales, bias, k.scaled_mm(q, scale, qweight, scales, bias, x.dtype))


fp8_linear = define_weight_op(fp8_linear_forward, lambda qweight, *_: qweight.shape[0])


register_row_scaled_autograd(fp8_linear)


def _rows(t: torch.Tensor, dtype: torch.dtype):
    """t [R, C] (any strides) quantized per row to FP8 ``dtype``: (q [R, C], scale [R])."""
    return torch.ops.sparqle.fp8_quantize_rows(t, None, dtype)


@torch.library.custom_op("sparqle::fp8_training_linear", mutates_args=())
def fp8_training_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W [N, K]^T + bias with every GEMM in FP8 (see the module doc):
    forward (x row-wise e4m3) @ (W row-wise e4m3)^T, reduction over K, y in x's dtype."""
    q_x, s_x = _rows(x, E4M3)
    q_w, s_w = _rows(weight, E4M3)
    return torch.ops.sparqle.fp8_scaled_mm(q_x, s_x, q_w, s_w, bias, x.dtype)


@fp8_training_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _training_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _training_backward(ctx, grad):
    """dgrad dx = (dy row-wise e5m2) @ (W^T row-wise e4m3)^T, reduction over N, in x's dtype;
    wgrad dW = (dy^T row-wise e5m2) @ (x^T row-wise e4m3)^T, reduction over M, in W's dtype;
    dbias = the sum of dy over M, in the bias's dtype."""
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_bias = None
    if ctx.needs_input_grad[0]:
        q_dy, s_dy = _rows(grad, E5M2)
        q_wt, s_wt = _rows(weight.t(), E4M3)
        grad_x = torch.ops.sparqle.fp8_scaled_mm(q_dy, s_dy, q_wt, s_wt, None, x.dtype)
    if ctx.needs_input_grad[1]:
        q_dyt, s_dyt = _rows(grad.t(), E5M2)
        q_xt, s_xt = _rows(x.t(), E4M3)
        grad_w = torch.ops.sparqle.fp8_scaled_mm(q_dyt, s_dyt, q_xt, s_xt, None, weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = grad.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_bias


register_autograd(fp8_training_linear, _training_backward, _training_setup_context)

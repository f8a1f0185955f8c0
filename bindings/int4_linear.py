"""sparqle::int4_linear (W4A16 linear) and sparqle::int4_dequantize.

int4_linear(x, packed, scales, zeros, bias, group_width) -> y [M, N] = x @ dequant(W)^T + bias
int4_dequantize(packed, scales, zeros, group_width, k) -> W [N, K] in the scales' dtype:
    a format conversion in plain torch, the same on every device and backend.

Gradients: dx = dy @ dequant(W) (straight through the dequantized weight, so adapters can
train on top), dbias = sum of dy; the quantized weight is frozen (no gradient).
"""
from typing import Optional

import torch

from sparqle.formats.int4 import dequantize

from ._autograd import register_autograd
from ._backend import FLOATS, launch
from ._weight_op import define_weight_op

# Triton 3.6 cannot lower the fp64 dot of this kernel (ConvertTritonGPUToLLVM fails).
DTYPES = {"triton": FLOATS - {torch.float64}, "torch": FLOATS}


def int4_linear_forward(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bias: Optional[torch.Tensor], group_width: int) -> torch.Tensor:
    return launch("int4_linear", "int4_linear", DTYPES, x, x, packed, scales, zeros, bias, group_width)


int4_linear = define_weight_op(int4_linear_forward, lambda packed, *_: packed.shape[0])


@torch.library.custom_op("sparqle::int4_dequantize", mutates_args=())
def int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_width: int, k: int) -> torch.Tensor:
    return dequantize(packed, scales, zeros, group_width, k)


@int4_dequantize.register_fake
def _(packed, scales, zeros, group_width, k):
    return scales.new_empty((packed.shape[0], k))


def _setup_context(ctx, inputs, output):
    x, packed, scales, zeros, bias, group_width = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.group_width, ctx.k = group_width, x.shape[1]


def _backward(ctx, grad):
    packed, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.sparqle.int4_dequantize(packed, scales, zeros, ctx.group_width, ctx.k)
        grad_x = grad @ w.to(grad.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.sum(0)
    return grad_x, None, None, None, grad_bias, None


register_autograd(int4_linear, _backward, _setup_context)

"""sparqle::nm_linear (N:M semi-structured sparse linear) and sparqle::nm_to_dense.

nm_linear(x, values, meta, bias, n, m) -> y [M, N] = x @ W^T + bias for W [N, K] in n:m
    (layout: sparqle.kernels.torch.nm_linear), K = x.shape[1].
nm_to_dense(values, meta, n, m, k) -> W [N, k] in values' dtype: a format conversion in
    plain torch, the same on every device and backend.

Gradients, the pattern fixed: dx = dy @ W (through the dense W: the transpose of an N:M
matrix is not N:M), d(values) = (dy^T @ x) at the kept positions, dbias = sum of dy.
"""
from typing import Optional

import torch

from sparqle.kernels.torch.nm_linear import columns, to_dense

from ._backend import FLOATS, launch, register_autograd

# Triton 3.6 cannot lower an fp64 tl.dot here. cupy (mma.sp on sparse tensor cores, 2:4
# only) runs when forced: auto keeps Triton until it is measured faster.
_DTYPES = {"triton": FLOATS - {torch.float64}, "torch": FLOATS,
           "cupy": frozenset({torch.float16, torch.bfloat16})}


@torch.library.custom_op("sparqle::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              bias: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    return launch("nm_linear", "nm_linear", _DTYPES, x, x, values, meta, bias, n, m)


@nm_linear.register_fake
def _(x, values, meta, bias, n, m):
    return x.new_empty((x.shape[0], values.shape[0]))


@torch.library.custom_op("sparqle::nm_to_dense", mutates_args=())
def nm_to_dense(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    return to_dense(values, meta, n, m, k)


@nm_to_dense.register_fake
def _(values, meta, n, m, k):
    return values.new_empty((values.shape[0], k))


def _setup_context(ctx, inputs, output):
    x, values, meta, bias, n, m = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.n, ctx.m = n, m


def _backward(ctx, grad):
    x, values, meta = ctx.saved_tensors
    n, m, k = ctx.n, ctx.m, x.shape[1]
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ torch.ops.sparqle.nm_to_dense(values, meta, n, m, k).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        kc = values.shape[1]
        grad_w = torch.nn.functional.pad(grad.t() @ x.to(grad.dtype), (0, kc // n * m - k))
        grad_values = grad_w.gather(1, columns(meta, n, m, kc)).to(values.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0)
    return grad_x, grad_values, None, grad_bias, None, None


register_autograd(nm_linear, _backward, _setup_context)
